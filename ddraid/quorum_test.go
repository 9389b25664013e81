package ddraid

import (
	"errors"
	"strings"
	"testing"
)

func ids(xs ...NodeID) []NodeID { return xs }

func TestValidate(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want []error  // every one must be in the chain; nil means valid
		msg  []string // substrings the message must contain
	}{
		{name: "3 of 5", cfg: Config{DataNodes: ids(1, 2, 3, 4, 5), Quorum: 3}},
		{name: "5 of 5", cfg: Config{DataNodes: ids(1, 2, 3, 4, 5), Quorum: 5}},
		{name: "1 of 1", cfg: Config{DataNodes: ids(7), Quorum: 1}},
		{name: "2 of 2", cfg: Config{DataNodes: ids(1, 2), Quorum: 2}},
		{name: "with non-data nodes", cfg: Config{DataNodes: ids(1, 2, 3), Quorum: 2, NonDataNodes: ids(10, 11)}},
		{name: "half with tie-breaker", cfg: Config{DataNodes: ids(1, 2, 3, 4), Quorum: 2, TieBreaker: 3}},
		{name: "1 of 2 with tie-breaker", cfg: Config{DataNodes: ids(1, 2), Quorum: 1, TieBreaker: 2}},
		{name: "majority with redundant tie-breaker", cfg: Config{DataNodes: ids(1, 2, 3), Quorum: 2, TieBreaker: 1}},
		{
			name: "no data nodes", cfg: Config{Quorum: 1},
			want: []error{ErrNoDataNodes}, msg: []string{"no data nodes"},
		},
		{
			name: "m zero", cfg: Config{DataNodes: ids(1, 2, 3), Quorum: 0},
			want: []error{ErrQuorumRange}, msg: []string{"quorum 0 with 3 data nodes", "1 ≤ m ≤ 3"},
		},
		{
			name: "m negative", cfg: Config{DataNodes: ids(1, 2, 3), Quorum: -1},
			want: []error{ErrQuorumRange},
		},
		{
			name: "m greater than n", cfg: Config{DataNodes: ids(1, 2, 3), Quorum: 4},
			want: []error{ErrQuorumRange}, msg: []string{"quorum 4 with 3 data nodes"},
		},
		{
			name: "exact half without tie-breaker", cfg: Config{DataNodes: ids(1, 2, 3, 4), Quorum: 2},
			want: []error{ErrSplitBrain}, msg: []string{"2 of 4", "exactly half", "use m = 3 or configure a tie-breaker"},
		},
		{
			name: "1 of 2 without tie-breaker", cfg: Config{DataNodes: ids(1, 2), Quorum: 1},
			want: []error{ErrSplitBrain},
		},
		{
			name: "minority even with tie-breaker", cfg: Config{DataNodes: ids(1, 2, 3, 4, 5), Quorum: 2, TieBreaker: 1},
			want: []error{ErrSplitBrain}, msg: []string{"less than half", "m ≥ 3"},
		},
		{
			name: "minority of 4 with tie-breaker", cfg: Config{DataNodes: ids(1, 2, 3, 4), Quorum: 1, TieBreaker: 1},
			want: []error{ErrSplitBrain},
		},
		{
			name: "duplicate data node", cfg: Config{DataNodes: ids(1, 2, 2), Quorum: 2},
			want: []error{ErrDuplicateNode}, msg: []string{"data node 2 listed twice"},
		},
		{
			name: "duplicate non-data node", cfg: Config{DataNodes: ids(1, 2, 3), Quorum: 2, NonDataNodes: ids(9, 9)},
			want: []error{ErrDuplicateNode}, msg: []string{"non-data node 9 listed twice"},
		},
		{
			name: "data and non-data", cfg: Config{DataNodes: ids(1, 2, 3), Quorum: 2, NonDataNodes: ids(3)},
			want: []error{ErrDataAndNonData}, msg: []string{"node 3"},
		},
		{
			name: "zero data node", cfg: Config{DataNodes: ids(0, 1, 2), Quorum: 2},
			want: []error{ErrInvalidNodeID},
		},
		{
			name: "zero non-data node", cfg: Config{DataNodes: ids(1, 2, 3), Quorum: 2, NonDataNodes: ids(0)},
			want: []error{ErrInvalidNodeID},
		},
		{
			name: "tie-breaker not a node", cfg: Config{DataNodes: ids(1, 2, 3, 4), Quorum: 2, TieBreaker: 9},
			want: []error{ErrTieBreaker}, msg: []string{"tie-breaker 9 is not a data node"},
		},
		{
			name: "tie-breaker is a non-data node", cfg: Config{DataNodes: ids(1, 2, 3, 4), Quorum: 2, NonDataNodes: ids(9), TieBreaker: 9},
			want: []error{ErrTieBreaker},
		},
		{
			name: "several problems reported together", cfg: Config{DataNodes: ids(1, 1), Quorum: 3, NonDataNodes: ids(1)},
			want: []error{ErrDuplicateNode, ErrDataAndNonData, ErrQuorumRange},
		},
	}
	all := []error{ErrNoDataNodes, ErrQuorumRange, ErrSplitBrain, ErrInvalidNodeID, ErrDuplicateNode, ErrDataAndNonData, ErrTieBreaker}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.cfg.Validate()
			if len(tt.want) == 0 {
				if err != nil {
					t.Fatalf("Validate() = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Validate() = nil, want %v", tt.want)
			}
			for _, w := range tt.want {
				if !errors.Is(err, w) {
					t.Errorf("Validate() = %v, want it to wrap %v", err, w)
				}
			}
			// No unexpected kinds of error.
			for _, e := range all {
				if errors.Is(err, e) && !containsErr(tt.want, e) {
					t.Errorf("Validate() = %v, unexpectedly wraps %v", err, e)
				}
			}
			for _, s := range tt.msg {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("Validate() message %q does not contain %q", err, s)
				}
			}
		})
	}
}

