package array

import (
	"testing"
)

// TestClusterCreateAssemble is clustermd_tests' 00r1_Create: create on
// node 1 (with --assume-clean), assemble on nodes 2 and 3; every node runs
// the same members, nothing resyncs.
func TestClusterCreateAssemble(t *testing.T) {
	c := newTCluster(t, 3)
	c.createAndAssemble(true, 2, "a.img", "b.img")
	got := c.agree("")
	for _, id := range c.ids {
		st := c.nodes[id].m.Status()
		if st.Phase != PhaseRunning || !st.Clean || st.Bitmap != BitmapClustered || st.Nodes != 4 {
			t.Fatalf("node %d: %+v", id, st)
		}
	}
	t.Logf("members everywhere: %s", got)
}
