package dlm

import (
	"slices"

	"github.com/mdcluster/mdcluster/dlm/transport"
)

// Read-only views of a Node for the daemon's control socket and metrics
// (cmd/mdclusterd): which lockspaces exist, what each holds, and what the
// transport did. They take the same locks as the lock calls for a moment
// and change nothing, so a diagnostic request can never alter locking.

// Lockspaces returns the names of the lockspaces opened on this node,
// sorted. A lockspace stays listed after its last handle is released (its
// resources may still be mastered here), as long as the node runs.
func (n *Node) Lockspaces() []string {
	n.mu.Lock()
	names := make([]string, 0, len(n.spaces))
	for name := range n.spaces {
		names = append(names, name)
	}
	n.mu.Unlock()
	slices.Sort(names)
	return names
}

// DumpLockspace describes the named lockspace as Lockspace.Dump does,
// without needing a handle to it (a diagnostic tool holds none), and false
// if no lockspace of that name was opened on this node.
func (n *Node) DumpLockspace(name string) ([]ResourceInfo, bool) {
	n.mu.Lock()
	sp := n.spaces[name]
	n.mu.Unlock()
	if sp == nil {
		return nil, false
	}
	sp.mu.Lock()
	defer sp.mu.Unlock()
	return sp.sp.Dump(), true
}

// TransportStats returns the node-to-node transport's counters, and false
// for a cluster of one (no transport).
func (n *Node) TransportStats() (transport.Stats, bool) {
	if n.tr == nil {
		return transport.Stats{}, false
	}
	return n.tr.Stats(), true
}

// PeerStatus returns the transport's view of peer id (address, whether an
// authenticated connection is up, frames not yet acknowledged), and false
// if id is not a transport peer or the node has no transport.
func (n *Node) PeerStatus(id NodeID) (transport.PeerStatus, bool) {
	if n.tr == nil {
		return transport.PeerStatus{}, false
	}
	return n.tr.PeerStatus(transport.NodeID(id))
}
