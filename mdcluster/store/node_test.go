package store

import (
	"errors"
	"strings"
	"testing"

	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

func hsFixture() membership.HardState {
	return membership.HardState{Promised: 9, PromisedTo: 1,
		Accepted:  &membership.Accepted{Ballot: 9, Value: membership.Proposal{Gen: 8, Members: []membership.NodeID{1, 2, 3}, Prev: membership.View{Gen: 7, Members: []membership.NodeID{1, 2}}}, Base: membership.Proposal{Gen: 7, Members: []membership.NodeID{1, 2}}},
		Installed: membership.Proposal{Gen: 7, Members: []membership.NodeID{1, 2}, Prev: membership.View{Gen: 3, Members: []membership.NodeID{1}}}}
}

func TestHardStateRoundTrip(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		if _, ok, err := LoadHardState(s); err != nil || ok {
			t.Fatalf("fresh store: ok %v, err %v", ok, err)
		}
		hs := hsFixture()
		if err := SaveHardState(s, hs); err != nil {
			t.Fatal(err)
		}
		s = im.reopen(t, s)
		got, ok, err := LoadHardState(s)
		if err != nil || !ok {
			t.Fatalf("reopened: ok %v, err %v", ok, err)
		}
		if string(got.Marshal()) != string(hs.Marshal()) {
			t.Fatalf("loaded %+v, saved %+v", got, hs)
		}
	})
}

// A hard state that does not decode is a clear error, and loading it
// changes nothing.
func TestHardStateCorrupt(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		bad := append(hsFixture().Marshal(), 0x01) // trailing byte
		mustUpdate(t, s, func(tx Txn) error { return tx.Set(NSMembership, []byte(keyHardState), bad) })
		_, ok, err := LoadHardState(s)
		if !errors.Is(err, ErrCorrupt) || !errors.Is(err, membership.ErrMalformed) || ok {
			t.Fatalf("loading a corrupt hard state: ok %v, err %v", ok, err)
		}
		if !strings.Contains(err.Error(), "membership/hardstate") {
			t.Fatalf("the error does not say which record: %v", err)
		}
		if v, _ := get(t, s, NSMembership, keyHardState); v != string(bad) {
			t.Fatal("loading changed the corrupt record")
		}
	})
}

func TestClaimNodeID(t *testing.T) {
	forEach(t, func(t *testing.T, im impl) {
		s := im.open(t)
		if err := ClaimNodeID(s, 2); err != nil {
			t.Fatal(err)
		}
		if err := ClaimNodeID(s, 2); err != nil {
			t.Fatalf("claiming again for the same node: %v", err)
		}
		s = im.reopen(t, s)
		err := ClaimNodeID(s, 3)
		if err == nil || !strings.Contains(err.Error(), "belongs to node 2, not node 3") {
			t.Fatalf("claiming node 2's store for node 3: %v", err)
		}
		if v, _ := get(t, s, NSNode, keyNodeID); v != "\x00\x00\x00\x02" {
			t.Fatalf("a refused claim changed the record to %x", v)
		}
		mustUpdate(t, s, func(tx Txn) error { return tx.Set(NSNode, []byte(keyNodeID), []byte{0, 2}) })
		if err := ClaimNodeID(s, 2); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "2 bytes, want 4") {
			t.Fatalf("claiming a store with a damaged ID record: %v", err)
		}
		if v, _ := get(t, s, NSNode, keyNodeID); v != "\x00\x02" {
			t.Fatalf("a refused claim rewrote the damaged record to %x", v)
		}
	})
}