func containsErr(list []error, e error) bool {
	for _, x := range list {
		if x == e {
			return true
		}
	}
	return false
}

func TestQuorate(t *testing.T) {
	five := Config{DataNodes: ids(1, 2, 3, 4, 5), Quorum: 3, NonDataNodes: ids(20, 21)}
	fourOfFive := Config{DataNodes: ids(1, 2, 3, 4, 5), Quorum: 4}
	tie := Config{DataNodes: ids(1, 2, 3, 4), Quorum: 2, TieBreaker: 3}
	tests := []struct {
		name string
		cfg  Config
		view []NodeID
		want bool
	}{
		{"all present", five, ids(1, 2, 3, 4, 5), true},
		{"exactly m", five, ids(5, 1, 3), true},
		{"m-1", five, ids(1, 2), false},
		{"empty view", five, nil, false},
		{"non-data nodes never count", five, ids(1, 2, 20, 21), false},
		{"unknown nodes never count", five, ids(1, 2, 99, 100, 101), false},
		{"duplicates count once", five, ids(1, 1, 2, 2, 2), false},
		{"majority but below m", fourOfFive, ids(1, 2, 3), false},
		{"m of a supermajority", fourOfFive, ids(1, 2, 3, 4), true},
		{"half with tie-breaker", tie, ids(3, 4), true},
		{"other half without tie-breaker", tie, ids(1, 2), false},
		{"majority without tie-breaker", tie, ids(1, 2, 4), true},
		{"tie-breaker alone", tie, ids(3), false},
		{"invalid config is never quorate", Config{DataNodes: ids(1, 2, 3, 4), Quorum: 2}, ids(1, 2, 3, 4), false},
		{"zero config is never quorate", Config{}, ids(1, 2, 3), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.cfg.Quorate(tt.view); got != tt.want {
				t.Errorf("Quorate(%v) = %v, want %v (%s)", tt.view, got, tt.want, tt.cfg.Describe(tt.view))
			}
		})
	}
}

func TestDescribe(t *testing.T) {
	five := Config{DataNodes: ids(1, 2, 3, 4, 5), Quorum: 3, NonDataNodes: ids(9)}
	tie := Config{DataNodes: ids(1, 2, 3, 4), Quorum: 2, TieBreaker: 3}
	tests := []struct {
		cfg  Config
		view []NodeID
		want string
	}{
		{five, ids(1, 2, 3), "3 of 5 data nodes present (need 3): quorate"},
		{five, ids(1, 2, 9), "2 of 5 data nodes present (need 3): not quorate"},
		{tie, ids(3, 4), "2 of 4 data nodes present (need 2, tie-breaker 3 present): quorate"},
		{tie, ids(1, 2), "2 of 4 data nodes present (need 2, tie-breaker 3 absent): not quorate"},
		{Config{DataNodes: ids(1, 2), Quorum: 1}, ids(1, 2), "2 of 2 data nodes present (need 1): invalid configuration, not quorate"},
	}
	for _, tt := range tests {
		if got := tt.cfg.Describe(tt.view); got != tt.want {
			t.Errorf("Describe(%v) = %q, want %q", tt.view, got, tt.want)
		}
	}
}

func TestConfigString(t *testing.T) {
	c := Config{DataNodes: ids(4, 2, 3, 1), Quorum: 2, NonDataNodes: ids(12, 10), TieBreaker: 3}
	want := "quorum 2 of 4 data nodes [1 2 3 4], non-data nodes [10 12], tie-breaker 3"
	if got := c.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if c.DataNodes[0] != 4 {
		t.Errorf("String() reordered the caller's slice: %v", c.DataNodes)
	}
}

func TestIsDataNode(t *testing.T) {
	c := Config{DataNodes: ids(1, 2, 3), Quorum: 2, NonDataNodes: ids(9)}
	for id, want := range map[NodeID]bool{1: true, 3: true, 9: false, 4: false, NoNode: false} {
		if got := c.IsDataNode(id); got != want {
			t.Errorf("IsDataNode(%d) = %v, want %v", id, got, want)
		}
	}
}

