package node

import (
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
	"github.com/mdcluster/mdcluster/mdcluster/store"
)

// startSolo starts a one-node cluster (quorum 1 of 1) on an injected store.
func startSolo(t *testing.T, id NodeID, kv store.Store) (*Node, error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := StorageLANConfig()
	cfg.ID, cfg.Quorum, cfg.ClusterKey, cfg.Fencer = id, ddraid.Config{DataNodes: []NodeID{id}, Quorum: 1}, testKey, &fence.TestFencer{}
	cfg.Store, cfg.DLMListener, cfg.Logger = kv, ln, testLogger(t)
	n, err := New(cfg)
	if err != nil {
		ln.Close()
	}
	return n, err
}

// waitSolo waits for a recovered view of n alone and returns its generation.
func waitSolo(t *testing.T, n *Node) uint64 {
	t.Helper()
	var gen uint64
	eventually(t, 20*time.Second, func() bool {
		st := n.Status()
		gen = st.View.Gen
		return gen > 0 && st.Quorate && !st.Stopped && st.Recovered == gen
	}, "a recovered one-node view")
	return gen
}

// A node runs on an injected store: the hard state goes there, the node
// does not close it, the node-ID claim holds, and a node restarted on what
// the store kept after a crash comes back with its view.
func TestInjectedStore(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	mem := store.NewMem()
	n, err := startSolo(t, 1, mem)
	if err != nil {
		t.Fatal(err)
	}
	gen := waitSolo(t, n)
	if n.Store() != store.Store(mem) {
		t.Fatal("Node.Store is not the injected store")
	}
	hs, ok, err := store.LoadHardState(mem)
	if err != nil || !ok || hs.Installed.Gen != gen {
		t.Fatalf("hard state in the injected store: %+v ok %v err %v; want installed gen %d", hs, ok, err, gen)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if _, _, err := store.LoadHardState(mem); err != nil {
		t.Fatalf("the node closed a store it did not open: %v", err)
	}
	if n2, err := startSolo(t, 2, mem); err == nil || !strings.Contains(err.Error(), "belongs to node 1") {
		if n2 != nil {
			n2.Close()
		}
		t.Fatalf("node 2 on node 1's store: %v", err)
	}

	mem.Crash()
	again, err := mem.Reopen()
	if err != nil {
		t.Fatal(err)
	}
	defer again.Close()
	n, err = startSolo(t, 1, again)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if st := n.Status(); st.View.Gen < gen {
		t.Fatalf("restarted with view %d, had installed %d", st.View.Gen, gen)
	}
	waitSolo(t, n)
}

// A configuration with an injected store needs no data directory.
func TestConfigValidateInjectedStore(t *testing.T) {
	c := StorageLANConfig()
	c.ID, c.Quorum, c.ClusterKey, c.Fencer = 1, ddraid.Config{DataNodes: []NodeID{1}, Quorum: 1}, testKey, &fence.TestFencer{}
	c.DLMListenAddr = "127.0.0.1:0"
	if err := c.validate(); err == nil || !strings.Contains(err.Error(), "DataDir") {
		t.Fatalf("neither DataDir nor Store: %v", err)
	}
	c.Store = store.NewMem()
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
}

// A store that cannot write stops the agreement before it sends anything
// that depends on the write: the node reports the error, installs no view
// and keeps its lock manager stopped.
func TestStoreWriteFailureStopsNode(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	mem := store.NewMem()
	defer mem.Close()
	disk := errors.New("simulated disk failure")
	// Claimed while the disk worked; it fails when the first view is
	// being agreed.
	if err := store.ClaimNodeID(mem, 1); err != nil {
		t.Fatal(err)
	}
	mem.SetCommitError(disk)
	n, err := startSolo(t, 1, mem)
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	eventually(t, 20*time.Second, func() bool { return n.Status().Err != nil }, "the node to report the store failure")
	st := n.Status()
	if !errors.Is(st.Err, disk) || !st.Stopped || st.View.Gen != 0 || st.Recovered != 0 {
		t.Fatalf("after the store failed: %+v", st)
	}
	if _, ok, _ := store.LoadHardState(mem); ok {
		t.Fatal("a hard state was saved through a failing disk")
	}
}
