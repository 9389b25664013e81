package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

func TestDLMAdvertiseAddr(t *testing.T) {
	tcp := func(s string) net.Addr {
		a, err := net.ResolveTCPAddr("tcp", s)
		if err != nil {
			t.Fatal(err)
		}
		return a
	}
	for _, tc := range []struct {
		advertise, gossip, listen, want, err string
	}{
		{listen: "10.0.0.2:7410", want: "10.0.0.2:7410"},
		{listen: "0.0.0.0:7410", gossip: "10.0.0.2", want: "10.0.0.2:7410"},
		{listen: "[::]:7410", gossip: "fd00::2", want: "[fd00::2]:7410"},
		{listen: "0.0.0.0:7410", want: "127.0.0.1:7410"}, // gossip's own default
		{listen: "0.0.0.0:7410", advertise: "node2.example:7410", want: "node2.example:7410"},
		{listen: "0.0.0.0:7410", gossip: "0.0.0.0", err: "set DLMAdvertiseAddr"},
	} {
		got, err := dlmAdvertiseAddr(Config{DLMAdvertiseAddr: tc.advertise, GossipBindAddr: tc.gossip}, tcp(tc.listen))
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%+v: %q, %v; want an error mentioning %q", tc, got, err, tc.err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("%+v: %q, %v; want %q", tc, got, err, tc.want)
		}
	}
}

// startJoiner starts node id with nothing but a gossip seed: no DLM peer
// list, no entry in any other node's configuration (it is not even in the
// quorum configuration: a non-data node).
func (c *cluster) startJoiner(id NodeID, seed string) *Node {
	c.t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		c.t.Fatal(err)
	}
	c.dirs[id] = c.t.TempDir()
	c.gossipOnly[id] = true
	c.start(id, ln, seed, 0)
	return c.nodes[id]
}

// conflictBothWays checks that lock traffic flows between a and b in both
// directions. For each direction the holder takes EX on a resource it
// masters (it is the first to use it); the other is refused under NOQUEUE
// (a request and its answer), then queues a request, which the holder's
// blocking callback proves has reached it; the holder unlocks and the
// waiter is granted (a grant sent by the master).
func conflictBothWays(t *testing.T, ctx context.Context, a, b *dlm.Lockspace, aID, bID NodeID) {
	t.Helper()
	for _, p := range []struct {
		holder, waiter     *dlm.Lockspace
		holderID, waiterID NodeID
	}{{a, b, aID, bID}, {b, a, bID, aID}} {
		res := fmt.Sprintf("held-by-%d-for-%d", p.holderID, p.waiterID)
		blocked := make(chan dlm.Mode, 1)
		lk, err := p.holder.Acquire(ctx, dlm.LockRequest{Resource: res, Mode: dlm.EX,
			OnBlock: func(_ *dlm.Lock, m dlm.Mode) {
				select {
				case blocked <- m:
				default:
				}
			}})
		if err != nil {
			t.Fatalf("node %d takes EX on %s: %v", p.holderID, res, err)
		}
		if _, err := p.waiter.Lock(ctx, res, dlm.EX, dlm.NoQueue); !errors.Is(err, dlm.ErrAgain) {
			t.Fatalf("node %d: NOQUEUE EX on %s held by node %d: %v, want ErrAgain", p.waiterID, res, p.holderID, err)
		}
		granted := make(chan error, 1)
		go func() {
			wl, err := p.waiter.Lock(ctx, res, dlm.EX, 0)
			if err == nil {
				err = wl.Unlock(ctx, 0)
			}
			granted <- err
		}()
		select {
		case m := <-blocked:
			if m != dlm.EX {
				t.Fatalf("node %d blocked node %d's %v, want EX", p.holderID, p.waiterID, m)
			}
		case err := <-granted:
			t.Fatalf("node %d got %s while node %d holds EX: %v", p.waiterID, res, p.holderID, err)
		case <-ctx.Done():
			t.Fatalf("node %d's request for %s never reached node %d", p.waiterID, res, p.holderID)
		}
		if err := lk.Unlock(ctx, 0); err != nil {
			t.Fatal(err)
		}
		if err := <-granted; err != nil {
			t.Fatalf("node %d waiting for %s: %v", p.waiterID, res, err)
		}
	}
}

