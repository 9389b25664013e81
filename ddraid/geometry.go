package ddraid

import (
	"errors"
	"fmt"
)

// MaxOrder is the largest ddraid order Geometry accepts: 2^6 = 64 data nodes
// plus one parity node. Larger arrays split every block into fragments too
// small to be worth a network round trip, and a cluster of that size is far
// beyond what the rest of mdcluster is built and tested for.
const MaxOrder = 6

// ErrOrder is returned (wrapped) by Geometry for an order outside 0..MaxOrder.
var ErrOrder = errors.New("ddraid order out of range")

// Shape is the geometry of a ddraid array of order k: every block is split
// into 2^k data fragments, one per data node, plus one parity fragment (their
// XOR) on the parity node. Any 2^k of the 2^k+1 fragments rebuild the block, so
// the array survives the loss of any one node and its quorum is 2^k of 2^k+1.
//
// The zero Shape is order 0. Shapes of other orders come from Geometry, which
// is why the order is not an exported field.
type Shape struct {
	order int
}

// Geometry returns the shape of a ddraid array of order k, 0 ≤ k ≤ MaxOrder.
//
// Order 0 is a two-way mirror (one data node, one parity node holding the
// same bytes). Its quorum of 1 of 2 is exactly half, so a Config built from it
// needs a tie-breaker; every higher order has a strict-majority quorum.
func Geometry(k int) (Shape, error) {
	if k < 0 || k > MaxOrder {
		return Shape{}, fmt.Errorf("ddraid: order %d: %w (want 0..%d)", k, ErrOrder, MaxOrder)
	}
	return Shape{order: k}, nil
}

// Order is k.
func (s Shape) Order() int { return s.order }

// DataNodes is the number of data fragments per block, 2^k.
func (s Shape) DataNodes() int { return 1 << s.order }

// ParityNodes is the number of parity fragments per block, always 1.
func (s Shape) ParityNodes() int { return 1 }

// Nodes is the total number of nodes holding array data, 2^k + 1. All of
// them are data nodes in the quorum sense: each holds part of every block.
func (s Shape) Nodes() int { return s.DataNodes() + s.ParityNodes() }

// Quorum is the number of nodes that must be present, 2^k: enough fragments
// to rebuild every block.
func (s Shape) Quorum() int { return s.DataNodes() }

// String describes the shape for logs, e.g. "ddraid order 2: 4 data + 1 parity, quorum 4 of 5".
func (s Shape) String() string {
	return fmt.Sprintf("ddraid order %d: %d data + %d parity, quorum %d of %d",
		s.order, s.DataNodes(), s.ParityNodes(), s.Quorum(), s.Nodes())
}

// Config builds the quorum configuration of an array of this shape on the
// given nodes (exactly Nodes() of them, in fragment order: data nodes first,
// parity node last) with an optional tie-breaker (NoNode for none), and
// validates it. The returned Config owns a copy of nodes.
func (s Shape) Config(nodes []NodeID, tieBreaker NodeID) (Config, error) {
	if len(nodes) != s.Nodes() {
		return Config{}, fmt.Errorf("ddraid: %s needs %d nodes, got %d", s, s.Nodes(), len(nodes))
	}
	c := Config{
		DataNodes:  append([]NodeID(nil), nodes...),
		Quorum:     s.Quorum(),
		TieBreaker: tieBreaker,
	}
	if err := c.Validate(); err != nil {
		return Config{}, fmt.Errorf("%s: %w", s, err)
	}
	return c, nil
}
