package node

import (
	"fmt"
	"time"
)

// EventKind says what an Event reports.
type EventKind int

const (
	// EventAlive: the failure detector's alive set changed (Nodes, self
	// included). A node missing from it has been declared dead by gossip.
	EventAlive EventKind = iota + 1
	// EventQuorum: the local quorum status changed (Quorate). On false the
	// DLM has been stopped.
	EventQuorum
	// EventStop: a view change began (Gen is the attempt's ballot, Nodes
	// its intended members); the DLM has been stopped.
	EventStop
	// EventFence: a fence attempt ended (Nodes holds the victim, Gen the
	// view it was fenced for, Err the failure if any).
	EventFence
	// EventInstall: a view was installed (Gen, Nodes = members) and DLM
	// recovery started (Err if it could not start).
	EventInstall
	// EventRecovered: every lockspace finished recovering into view Gen;
	// locks are being granted again.
	EventRecovered
)

// String names the kind, as in logs and the process tests' event lines.
func (k EventKind) String() string {
	switch k {
	case EventAlive:
		return "alive"
	case EventQuorum:
		return "quorum"
	case EventStop:
		return "stop"
	case EventFence:
		return "fence"
	case EventInstall:
		return "install"
	case EventRecovered:
		return "recovered"
	}
	return fmt.Sprintf("event(%d)", int(k))
}

// Event is one step of the node's membership machinery, reported through
// Config.OnEvent so that a daemon can export metrics (time to detect, to
// fence, to recover) and tests can measure them without parsing logs.
type Event struct {
	Kind    EventKind
	Time    time.Time
	Gen     uint64
	Nodes   []NodeID
	Quorate bool
	Err     error
}
