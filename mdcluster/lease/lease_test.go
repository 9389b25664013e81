package lease

import (
	"errors"
	"testing"
	"time"
)

const L = 10 * time.Second

// step is one input to a State, then the verdict expected at a time.
type step struct {
	view    uint64 // SetView when set (with quorate)
	quorate bool
	read    *read // Renewed
	at      time.Duration
	want    error // nil: I/O allowed at `at`
}

type read struct {
	start time.Duration
	gen   uint64
	err   error
}

func TestStateDecisions(t *testing.T) {
	io := errors.New("EIO")
	cases := []struct {
		name  string
		steps []step
	}{
		{"nothing yet", []step{{at: 0, want: ErrNoQuorum}}},
		{"view but no read", []step{{view: 1, quorate: true, at: 0, want: ErrNoLeaseYet}}},
		{"good read holds one lease from its start", []step{
			{view: 1, quorate: true, read: &read{start: 2 * time.Second, gen: 1}, at: 3 * time.Second},
			{at: 2*time.Second + L - 1},
			{at: 2*time.Second + L, want: ErrExpired},
		}},
		{"half-lease renewals keep it", []step{
			{view: 1, quorate: true, read: &read{start: 0, gen: 1}, at: L / 2},
			{read: &read{start: L / 2, gen: 1}, at: L},
			{read: &read{start: L, gen: 1}, at: L + L/2},
			{at: 2*L - 1},
			{at: 2 * L, want: ErrExpired},
		}},
		{"blank stamp (gen 0) is fine", []step{{view: 1, quorate: true, read: &read{gen: 0}, at: 1}}},
		{"newer stamp fences at once", []step{
			{view: 1, quorate: true, read: &read{start: 0, gen: 1}, at: 1},
			{read: &read{start: 1, gen: 2}, at: 2, want: ErrFenced},
			{read: &read{start: 3, gen: 1}, at: 4, want: ErrFenced}, // a stale read does not lift it
		}},
		{"joining the newer view lifts the fence after a fresh read", []step{
			{view: 1, quorate: true, read: &read{start: 0, gen: 2}, at: 1, want: ErrFenced},
			{view: 2, quorate: true, at: 2, want: ErrNoLeaseYet},
			{read: &read{start: 3, gen: 2}, at: 4},
		}},
		{"unreadable stops at once, a good read resumes", []step{
			{view: 1, quorate: true, read: &read{start: 0, gen: 1}, at: 1},
			{read: &read{start: 2, err: io}, at: 3, want: ErrUnreadable},
			{read: &read{start: 4, gen: 1}, at: 5},
		}},
		{"quorum loss stops at once, even with a lease", []step{
			{view: 1, quorate: true, read: &read{start: 0, gen: 1}, at: 1},
			{view: 1, quorate: false, at: 2, want: ErrNoQuorum},
			{view: 1, quorate: true, at: 3},
		}},
		{"a read finishing late does not move the lease back", []step{
			{view: 1, quorate: true, read: &read{start: 5 * time.Second, gen: 1}, at: 6 * time.Second},
			{read: &read{start: 1 * time.Second, err: io}, at: 6 * time.Second}, // older: ignored
			{at: 5*time.Second + L - 1},
		}},
		{"own generation stamped is not a fence", []step{
			{view: 7, quorate: true, read: &read{start: 0, gen: 7}, at: 1},
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s, err := NewState(L)
			if err != nil {
				t.Fatal(err)
			}
			for i, st := range c.steps {
				if st.view != 0 || st.quorate {
					s.SetView(st.view, st.quorate)
				}
				if r := st.read; r != nil {
					s.Renewed(r.start, Record{Generation: r.gen, Node: 9}, r.err)
				}
				got := s.Check(st.at)
				if (got == nil) != (st.want == nil) || (st.want != nil && !errors.Is(got, st.want)) {
					t.Fatalf("step %d at %v: %v, want %v", i, st.at, got, st.want)
				}
				if got != nil && !errors.Is(got, ErrStopped) {
					t.Fatalf("step %d: %v does not wrap ErrStopped", i, got)
				}
			}
		})
	}
}

func TestRenewDue(t *testing.T) {
	s, _ := NewState(L)
	if !s.RenewDue(0) {
		t.Fatal("first read not due")
	}
	s.Renewed(time.Second, Record{}, nil)
	if s.RenewDue(time.Second + L/2 - 1) {
		t.Fatal("due before half a lease")
	}
	if !s.RenewDue(time.Second + L/2) {
		t.Fatal("not due at half a lease")
	}
	if _, err := NewState(0); err == nil {
		t.Fatal("zero lease accepted")
	}
}

// TestFenceArithmetic: whatever the victim's read schedule, if the stamp
// became visible at T (every read starting at or after T sees it), the
// victim's lease ends by T + L, before the fencer's wait T + L + margin
// ends. Checked exhaustively on a grid of read start times, with the
// victim's clock offset arbitrarily (only differences matter).
func TestFenceArithmetic(t *testing.T) {
	const step = 250 * time.Millisecond
	T := 20 * time.Second
	for offset := -time.Hour; offset <= time.Hour; offset += 37 * time.Minute {
		for last := time.Duration(0); last < 2*T; last += step {
			s, _ := NewState(L)
			s.SetView(1, true)
			gen := uint64(1)
			if last >= T {
				gen = 2
			}
			s.Renewed(last+offset, Record{Generation: gen}, nil)
			deadline := FenceWait(L, 0) + T
			if err := s.Check(deadline + offset); err == nil {
				t.Fatalf("read at %v (stamp at %v): I/O still allowed at %v", last, T, deadline)
			}
		}
	}
}
