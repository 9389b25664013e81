package dlm

import "testing"

// BenchmarkSpaceRemotePair is the lock manager's own work for a remote lock
// + unlock pair, both nodes' sides, with messages handed straight from one
// Space to the other, the unlock riding with the next request: no
// transport, no driver, no goroutines. Compare with BenchmarkLockUnlockRemote
// minus BenchmarkTCPRoundTrip to see where the rest of a remote pair goes.
func BenchmarkSpaceRemotePair(b *testing.B) {
	a, err := NewSpace(SpaceConfig{Self: 1})
	if err != nil {
		b.Fatal(err)
	}
	m, err := NewSpace(SpaceConfig{Self: 2})
	if err != nil {
		b.Fatal(err)
	}
	for _, s := range []*Space{a, m} {
		if err := s.SetMembers(1, []NodeID{1, 2}); err != nil {
			b.Fatal(err)
		}
	}
	spaces := [3]*Space{nil, a, m}
	var buf []byte
	// pump delivers everything queued, one payload per destination as the
	// driver batches, until both spaces are quiet.
	pump := func() {
		for again := true; again; {
			again = false
			for from := NodeID(1); from <= 2; from++ {
				out, _ := spaces[from].Ready()
				buf = buf[:0]
				to := NodeID(0)
				for _, o := range out {
					if !o.Flush {
						to = o.To
						buf = append(buf, o.Payload...)
					}
				}
				if len(buf) > 0 {
					if err := spaces[to].Step(from, 1, buf); err != nil {
						b.Fatal(err)
					}
					again = true
				}
			}
		}
	}
	var pin Proc
	if err := m.Lock(&pin, Request{Resource: "remote", Mode: NL, Tag: 1, Owner: 1}); err != nil {
		b.Fatal(err)
	}
	pump()
	var p Proc
	b.ReportAllocs()
	for b.Loop() {
		if err := a.Lock(&p, Request{Resource: "remote", Mode: EX, Tag: 1, Owner: 1}); err != nil {
			b.Fatal(err)
		}
		pump()
		if p.grmode != EX {
			b.Fatalf("not granted: %v", p.grmode)
		}
		if err := a.Unlock(&p, 0, nil); err != nil {
			b.Fatal(err)
		}
		// The unlock is held back (Defer): the next request carries it,
		// as the driver does.
	}
}
