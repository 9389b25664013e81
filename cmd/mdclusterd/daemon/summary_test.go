package daemon

import (
	"strings"
	"testing"

	"github.com/mdcluster/mdcluster/ddraid"
)

// TestQuorumSummaryNeverContradictsQuorate: the status's summary line
// agrees with its Quorate line. A restarted or left-behind node sees every
// data node of its old view alive, so the arithmetic alone reads
// "quorate" while the agreement says it may not act in that view.
func TestQuorumSummaryNeverContradictsQuorate(t *testing.T) {
	q := ddraid.Config{DataNodes: []ddraid.NodeID{1, 2, 3}, Quorum: 2}
	all := q.Evaluate([]ddraid.NodeID{1, 2, 3})
	one := q.Evaluate([]ddraid.NodeID{2})
	for _, tc := range []struct {
		name    string
		ev      ddraid.Status
		quorate bool
		want    string
		wantNot string
	}{
		{"quorate", all, true, "3 of 3 data nodes present (need 2): quorate", ""},
		{"too few alive", one, false, "1 of 3 data nodes present (need 2): not quorate", ""},
		{"enough alive, stale view", all, false, "but this node is not quorate in it", "): quorate"},
	} {
		got := quorumSummary(tc.ev, tc.quorate, 7)
		if !strings.Contains(got, tc.want) || (tc.wantNot != "" && strings.Contains(got, tc.wantNot)) {
			t.Errorf("%s: summary %q, want it to contain %q and not %q", tc.name, got, tc.want, tc.wantNot)
		}
		if !tc.quorate && strings.HasSuffix(got, ": quorate") {
			t.Errorf("%s: summary %q says quorate while the node is not", tc.name, got)
		}
	}
	if got := quorumSummary(all, false, 7); !strings.Contains(got, "view 7") {
		t.Errorf("stale-view summary %q does not name the view", got)
	}
}
