package node

import (
	"fmt"
	"net"

	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/membership/gossip"
)

// Dynamic DLM peers (docs/node.md, "Peers"): every node publishes its DLM
// address in its gossip metadata, and every node hands the addresses it
// learns to its DLM. So a node joins an existing cluster with nothing but
// Seeds, and no node's configuration names it.

// dlmAdvertiseAddr is the DLM address this node publishes: DLMAdvertiseAddr
// if set, else the address the transport listens on, whose host, when it
// is a wildcard (or missing), is replaced by the gossip bind address, the
// address the other nodes already reach this node at.
func dlmAdvertiseAddr(cfg Config, listen net.Addr) (string, error) {
	if cfg.DLMAdvertiseAddr != "" {
		return cfg.DLMAdvertiseAddr, nil
	}
	if listen == nil {
		return "", fmt.Errorf("the lock manager has no transport address to publish")
	}
	host, port, err := net.SplitHostPort(listen.String())
	if err != nil {
		return "", fmt.Errorf("the DLM listen address %q: %w", listen, err)
	}
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = cfg.GossipBindAddr
		if host == "" {
			host = "127.0.0.1" // gossip's default, see gossip.Config.BindAddr
		}
	}
	addr := net.JoinHostPort(host, port)
	if err := gossip.CheckDialAddr(addr); err != nil {
		return "", fmt.Errorf("cannot tell which DLM address to publish (%w); set DLMAdvertiseAddr", err)
	}
	return addr, nil
}

// DLMAdvertiseAddr is the DLM address this node publishes through gossip
// (see Config.DLMAdvertiseAddr).
func (n *Node) DLMAdvertiseAddr() string { return n.dlmAdvertise }

// onMeta is the failure detector's report of another node's verified
// metadata (gossip.Config.OnMeta): a published DLM address goes to the DLM,
// which connects to it (or moves the connection to it). When the node is
// gone from gossip, or publishes no address, its static address (Peers)
// is used again, or the DLM forgets it; a member of the current view stays
// a DLM peer until a view without it (see dlm.Node.ForgetPeer). It runs on
// memberlist's goroutine and only touches the DLM's address book.
func (n *Node) onMeta(id NodeID, m gossip.Meta, gone bool) {
	did := dlm.NodeID(id)
	if !gone && m.DLMAddr != "" {
		if err := n.dlm.SetPeer(did, m.DLMAddr); err != nil {
			n.log.Warn("not using the DLM address a node published", "peer", id, "addr", m.DLMAddr, "err", err)
		}
		return
	}
	if static, ok := n.cfg.Peers[id]; ok {
		if err := n.dlm.SetPeer(did, static); err != nil {
			n.log.Warn("cannot restore a configured DLM address", "peer", id, "addr", static, "err", err)
		}
		return
	}
	if err := n.dlm.ForgetPeer(did); err != nil {
		n.log.Warn("cannot forget a node's DLM address", "peer", id, "err", err)
	}
}