// subsets returns the members of universe selected by the bits of mask.
func subset(universe []NodeID, mask int) []NodeID {
	var s []NodeID
	for i, id := range universe {
		if mask&(1<<i) != 0 {
			s = append(s, id)
		}
	}
	return s
}

// TestNoTwoDisjointQuorums enumerates every configuration over small clusters
// (every n up to maxN, every m including out-of-range ones, every tie-breaker
// choice, with and without a non-data node) and, for each one Validate
// accepts, every pair of disjoint node sets. At most one of the two may be
// quorate. It also checks that Validate is not vacuously strict: every refused
// split-brain configuration really has two disjoint sets each holding m data
// nodes, and every shape of valid config is exercised.
func TestNoTwoDisjointQuorums(t *testing.T) {
	const maxN = 6
	valid, tieCases, refused := 0, 0, 0
	for n := 1; n <= maxN; n++ {
		data := make([]NodeID, n)
		for i := range data {
			data[i] = NodeID(i + 1)
		}
		for _, nonData := range [][]NodeID{nil, {NodeID(100)}} {
			universe := append(append([]NodeID(nil), data...), nonData...)
			for m := 0; m <= n+1; m++ {
				for tb := 0; tb <= n; tb++ {
					cfg := Config{DataNodes: data, Quorum: m, NonDataNodes: nonData, TieBreaker: NodeID(tb)}
					err := cfg.Validate()
					if errors.Is(err, ErrSplitBrain) {
						refused++
						// The refusal was necessary: the first m and the last m
						// data nodes are disjoint (2m ≤ n) and each holds m.
						if 2*m > n {
							t.Fatalf("%v refused as split brain although 2m > n", cfg)
						}
					}
					if err != nil {
						continue
					}
					valid++
					if 2*m == n {
						tieCases++
					}
					checkDisjoint(t, cfg, universe)
				}
			}
		}
	}
	if valid < 50 || tieCases < 5 || refused < 20 {
		t.Fatalf("enumeration too small: %d valid configs, %d tie-breaker cases, %d refused", valid, tieCases, refused)
	}
}

// checkDisjoint walks every assignment of each universe node to A, B or
// neither (3^|universe| pairs of disjoint sets).
func checkDisjoint(t *testing.T, cfg Config, universe []NodeID) {
	t.Helper()
	total := 1
	for range universe {
		total *= 3
	}
	quorate := make(map[int]bool, 1<<len(universe))
	q := func(mask int) bool {
		v, ok := quorate[mask]
		if !ok {
			v = cfg.Quorate(subset(universe, mask))
			quorate[mask] = v
		}
		return v
	}
	for code := 0; code < total; code++ {
		a, b, c := 0, 0, code
		for i := range universe {
			switch c % 3 {
			case 1:
				a |= 1 << i
			case 2:
				b |= 1 << i
			}
			c /= 3
		}
		if q(a) && q(b) {
			t.Fatalf("%v: disjoint views %v and %v are both quorate", cfg, subset(universe, a), subset(universe, b))
		}
	}
	// Sanity: the full view is quorate for every valid config, so the
	// property above is not satisfied by a Quorate that always says false.
	if !q(1<<len(universe) - 1) {
		t.Fatalf("%v: full view %v not quorate", cfg, universe)
	}
}

// TestQuorateMonotone checks that adding nodes to a quorate view never makes
// it non-quorate: a node joining must not take the cluster down.
func TestQuorateMonotone(t *testing.T) {
	cfgs := []Config{
		{DataNodes: ids(1, 2, 3, 4, 5), Quorum: 3, NonDataNodes: ids(6)},
		{DataNodes: ids(1, 2, 3, 4, 5, 6), Quorum: 3, TieBreaker: 2},
		{DataNodes: ids(1, 2, 3, 4, 5, 6), Quorum: 5},
	}
	universe := ids(1, 2, 3, 4, 5, 6)
	for _, cfg := range cfgs {
		for a := 0; a < 1<<len(universe); a++ {
			if !cfg.Quorate(subset(universe, a)) {
				continue
			}
			for i := range universe {
				b := a | 1<<i
				if !cfg.Quorate(subset(universe, b)) {
					t.Fatalf("%v: %v quorate but superset %v not", cfg, subset(universe, a), subset(universe, b))
				}
			}
		}
	}
}

// TestEvaluateDoesNotAliasView makes sure the evaluation does not modify the
// caller's slice (views are shared between goroutines in the runtime).
func TestEvaluateDoesNotAliasView(t *testing.T) {
	cfg := Config{DataNodes: ids(3, 1, 2), Quorum: 2}
	view := ids(3, 2, 1)
	_ = cfg.Evaluate(view)
	if view[0] != 3 || view[1] != 2 || view[2] != 1 || cfg.DataNodes[0] != 3 {
		t.Fatalf("Evaluate modified its inputs: view %v, data nodes %v", view, cfg.DataNodes)
	}
}