// TestNodeJoinsWithSeedsOnly: a running three-node cluster (data nodes 1, 2
// and 5, quorum 2) is joined by node 4, started with only a gossip seed: no
// DLM peer list, and named in no other node's configuration. Its DLM
// address reaches the others in its gossip metadata and theirs reach it;
// the agreement installs a view of all four, and node 4 takes locks that
// conflict with each other node's, in both directions. Node 4's ID lies
// between the others', so it both dials (node 5, whose address it learned
// from gossip) and is dialled (by nodes 1 and 2, who learned its address).
// "static": the first three have DLM peer lists for each other (gossip
// metadata then takes precedence); "gossip": nobody has one.
func TestNodeJoinsWithSeedsOnly(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	for _, gossipOnly := range []bool{false, true} {
		name := "static"
		if gossipOnly {
			name = "gossip"
		}
		t.Run(name, func(t *testing.T) { joinWithSeedsOnly(t, gossipOnly) })
	}
}

func joinWithSeedsOnly(t *testing.T, gossipOnly bool) {
	c := newClusterWith(t, gossipOnly, 1, 2, 5)
	gen := c.waitView(20*time.Second, []NodeID{1, 2, 5})
	n4 := c.startJoiner(4, c.nodes[1].GossipAddr())
	spaces := map[NodeID]*dlm.Lockspace{}
	for _, id := range []NodeID{1, 2, 4, 5} {
		ls, err := c.nodes[id].Open("md0", dlm.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		spaces[id] = ls
	}
	all := []NodeID{1, 2, 4, 5}
	gen4 := c.waitView(30*time.Second, all)
	if gen4 <= gen {
		t.Fatalf("view of four at generation %d, the view of three was %d", gen4, gen)
	}
	// Every node has every other's advertised address, from gossip.
	for _, id := range all {
		got := c.nodes[id].DLM().PeerAddrs()
		for _, o := range all {
			if o == id {
				continue
			}
			if want := c.nodes[o].DLMAdvertiseAddr(); got[dlm.NodeID(o)] != want {
				t.Fatalf("node %d has DLM address %q for node %d, want its advertised %q (all: %v)", id, got[dlm.NodeID(o)], o, want, got)
			}
		}
	}
	if n4.DLMAdvertiseAddr() != n4.DLMAddr().String() {
		t.Fatalf("node 4 advertises %q, listens on %s", n4.DLMAdvertiseAddr(), n4.DLMAddr())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, o := range []NodeID{1, 2, 5} {
		conflictBothWays(t, ctx, spaces[4], spaces[o], 4, o)
	}
	if calls := c.fencer.Calls(); len(calls) != 0 {
		t.Fatalf("fence calls %+v; nobody failed", calls)
	}
}

// TestRestartOnNewDLMAddress: in a cluster where nobody has a DLM peer
// list, node 2 restarts at once on a new DLM port (same gossip endpoint and
// data directory). Its new address must reach the others through its
// updated gossip metadata (memberlist reports the change as an update or a
// rejoin), or node 1, which dials node 2, could never reconnect: the view
// is readmitted and locks flow between node 2 and the others both ways.
func TestRestartOnNewDLMAddress(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	c := newClusterWith(t, true, 1, 2, 3)
	gen := c.waitView(20*time.Second, []NodeID{1, 2, 3})
	for _, id := range []NodeID{1, 2, 3} {
		if _, err := c.nodes[id].Open("md0", dlm.OpenOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	old := c.nodes[2].DLMAdvertiseAddr()
	_, port, _ := net.SplitHostPort(c.nodes[2].GossipAddr())
	gossipPort, _ := strconv.Atoi(port)
	c.nodes[2].Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c.start(2, ln, c.nodes[1].GossipAddr(), gossipPort)
	n2 := c.nodes[2]
	if n2.DLMAdvertiseAddr() == old {
		t.Fatalf("node 2 restarted on its old DLM address %s", old)
	}
	spaces := map[NodeID]*dlm.Lockspace{}
	for _, id := range []NodeID{1, 2, 3} {
		ls, err := c.nodes[id].Open("md0", dlm.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		spaces[id] = ls
	}
	gen2 := c.waitView(30*time.Second, []NodeID{1, 2, 3})
	if gen2 <= gen {
		t.Fatalf("view gen %d after the restart, was %d", gen2, gen)
	}
	for _, id := range []NodeID{1, 3} {
		if got := c.nodes[id].DLM().PeerAddrs()[2]; got != n2.DLMAdvertiseAddr() {
			t.Fatalf("node %d has DLM address %q for node 2, want the new %q", id, got, n2.DLMAdvertiseAddr())
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conflictBothWays(t, ctx, spaces[1], spaces[2], 1, 2)
	conflictBothWays(t, ctx, spaces[2], spaces[3], 2, 3)
}
