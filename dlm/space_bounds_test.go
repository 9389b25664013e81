package dlm

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"testing"

	"github.com/mdcluster/mdcluster/dlm/transport"
)

// boundsNet joins Spaces in memory, delivering every message in order.
type boundsNet struct {
	t      *testing.T
	spaces map[NodeID]*Space
	cbs    map[NodeID][]Callback
}

func newBoundsNet(t *testing.T, cfg SpaceConfig, ids ...NodeID) *boundsNet {
	t.Helper()
	n := &boundsNet{t: t, spaces: map[NodeID]*Space{}, cbs: map[NodeID][]Callback{}}
	for _, id := range ids {
		c := cfg
		c.Self = id
		s, err := NewSpace(c)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.SetMembers(1, ids); err != nil {
			t.Fatal(err)
		}
		n.spaces[id] = s
	}
	return n
}

func (n *boundsNet) pump() {
	n.t.Helper()
	for again := true; again; {
		again = false
		for from := NodeID(1); from <= NodeID(len(n.spaces)); from++ {
			s := n.spaces[from]
			if s == nil {
				continue
			}
			out, cbs := s.Ready()
			n.cbs[from] = append(n.cbs[from], cbs...)
			var msgs []Outgoing
			for _, o := range out {
				if !o.Flush {
					msgs = append(msgs, Outgoing{To: o.To, Payload: append([]byte(nil), o.Payload...)})
				}
			}
			for _, o := range msgs {
				if err := n.spaces[o.To].Step(from, n.spaces[o.To].Generation(), o.Payload); err != nil {
					n.t.Fatal(err)
				}
				again = true
			}
		}
	}
}

// statuses counts node's completions by status.
func (n *boundsNet) statuses(node NodeID) map[Status]int {
	out := map[Status]int{}
	for _, cb := range n.cbs[node] {
		if cb.Kind == Completion {
			out[cb.Status]++
		}
	}
	return out
}

// namesDirectedAt returns count resource names whose directory node is dir.
func namesDirectedAt(s *Space, dir NodeID, count int) []string {
	var out []string
	for i := 0; len(out) < count; i++ {
		name := fmt.Sprintf("flood%06d", i)
		if s.dirNode(name) == dir {
			out = append(out, name)
		}
	}
	return out
}

// A peer that looks up ever more names cannot make the directory node hold
// more than MaxPeerDirEntries entries for it: the rest of its requests end
// with ErrNoMem, and other nodes' locking still works.
func TestPeerLookupFloodBounded(t *testing.T) {
	const limit = 64
	n := newBoundsNet(t, SpaceConfig{MaxPeerDirEntries: limit}, 1, 2, 3)
	attacker, victim := n.spaces[1], n.spaces[2]
	names := namesDirectedAt(attacker, 2, 10*limit)
	procs := make([]Proc, len(names))
	for i, name := range names {
		if err := attacker.Lock(&procs[i], Request{Resource: name, Mode: NL, Tag: i + 1, Owner: 1}); err != nil {
			t.Fatal(err)
		}
	}
	n.pump()
	st := victim.Stats()
	if st.PeerDirEntries != limit || st.RefusedLookups != uint64(len(names)-limit) {
		t.Fatalf("victim stats %+v, want %d directory entries and %d refused lookups", st, limit, len(names)-limit)
	}
	got := n.statuses(1)
	if got[StatusOK] != limit || got[StatusNoMem] != len(names)-limit {
		t.Fatalf("attacker's completions %v, want %d granted and %d ErrNoMem", got, limit, len(names)-limit)
	}
	if !errors.Is(StatusNoMem, ErrNoMem) || StatusNoMem.Error() == "dlm: unknown status" {
		t.Fatal("StatusNoMem has no error text")
	}
	// Legitimate traffic still works: another node locks names the victim
	// directs, and the attacker too once it releases what it holds.
	honest := namesDirectedAt(n.spaces[3], 2, 10)
	hp := make([]Proc, len(honest))
	for i, name := range honest {
		if err := n.spaces[3].Lock(&hp[i], Request{Resource: "h" + name, Mode: EX, Tag: i + 1, Owner: 1}); err != nil {
			t.Fatal(err)
		}
	}
	n.pump()
	if got := n.statuses(3); got[StatusOK] != len(honest) {
		t.Fatalf("honest node's completions %v, want %d granted", got, len(honest))
	}
}

