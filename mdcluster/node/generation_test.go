package node

import (
	"context"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// TestOneGeneration: the DLM runs each agreed view under the view's own
// generation, on every node, for the first view as for later ones, and the
// lockspace opened before any view recovers into it and grants.
func TestOneGeneration(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	c := newCluster(t, 1, 2, 3)
	spaces := map[NodeID]*dlm.Lockspace{}
	for id, n := range c.nodes {
		if g := n.DLM().Controller().Generation(); g != 0 && n.Status().View.Gen == 0 {
			t.Fatalf("node %d: DLM at generation %d before any view", id, g)
		}
		ls, err := n.Open("md0", dlm.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		spaces[id] = ls
	}
	gen := c.waitView(20*time.Second, []NodeID{1, 2, 3})
	for id, n := range c.nodes {
		if g := n.DLM().Controller().Generation(); g != gen {
			t.Fatalf("node %d: view %d runs as DLM generation %d", id, gen, g)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	lk, err := spaces[2].Lock(ctx, "res", dlm.EX, 0)
	if err != nil {
		t.Fatalf("lock in view %d: %v", gen, err)
	}
	if err := lk.Unlock(ctx, 0); err != nil {
		t.Fatal(err)
	}
}
