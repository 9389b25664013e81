package dlm_test

import (
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/dlm/transport"
)

// recoveries collects OnRecovered reports.
type recoveries chan [2]any

func (r recoveries) wait(t *testing.T, node dlm.NodeID, gen uint64) {
	t.Helper()
	timer := time.NewTimer(guard)
	defer timer.Stop()
	for {
		select {
		case got := <-r:
			if got[1].(uint64) >= gen {
				return
			}
		case <-timer.C:
			t.Fatalf("node %d: lockspace not recovered into generation %d", node, gen)
		}
	}
}

// startBare starts a node with a listener and no peers.
func startBare(t *testing.T, id dlm.NodeID) (*dlm.Node, recoveries) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rec := make(recoveries, 64)
	n, err := dlm.NewNode(dlm.Config{ID: id, Listener: ln, ClusterKey: testKey, Logger: quietLogger(),
		Transport: transport.Config{ReconnectMin: 2 * time.Millisecond, ReconnectMax: 50 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	n.Controller().OnRecovered(func(name string, gen uint64) { rec <- [2]any{name, gen} })
	t.Cleanup(func() { _ = n.Close() })
	if n.Controller().Transport() == nil {
		t.Fatal("a node with a listener and no peers has no transport")
	}
	return n, rec
}

// exclusiveBothWays checks that a and b exchange lock traffic in both
// directions: each takes EX on a resource it masters, the other's request
// waits (refused under NOQUEUE) and is granted once the holder unlocks.
func exclusiveBothWays(t *testing.T, a, b *dlm.Lockspace, tag string) {
	t.Helper()
	ctx := withGuard(t)
	for _, p := range [][2]*dlm.Lockspace{{a, b}, {b, a}} {
		holder, other := p[0], p[1]
		res := tag + "-" + holder.Name()
		lk, err := holder.Lock(ctx, res, dlm.EX, 0)
		if err != nil {
			t.Fatalf("%s: holder: %v", res, err)
		}
		if _, err := other.Lock(ctx, res, dlm.EX, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
			t.Fatalf("%s: a conflicting NOQUEUE request: %v, want ErrAgain", res, err)
		}
		if err := lk.Unlock(ctx, 0); err != nil {
			t.Fatal(err)
		}
		lk2, err := other.Lock(ctx, res, dlm.EX, 0)
		if err != nil {
			t.Fatalf("%s: after the unlock: %v", res, err)
		}
		if err := lk2.Unlock(ctx, 0); err != nil {
			t.Fatal(err)
		}
	}
}

// TestNodeLearnsPeers: nodes started with no peer list get their peers'
// addresses at runtime. A third node is added to the view before the
// others know its address: recovery's messages to it wait in the transport
// (nothing refused, nothing lost) and recovery completes once SetPeer
// gives the address. A member whose address is forgotten stays a
// transport peer until a view without it.
func TestNodeLearnsPeers(t *testing.T) {
	n1, r1 := startBare(t, 1)
	n2, r2 := startBare(t, 2)
	n3, r3 := startBare(t, 3)
	if err := n1.SetPeer(2, n2.Addr().String()); err != nil {
		t.Fatal(err)
	}
	if err := n2.SetPeer(1, n1.Addr().String()); err != nil {
		t.Fatal(err)
	}
	ls := map[dlm.NodeID]*dlm.Lockspace{}
	for id, n := range map[dlm.NodeID]*dlm.Node{1: n1, 2: n2, 3: n3} {
		l, err := n.Open("md0", dlm.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ls[id] = l
	}
	for _, n := range []*dlm.Node{n1, n2} {
		n.Controller().Stop()
		if err := n.Controller().Recover(2, []dlm.NodeID{1, 2}, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	r1.wait(t, 1, 2)
	r2.wait(t, 2, 2)
	exclusiveBothWays(t, ls[1], ls[2], "two")

	// Node 3 joins the view; nobody has its address, and it has nobody's.
	for _, n := range []*dlm.Node{n1, n2, n3} {
		n.Controller().Stop()
		if err := n.Controller().Recover(3, []dlm.NodeID{1, 2, 3}, nil, false); err != nil {
			t.Fatal(err)
		}
	}
	for _, n := range []*dlm.Node{n1, n2} {
		ps, ok := n.Controller().Transport().PeerStatus(3)
		if !ok || ps.Addr != "" || ps.Connected {
			t.Fatalf("node %d: member 3 without an address: %+v (known %v), want a peer waiting for its address", n.ID(), ps, ok)
		}
		if st := n.Controller().Transport().Stats(); st.Dropped.QueueFull != 0 {
			t.Fatalf("node %d refused messages for node 3: %+v", n.ID(), st.Dropped)
		}
	}
	// Node 3 has the highest ID: the others dial it, so only they need
	// its address.
	for _, n := range []*dlm.Node{n1, n2} {
		if err := n.SetPeer(3, n3.Addr().String()); err != nil {
			t.Fatal(err)
		}
	}
	r1.wait(t, 1, 3)
	r2.wait(t, 2, 3)
	r3.wait(t, 3, 3)
	exclusiveBothWays(t, ls[1], ls[3], "one-three")
	exclusiveBothWays(t, ls[2], ls[3], "two-three")
	if got := n3.PeerAddrs(); len(got) != 0 {
		t.Fatalf("node 3 learned addresses it was never given: %v", got)
	}

	// Node 1 forgets node 3 while it is a member: kept until a view
	// without it, then removed.
	if err := n1.ForgetPeer(3); err != nil {
		t.Fatal(err)
	}
	if _, ok := n1.Controller().Transport().PeerStatus(3); !ok {
		t.Fatal("a member was removed from the transport while in the view")
	}
	n1.Controller().Stop()
	n2.Controller().Stop()
	for _, n := range []*dlm.Node{n1, n2} {
		if err := n.Controller().Recover(4, []dlm.NodeID{1, 2}, []dlm.NodeID{3}, false); err != nil {
			t.Fatal(err)
		}
	}
	r1.wait(t, 1, 4)
	r2.wait(t, 2, 4)
	if _, ok := n1.Controller().Transport().PeerStatus(3); ok {
		t.Fatal("a forgotten node that left the view is still a transport peer")
	}
	if _, ok := n2.Controller().Transport().PeerStatus(3); !ok {
		t.Fatal("node 2 dropped node 3, whose address it still knows")
	}
}

// TestSetPeerRefusesBadInput: SetPeer and ForgetPeer refuse what cannot be
// right, with ErrInvalid and a reason, and change nothing.
func TestSetPeerRefusesBadInput(t *testing.T) {
	solo, err := dlm.NewNode(dlm.DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = solo.Close() }()
	if err := solo.SetPeer(2, "127.0.0.1:1"); !errors.Is(err, dlm.ErrInvalid) || !strings.Contains(err.Error(), "no transport") {
		t.Fatalf("SetPeer on a node without a transport: %v", err)
	}

	n, _ := startBare(t, 5000) // peers below 5000 are never dialled
	for _, tc := range []struct {
		id   dlm.NodeID
		addr string
		want string
	}{
		{0, "127.0.0.1:1", "peer ID 0"},
		{5000, "127.0.0.1:1", "peer ID 5000"},
		{7, "", "empty address"},
		{7, "10.0.0.1", "missing port"},
		{7, "10.0.0.1:0", "port must be"},
	} {
		if err := n.SetPeer(tc.id, tc.addr); !errors.Is(err, dlm.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("SetPeer(%d, %q): %v, want ErrInvalid mentioning %q", tc.id, tc.addr, err, tc.want)
		}
	}
	if got := n.PeerAddrs(); len(got) != 0 {
		t.Fatalf("refused peers were recorded: %v", got)
	}
	for id := dlm.NodeID(1); id <= dlm.MaxPeers; id++ {
		if err := n.SetPeer(id, "127.0.0.1:1"); err != nil {
			t.Fatalf("peer %d of %d: %v", id, dlm.MaxPeers, err)
		}
	}
	if err := n.SetPeer(dlm.MaxPeers+1, "127.0.0.1:1"); !errors.Is(err, dlm.ErrInvalid) || !strings.Contains(err.Error(), "MaxPeers") {
		t.Fatalf("peer %d: %v, want refused (MaxPeers)", dlm.MaxPeers+1, err)
	}
	if err := n.SetPeer(1, "127.0.0.2:1"); err != nil {
		t.Fatalf("changing a known peer's address with the table full: %v", err)
	}
	if err := n.ForgetPeer(1); err != nil {
		t.Fatal(err)
	}
	if _, ok := n.Controller().Transport().PeerStatus(1); ok {
		t.Fatal("a forgotten non-member is still a transport peer")
	}
	if err := n.SetPeer(dlm.MaxPeers+1, "127.0.0.1:1"); err != nil {
		t.Fatalf("after forgetting one: %v", err)
	}
}