// A peer that asks for ever more locks on resources mastered here cannot
// make this node keep more than MaxPeerLocks master copies for it; the
// requests beyond end with ErrNoMem, and work again once it releases some.
func TestPeerLockFloodBounded(t *testing.T) {
	const limit = 50
	n := newBoundsNet(t, SpaceConfig{MaxPeerLocks: limit}, 1, 2, 3)
	attacker, victim := n.spaces[1], n.spaces[2]
	var pin Proc
	if err := victim.Lock(&pin, Request{Resource: "r", Mode: NL, Tag: 1, Owner: 1}); err != nil {
		t.Fatal(err)
	}
	n.pump()
	procs := make([]Proc, 4*limit)
	for i := range procs {
		if err := attacker.Lock(&procs[i], Request{Resource: "r", Mode: NL, Tag: i + 1, Owner: 1}); err != nil {
			t.Fatal(err)
		}
		n.pump() // each request once the master is known
	}
	st := victim.Stats()
	if st.PeerLocks != limit || st.RefusedLocks != uint64(len(procs)-limit) {
		t.Fatalf("victim stats %+v, want %d master copies and %d refused", st, limit, len(procs)-limit)
	}
	if got := n.statuses(1); got[StatusOK] != limit || got[StatusNoMem] != len(procs)-limit {
		t.Fatalf("attacker's completions %v", got)
	}
	// Another node is not affected.
	var hp Proc
	if err := n.spaces[3].Lock(&hp, Request{Resource: "r", Mode: PR, Tag: 1, Owner: 1}); err != nil {
		t.Fatal(err)
	}
	n.pump()
	if hp.grmode != PR {
		t.Fatalf("honest lock not granted: %v", hp.grmode)
	}
	// The attacker's budget comes back with its unlocks.
	for i := range procs {
		if procs[i].state == pGranted {
			if err := attacker.Unlock(&procs[i], 0, nil); err != nil {
				t.Fatal(err)
			}
		}
	}
	n.pump()
	var again Proc
	if err := attacker.Lock(&again, Request{Resource: "r", Mode: NL, Tag: 1, Owner: 1}); err != nil {
		t.Fatal(err)
	}
	n.pump()
	if again.grmode != NL || victim.Stats().PeerLocks != 2 { // again + the honest PR
		t.Fatalf("after unlocks: %v, stats %+v", again.grmode, victim.Stats())
	}
}

// Messages held for later (a newer generation, a stopped lockspace) are
// bounded per peer and in total; the rest are dropped and counted, and
// another peer's messages still find room.
func TestHeldMessagesBounded(t *testing.T) {
	s, err := NewSpace(SpaceConfig{Self: 2, MaxHeld: 300, MaxHeldPerPeer: 100})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.SetMembers(1, []NodeID{1, 2, 3}); err != nil {
		t.Fatal(err)
	}
	msg := appendMessage(nil, &message{typ: msgLookup, name: "x"})
	for range 1000 {
		if err := s.Step(1, 7, msg); err != nil { // a future generation
			t.Fatal(err)
		}
	}
	s.Stop()
	for range 1000 {
		if err := s.Step(1, 1, msg); err != nil { // held while stopped
			t.Fatal(err)
		}
	}
	if st := s.Stats(); st.Held != 100 || st.HeldDropped != 1900 {
		t.Fatalf("stats %+v, want 100 held and 1900 dropped", st)
	}
	for range 50 {
		if err := s.Step(3, 7, msg); err != nil {
			t.Fatal(err)
		}
	}
	if st := s.Stats(); st.Held != 150 {
		t.Fatalf("another peer's messages not held: %+v", st)
	}
	// Recovery into generation 7 replays (and uncounts) what was held.
	if err := s.Recover(7, []NodeID{1, 2, 3}, nil, false); err != nil {
		t.Fatal(err)
	}
	if st := s.Stats(); st.Held > 150 {
		t.Fatalf("after recovery: %+v", st)
	}
}

// Messages for lockspaces not opened here are bounded over all lockspaces
// (a peer naming ever new lockspace IDs), per peer and in bytes; a lockspace
// opened later still gets another peer's early messages.
func TestEarlyMessagesBounded(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg.MaxEarly, cfg.MaxEarlyPerPeer, cfg.MaxEarlyBytes = 300, 100, 1<<20
	n, err := NewNode(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	msg := appendMessage(nil, &message{typ: msgLookup, name: "x"})
	for i := range 10000 {
		n.receive(2, transport.LockspaceID(i), 1, msg) // a new lockspace ID each time
	}
	if st := n.Stats(); st.EarlyHeld != 100 || st.EarlyDropped != 9900 {
		t.Fatalf("stats %+v, want 100 held, 9900 dropped", st)
	}
	n.mu.Lock()
	ids := len(n.early)
	n.mu.Unlock()
	if ids != 100 {
		t.Fatalf("%d lockspace IDs remembered, want 100", ids)
	}
	big := make([]byte, 600<<10)
	// (A remove: it needs no answer, and this node has no transport.)
	n.receive(3, lockspaceID("md0"), 1, appendMessage(nil, &message{typ: msgRemove, name: "x"}))
	n.receive(3, 7777777, 1, big)
	n.receive(3, 7777778, 1, big) // over MaxEarlyBytes
	if st := n.Stats(); st.EarlyHeld != 102 || st.EarlyDropped != 9901 {
		t.Fatalf("stats %+v, want 102 held, 9901 dropped", st)
	}
	ls, err := n.Open("md0", OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer ls.Release()
	if st := n.Stats(); st.EarlyHeld != 101 {
		t.Fatalf("after Open: %+v, want its early message taken", st)
	}
}
