// Package ddraid holds the quorum rules of an mdcluster cluster and the shape of
// a ddraid array.
//
// mdcluster has no separate voting service. The nodes that hold array data are
// the voters: the cluster may grant locks and touch array data only while at
// least m of its n data nodes are in the agreed view. Nodes that hold no data
// (clients, management nodes) may be members of the cluster but never count
// towards quorum, so they can come and go without affecting safety.
//
// The package is pure: no I/O, no goroutines, no clock. The same code answers
// "are we quorate?" in the daemon and in the deterministic simulator.
package ddraid

import (
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// NodeID identifies a cluster node. It is the same number the DLM and the
// membership layer use. Zero is reserved (see NoNode) so that a forgotten field
// can never silently name a real node.
type NodeID uint32

// NoNode is the zero NodeID. It names no node: it is refused in configurations
// and means "none" where a NodeID is optional (Config.TieBreaker).
const NoNode NodeID = 0

// String formats the ID as a decimal number, the way logs and agents expect it.
func (id NodeID) String() string { return strconv.FormatUint(uint64(id), 10) }

// Errors returned (wrapped, with the offending values) by Config.Validate. Test
// for them with errors.Is; the message of the returned error says what exactly
// is wrong and how to fix it.
var (
	// ErrNoDataNodes: a cluster without data nodes has nothing to protect and
	// nobody to vote.
	ErrNoDataNodes = errors.New("no data nodes configured")
	// ErrQuorumRange: m must satisfy 1 ≤ m ≤ n. m = 0 would make every view,
	// even an empty one, quorate; m > n could never be met.
	ErrQuorumRange = errors.New("quorum out of range")
	// ErrSplitBrain: m is not a strict majority of n and no tie-breaker is
	// configured, so two disjoint partitions could both be quorate and both
	// write to the array.
	ErrSplitBrain = errors.New("quorum is not a strict majority (split brain possible)")
	// ErrInvalidNodeID: a node ID is NoNode (0).
	ErrInvalidNodeID = errors.New("invalid node ID")
	// ErrDuplicateNode: a node is listed twice in the same role. Counting it
	// twice would overstate the number of voters.
	ErrDuplicateNode = errors.New("duplicate node ID")
	// ErrDataAndNonData: a node is listed as both a data node and a non-data
	// node; its vote would be ambiguous.
	ErrDataAndNonData = errors.New("node is both a data node and a non-data node")
	// ErrTieBreaker: the tie-breaker is not one of the data nodes.
	ErrTieBreaker = errors.New("invalid tie-breaker")
)

// Config is a cluster's quorum configuration: which nodes hold array data,
// how many of them must be present, and which other nodes may join.
//
// The zero value is not valid; call Validate after building a Config (from a
// config file, the state store or Shape.Config) and refuse to start on error.
// Quorate treats an invalid Config as never quorate, so a bad configuration
// stops the cluster instead of letting it run unprotected.
type Config struct {
	// DataNodes are the n nodes that hold array data (data or parity). Only
	// they vote. The order does not matter.
	DataNodes []NodeID
	// Quorum is m: the number of data nodes that must be in the agreed view
	// before locks may be granted or array data touched.
	Quorum int
	// NonDataNodes are nodes that may be members of the cluster without
	// holding data (clients, management). They never count towards quorum.
	// Listing them is optional; it exists so that a node cannot be configured
	// in both roles by mistake.
	NonDataNodes []NodeID
	// TieBreaker, when not NoNode, is a data node that breaks an exact half
	// split. It is required when 2m = n (n even, m = n/2): of two halves of n/2
	// data nodes each, only the half containing the tie-breaker is quorate.
	// With 2m > n it is allowed and has no effect (a tie is then impossible).
	TieBreaker NodeID
}

// Validate checks the configuration and returns every problem it finds (joined
// with errors.Join), each wrapping one of the Err* values above. A nil result
// means that two disjoint sets of nodes can never both be quorate.
func (c Config) Validate() error {
	var errs []error
	n := len(c.DataNodes)
	if n == 0 {
		errs = append(errs, fmt.Errorf("ddraid: %w", ErrNoDataNodes))
	}
	data := make(map[NodeID]bool, n)
	for _, id := range c.DataNodes {
		switch {
		case id == NoNode:
			errs = append(errs, fmt.Errorf("ddraid: data node %s: %w (0 is reserved)", id, ErrInvalidNodeID))
		case data[id]:
			errs = append(errs, fmt.Errorf("ddraid: data node %s listed twice: %w", id, ErrDuplicateNode))
		}
		data[id] = true
	}
	nonData := make(map[NodeID]bool, len(c.NonDataNodes))
	for _, id := range c.NonDataNodes {
		switch {
		case id == NoNode:
			errs = append(errs, fmt.Errorf("ddraid: non-data node %s: %w (0 is reserved)", id, ErrInvalidNodeID))
		case nonData[id]:
			errs = append(errs, fmt.Errorf("ddraid: non-data node %s listed twice: %w", id, ErrDuplicateNode))
		case data[id]:
			errs = append(errs, fmt.Errorf("ddraid: node %s: %w", id, ErrDataAndNonData))
		}
		nonData[id] = true
	}
	m := c.Quorum
	rangeOK := n > 0 && m >= 1 && m <= n
	if n > 0 && !rangeOK {
		errs = append(errs, fmt.Errorf("ddraid: quorum %d with %d data nodes: %w (need 1 ≤ m ≤ %d)", m, n, ErrQuorumRange, n))
	}
	if c.TieBreaker != NoNode && !data[c.TieBreaker] {
		errs = append(errs, fmt.Errorf("ddraid: tie-breaker %s is not a data node: %w", c.TieBreaker, ErrTieBreaker))
	}
	if rangeOK {
		switch {
		case 2*m < n:
			// A tie-breaker only settles an exact half split; below half, two
			// disjoint minorities could each reach m.
			errs = append(errs, fmt.Errorf("ddraid: quorum %d of %d data nodes is less than half: %w; use m ≥ %d", m, n, ErrSplitBrain, n/2+1))
		case 2*m == n && c.TieBreaker == NoNode:
			errs = append(errs, fmt.Errorf("ddraid: quorum %d of %d data nodes is exactly half: %w; use m = %d or configure a tie-breaker data node", m, n, ErrSplitBrain, n/2+1))
		}
	}
	return errors.Join(errs...)
}

// Status is the outcome of evaluating a view against a Config, kept as data so
// that callers can both act on it and log it.
type Status struct {
	// Present is the number of distinct data nodes in the view.
	Present int
	// DataNodes is n.
	DataNodes int
	// Need is m.
	Need int
	// TieBreaker is the configured tie-breaker (NoNode if none).
	TieBreaker NodeID
	// TieBreakerPresent reports whether the tie-breaker is in the view.
	TieBreakerPresent bool
	// Invalid is set when the Config failed validation; such a config is never
	// quorate.
	Invalid bool
	// Quorate is the verdict.
	Quorate bool
}

// String renders the status for logs, e.g.
// "3 of 5 data nodes present (need 3): quorate".
func (s Status) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%d of %d data nodes present (need %d", s.Present, s.DataNodes, s.Need)
	if s.TieBreaker != NoNode {
		state := "absent"
		if s.TieBreakerPresent {
			state = "present"
		}
		fmt.Fprintf(&b, ", tie-breaker %s %s", s.TieBreaker, state)
	}
	b.WriteString("): ")
	switch {
	case s.Invalid:
		b.WriteString("invalid configuration, not quorate")
	case s.Quorate:
		b.WriteString("quorate")
	default:
		b.WriteString("not quorate")
	}
	return b.String()
}

// Evaluate counts the data nodes in view and decides whether the view is
// quorate. view may contain non-data nodes, unknown nodes and duplicates: only
// distinct configured data nodes are counted, so a caller's bookkeeping error
// cannot inflate the count.
//
// The rule, for a valid config: a view is quorate iff it holds at least m data
// nodes and either more than half of all n data nodes, or exactly half of them
// including the tie-breaker. Because validation demands 2m ≥ n, "at least m"
// together with the half rule is what keeps two disjoint views from both being
// quorate.
func (c Config) Evaluate(view []NodeID) Status {
	s := Status{DataNodes: len(c.DataNodes), Need: c.Quorum, TieBreaker: c.TieBreaker}
	data := make(map[NodeID]bool, len(c.DataNodes))
	for _, id := range c.DataNodes {
		data[id] = true
	}
	seen := make(map[NodeID]bool, len(view))
	for _, id := range view {
		if data[id] && !seen[id] {
			seen[id] = true
			s.Present++
		}
	}
	s.TieBreakerPresent = c.TieBreaker != NoNode && seen[c.TieBreaker]
	if c.Validate() != nil {
		s.Invalid = true
		return s
	}
	n := s.DataNodes
	majority := 2*s.Present > n
	tieWon := 2*s.Present == n && s.TieBreakerPresent
	s.Quorate = s.Present >= c.Quorum && (majority || tieWon)
	return s
}

// Quorate reports whether the agreed view may grant locks and touch array
// data. It is false for an invalid Config.
func (c Config) Quorate(view []NodeID) bool { return c.Evaluate(view).Quorate }

// Describe is Evaluate(view).String(): one log line explaining the verdict.
func (c Config) Describe(view []NodeID) string { return c.Evaluate(view).String() }

// IsDataNode reports whether id is one of the configured data nodes (and so a
// voter).
func (c Config) IsDataNode(id NodeID) bool {
	return id != NoNode && slices.Contains(c.DataNodes, id)
}

// String summarises the configuration for logs and error messages, with the
// node lists sorted.
func (c Config) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "quorum %d of %d data nodes %s", c.Quorum, len(c.DataNodes), formatIDs(c.DataNodes))
	if len(c.NonDataNodes) > 0 {
		fmt.Fprintf(&b, ", non-data nodes %s", formatIDs(c.NonDataNodes))
	}
	if c.TieBreaker != NoNode {
		fmt.Fprintf(&b, ", tie-breaker %s", c.TieBreaker)
	}
	return b.String()
}

func formatIDs(ids []NodeID) string {
	s := slices.Clone(ids)
	slices.Sort(s)
	parts := make([]string, len(s))
	for i, id := range s {
		parts[i] = id.String()
	}
	return "[" + strings.Join(parts, " ") + "]"
}
