package ddraid

import (
	"errors"
	"testing"
)

func TestGeometry(t *testing.T) {
	tests := []struct {
		k                      int
		data, nodes, quorum    int
		str                    string
		needsTieBreakerForHalf bool
	}{
		{k: 0, data: 1, nodes: 2, quorum: 1, str: "ddraid order 0: 1 data + 1 parity, quorum 1 of 2", needsTieBreakerForHalf: true},
		{k: 1, data: 2, nodes: 3, quorum: 2, str: "ddraid order 1: 2 data + 1 parity, quorum 2 of 3"},
		{k: 2, data: 4, nodes: 5, quorum: 4, str: "ddraid order 2: 4 data + 1 parity, quorum 4 of 5"},
		{k: 3, data: 8, nodes: 9, quorum: 8, str: "ddraid order 3: 8 data + 1 parity, quorum 8 of 9"},
		{k: 6, data: 64, nodes: 65, quorum: 64, str: "ddraid order 6: 64 data + 1 parity, quorum 64 of 65"},
	}
	for _, tt := range tests {
		s, err := Geometry(tt.k)
		if err != nil {
			t.Fatalf("Geometry(%d): %v", tt.k, err)
		}
		if s.Order() != tt.k || s.DataNodes() != tt.data || s.ParityNodes() != 1 || s.Nodes() != tt.nodes || s.Quorum() != tt.quorum {
			t.Errorf("Geometry(%d) = order %d, %d data, %d parity, %d nodes, quorum %d; want %d data, %d nodes, quorum %d",
				tt.k, s.Order(), s.DataNodes(), s.ParityNodes(), s.Nodes(), s.Quorum(), tt.data, tt.nodes, tt.quorum)
		}
		if got := s.String(); got != tt.str {
			t.Errorf("String() = %q, want %q", got, tt.str)
		}
		nodes := make([]NodeID, tt.nodes)
		for i := range nodes {
			nodes[i] = NodeID(10 + i)
		}
		cfg, err := s.Config(nodes, NoNode)
		if tt.needsTieBreakerForHalf {
			if !errors.Is(err, ErrSplitBrain) {
				t.Errorf("order %d without tie-breaker: err = %v, want ErrSplitBrain", tt.k, err)
			}
			cfg, err = s.Config(nodes, nodes[0])
		}
		if err != nil {
			t.Fatalf("order %d: Config: %v", tt.k, err)
		}
		if cfg.Quorum != tt.quorum || len(cfg.DataNodes) != tt.nodes {
			t.Errorf("order %d: Config = %v", tt.k, cfg)
		}
		// Losing one node keeps quorum; losing two does not (for k ≥ 1).
		if !cfg.Quorate(nodes[1:]) && !tt.needsTieBreakerForHalf {
			t.Errorf("order %d: one node down should be quorate: %s", tt.k, cfg.Describe(nodes[1:]))
		}
		if tt.nodes > 2 && cfg.Quorate(nodes[2:]) {
			t.Errorf("order %d: two nodes down should not be quorate: %s", tt.k, cfg.Describe(nodes[2:]))
		}
		nodes[0] = 999
		if cfg.DataNodes[0] == 999 {
			t.Errorf("order %d: Config aliases the caller's slice", tt.k)
		}
	}
}

func TestGeometryOrder0TieBreaker(t *testing.T) {
	s, _ := Geometry(0)
	cfg, err := s.Config(ids(1, 2), 2)
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Quorate(ids(2)) || cfg.Quorate(ids(1)) {
		t.Errorf("mirror with tie-breaker 2: {2} quorate = %v, {1} quorate = %v; want true, false",
			cfg.Quorate(ids(2)), cfg.Quorate(ids(1)))
	}
}

func TestGeometryRefused(t *testing.T) {
	for _, k := range []int{-1, MaxOrder + 1, 64} {
		if _, err := Geometry(k); !errors.Is(err, ErrOrder) {
			t.Errorf("Geometry(%d) err = %v, want ErrOrder", k, err)
		}
	}
	s, _ := Geometry(2)
	if _, err := s.Config(ids(1, 2, 3, 4), NoNode); err == nil {
		t.Errorf("Config with 4 nodes for a 5-node shape: want error")
	}
	if _, err := s.Config(ids(1, 2, 3, 4, 4), NoNode); !errors.Is(err, ErrDuplicateNode) {
		t.Errorf("Config with a duplicate node: err = %v, want ErrDuplicateNode", err)
	}
	var zero Shape
	if zero.Order() != 0 || zero.Nodes() != 2 {
		t.Errorf("zero Shape = %v, want order 0", zero)
	}
}
