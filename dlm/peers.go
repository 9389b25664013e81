package dlm

import (
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/mdcluster/mdcluster/dlm/transport"
)

// MaxPeers bounds how many other nodes' addresses a Node keeps. Addresses
// arrive at runtime (mdcluster/node learns them from gossip), so the table
// needs a bound even though only holders of the cluster key can publish
// one; it is far above any real cluster.
const MaxPeers = 1024

// peerTable is a Node's address book and the transport peer set derived
// from it. The transport must know every member of the current view (or
// their messages, including recovery's, would be refused) and every node
// with a known address (so that it is connected before a view includes it);
// it keeps a member whose address is unknown with an empty address, which
// queues its frames until SetPeer gives one. mu is a leaf lock: no other
// lock of the Node is taken under it (the transport's own are).
type peerTable struct {
	mu      sync.Mutex
	addrs   map[NodeID]string // known addresses: Config.Peers, then SetPeer/ForgetPeer
	members []NodeID          // the current view, as last given to admitMembers
	inTr    map[NodeID]bool   // the transport's peer set
}

// initPeers fills the table from the configured peers, which NewNode gave
// to the transport.
func (n *Node) initPeers(peers map[NodeID]string) {
	n.peers.addrs = maps.Clone(peers)
	if n.peers.addrs == nil {
		n.peers.addrs = map[NodeID]string{}
	}
	n.peers.inTr = map[NodeID]bool{}
	for id := range peers {
		n.peers.inTr[id] = true
	}
	n.peers.members = slices.Clone(n.members)
}

// SetPeer records addr ("host:port") as node id's transport address, adding
// the node as a peer or changing its address. This is how a cluster grows
// without restarting its nodes: mdcluster/node calls it with the addresses
// nodes publish through gossip. A new peer is connected at once, before any
// view includes it; a changed address is used at once (see
// transport.Transport.SetPeer). It needs a transport: a Node created
// without ListenAddr or Listener refuses. An invalid ID or address, or a
// new node beyond MaxPeers, is refused and changes nothing.
func (n *Node) SetPeer(id NodeID, addr string) error {
	if err := n.checkPeerID(id); err != nil {
		return fmt.Errorf("node %d: set peer %d: %w", n.id, id, err)
	}
	if addr == "" {
		return fmt.Errorf("node %d: set peer %d: %w: empty address (ForgetPeer forgets one)", n.id, id, ErrInvalid)
	}
	if err := transport.CheckAddr(addr); err != nil {
		return fmt.Errorf("node %d: set peer %d: %w: %w", n.id, id, ErrInvalid, err)
	}
	pt := &n.peers
	pt.mu.Lock()
	defer pt.mu.Unlock()
	old, known := pt.addrs[id]
	if known && old == addr {
		return nil
	}
	if !known && len(pt.addrs) >= MaxPeers {
		return fmt.Errorf("node %d: set peer %d: %w: already %d peers (MaxPeers)", n.id, id, ErrInvalid, MaxPeers)
	}
	if err := n.tr.SetPeer(transport.NodeID(id), addr); err != nil {
		return fmt.Errorf("node %d: set peer %d: %w", n.id, id, err)
	}
	pt.addrs[id] = addr
	pt.inTr[id] = true
	if known {
		n.log.Info("peer address changed", "peer", id, "old_addr", old, "addr", addr)
	} else {
		n.log.Info("peer address learned", "peer", id, "addr", addr)
	}
	return nil
}

// ForgetPeer drops node id's address (e.g. it left the cluster). A node
// that is not a member of the current view is removed from the transport
// at once: its connection closes and what was queued for it is dropped. A
// member stays a transport peer, with its last address, until a view
// without it is recovered: recovery may still be talking to it, and a
// member that comes back is only a SetPeer away. Forgetting an unknown node
// does nothing.
func (n *Node) ForgetPeer(id NodeID) error {
	if err := n.checkPeerID(id); err != nil {
		return fmt.Errorf("node %d: forget peer %d: %w", n.id, id, err)
	}
	pt := &n.peers
	pt.mu.Lock()
	defer pt.mu.Unlock()
	addr, known := pt.addrs[id]
	if !known {
		return nil
	}
	delete(pt.addrs, id)
	if slices.Contains(pt.members, id) {
		n.log.Info("peer address forgotten; kept as a member of the current view", "peer", id, "addr", addr)
		return nil
	}
	n.tr.RemovePeer(transport.NodeID(id))
	delete(pt.inTr, id)
	n.log.Info("peer forgotten", "peer", id, "addr", addr)
	return nil
}

// PeerAddrs returns the known addresses of the other nodes (configured and
// set since), for diagnostics and tests. Members of the view whose address
// is not known yet are not listed.
func (n *Node) PeerAddrs() map[NodeID]string {
	n.peers.mu.Lock()
	defer n.peers.mu.Unlock()
	return maps.Clone(n.peers.addrs)
}

func (n *Node) checkPeerID(id NodeID) error {
	if n.tr == nil {
		return fmt.Errorf("%w: this node has no transport (configure ListenAddr or Listener)", ErrInvalid)
	}
	if id == 0 || id == n.id {
		return fmt.Errorf("%w: peer ID %d", ErrInvalid, id)
	}
	return nil
}

// admitMembers makes the transport's peer set match a new view: every
// member is a peer (with an empty address where none is known yet, so
// that messages to it wait in the transport instead of being refused), and
// a peer that is neither a member nor has a known address is removed.
// Recover calls it before recovery sends anything.
func (n *Node) admitMembers(members []NodeID) {
	if n.tr == nil {
		return
	}
	pt := &n.peers
	pt.mu.Lock()
	defer pt.mu.Unlock()
	pt.members = slices.Clone(members)
	for _, id := range members {
		if id == n.id || pt.inTr[id] {
			continue
		}
		// addrs has no entry for it either: every known address is in
		// the transport.
		if err := n.tr.SetPeer(transport.NodeID(id), ""); err != nil {
			n.log.Error("cannot add a member to the transport; messages to it are refused", "peer", id, "err", err)
			continue
		}
		pt.inTr[id] = true
		n.log.Info("member's address not known yet: messages to it wait until it is", "peer", id)
	}
	for id := range pt.inTr {
		if _, known := pt.addrs[id]; !known && !slices.Contains(members, id) {
			n.tr.RemovePeer(transport.NodeID(id))
			delete(pt.inTr, id)
			n.log.Info("peer removed: neither a member nor an address known", "peer", id)
		}
	}
}
