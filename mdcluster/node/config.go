package node

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/dlm/transport"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
	"github.com/mdcluster/mdcluster/mdcluster/membership/gossip"
	"github.com/mdcluster/mdcluster/mdcluster/store"
)

// Config configures one storage node's cluster machinery. Start from a
// profile (DefaultLANConfig or StorageLANConfig), which sets the timings,
// and fill in the node's identity, addresses, quorum, key, data directory
// and fencer.
type Config struct {
	// ID is this node's ID: the same number in the quorum configuration,
	// in gossip (as the memberlist node name) and in the DLM.
	ID NodeID
	// Quorum is the cluster's m-of-n data-node configuration. Every node of
	// the cluster must be given the same one.
	Quorum ddraid.Config
	// Peers optionally maps other nodes to their DLM transport addresses.
	// It is not needed: every node publishes its DLM address through
	// gossip (DLMAdvertiseAddr), so a node learns its peers' addresses as
	// they appear, and a cluster grows by starting a node with Seeds. A
	// static entry is used until gossip says otherwise, and again after the
	// node leaves gossip; it serves tests and peers that publish no address.
	// The DLM keeps connections to every known peer; the agreed view, not
	// this list, decides who takes part in locking.
	Peers map[NodeID]string
	// DLMListenAddr is where the DLM transport accepts peers, e.g.
	// "10.0.0.1:7410". Ignored when DLMListener is set. One of the two is
	// required.
	DLMListenAddr string
	// DLMListener, if set, is used instead of DLMListenAddr (tests listen on
	// port 0 first to learn the address). The node closes it.
	DLMListener net.Listener
	// DLMAdvertiseAddr is the DLM address this node publishes to the others
	// through gossip: where they can dial it. Empty means the address the
	// transport listens on, with a wildcard host (0.0.0.0, ::) replaced by
	// GossipBindAddr (the storage-network address gossip advertises, itself
	// 127.0.0.1 when empty). Set it when the nodes must dial another name
	// or address than that (NAT, a DNS name).
	DLMAdvertiseAddr string
	// GossipBindAddr and GossipPort are the failure detector's endpoint (UDP
	// and TCP, same port; port 0 picks one, see Node.GossipAddr). The
	// address is also advertised to peers, so it must be this node's
	// storage-network address, not a wildcard; empty means 127.0.0.1.
	GossipBindAddr string
	GossipPort     int
	// Seeds are other nodes' gossip endpoints ("host:port") to join at
	// start. The node retries every JoinRetry until one answers, so nodes
	// may start in any order.
	Seeds []string
	// ClusterKey is the cluster's shared secret (at least 16 bytes). It
	// authenticates the DLM transport and, through a derived key, encrypts
	// gossip.
	ClusterKey []byte
	// DataDir holds the state store (badger). It must survive restarts: it
	// keeps the agreement's promise, without which a restarted node could
	// vote twice. Not used when Store is set.
	DataDir string
	// Store, if set, is used as the state store instead of badger in
	// DataDir: a store.Mem in tests and the simulator, or a store the
	// caller opened to share with other layers. It is claimed for ID like a
	// data directory; the node does not close it (its opener does).
	Store store.Store
	// Fencer fences failed nodes (e.g. fence.Levels of fence.Agent and a
	// fence.StampFencer). Required: without a fence no view that removes a
	// failed node can be installed.
	Fencer fence.Fencer
	// FenceTimeout bounds one fence attempt; a timeout is a failure, which
	// the agreement asks for again after FenceRetryTicks.
	FenceTimeout time.Duration

	// Profile selects the failure detector's timings.
	Profile gossip.Profile
	// Tick is the agreement's tick.
	Tick time.Duration
	// PrepareTimeout, RetransmitTicks and FenceRetryTicks are the
	// agreement's timeouts, in ticks (see membership.Config).
	PrepareTimeout  int
	RetransmitTicks int
	FenceRetryTicks int
	// StartupFenceAfter is how long a node that restarted as a member of
	// its persisted view waits for that view's other members to come back
	// before it proposes (as coordinator) a view without them, which fences
	// them (see membership.Config.StartupFenceAfter). Zero or negative:
	// no wait.
	StartupFenceAfter time.Duration
	// JoinRetry is how often the node retries joining Seeds while it knows
	// no other live node.
	JoinRetry time.Duration
	// DLMTick is how often the DLM ages its cached directory entries.
	DLMTick time.Duration
	// Transport tunes the DLM transport (zero fields take its defaults).
	Transport transport.Config

	// Logger receives the node's decision log and its components' logs;
	// nil means slog.Default().
	Logger *slog.Logger
	// OnEvent, if set, is called synchronously for every membership event
	// (for metrics and tests). It must return promptly: most events are
	// reported from the agreement's goroutine.
	OnEvent func(Event)
}

// DefaultLANConfig is the profile for an ordinary LAN or a busy host:
// memberlist's LAN timings (a crashed node is declared dead after about
// 5-7 s), a 50 ms agreement tick with a 1 s prepare timeout, a 3 s
// start-up wait (3 prepare timeouts) for the other members of the
// persisted view after a restart, and a 60 s limit per fence attempt (the
// ClusterLabs agents' usual limit).
func DefaultLANConfig() Config {
	return Config{
		Profile:           gossip.LAN,
		Tick:              50 * time.Millisecond,
		PrepareTimeout:    20,
		RetransmitTicks:   2,
		FenceRetryTicks:   20,
		StartupFenceAfter: 3 * 20 * 50 * time.Millisecond,
		FenceTimeout:      60 * time.Second,
		JoinRetry:         time.Second,
		DLMTick:           time.Second,
	}
}

// StorageLANConfig is the fast profile for a dedicated, lightly loaded
// storage network between a handful of nodes: memberlist probes every
// 100 ms (a crashed node is declared dead in about 0.3-0.6 s), the agreement
// ticks every 10 ms with a 200 ms prepare timeout (and a 600 ms start-up
// wait). A host that stalls for tens of milliseconds will be suspected:
// prefer DefaultLANConfig where a false suspicion (a view change and a
// fence of a healthy node) is worse than slower failover.
func StorageLANConfig() Config {
	c := DefaultLANConfig()
	c.Profile = gossip.Fast
	c.Tick = 10 * time.Millisecond
	c.PrepareTimeout = 20
	c.RetransmitTicks = 3
	c.FenceRetryTicks = 50
	c.StartupFenceAfter = 3 * 20 * 10 * time.Millisecond // 3 prepare timeouts
	c.JoinRetry = 200 * time.Millisecond
	return c
}

// VMConfig is the profile for nodes that are virtual machines on a shared
// or overcommitted host, where a guest may be descheduled for up to about
// a second: memberlist probes every 300 ms and declares a silent node dead
// after a 1.2 s suspicion (about 1.3-2 s after a crash; a node that runs
// again within the suspicion refutes it and stays in), and the agreement
// keeps DefaultLANConfig's 50 ms tick and 1 s prepare timeout, which a
// stalled guest's slow answers do not trip. Between DefaultLANConfig
// (5-7 s) and StorageLANConfig (0.3-0.6 s, which flaps under such stalls).
func VMConfig() Config {
	c := DefaultLANConfig()
	c.Profile = gossip.VM
	return c
}

// validate checks what New cannot default.
func (c *Config) validate() error {
	var errs []error
	if c.ID == ddraid.NoNode {
		errs = append(errs, errors.New("ID is not set"))
	}
	if err := c.Quorum.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("quorum: %w", err))
	}
	for id, addr := range c.Peers {
		if id == ddraid.NoNode || id == c.ID {
			errs = append(errs, fmt.Errorf("peer ID %s is invalid", id))
		}
		if err := transport.CheckAddr(addr); err != nil || addr == "" {
			errs = append(errs, fmt.Errorf("peer %s: DLM address %q is not host:port", id, addr))
		}
	}
	if c.DLMListenAddr == "" && c.DLMListener == nil {
		errs = append(errs, errors.New("neither DLMListenAddr nor DLMListener is set: the lock manager needs a transport address"))
	}
	if c.DLMAdvertiseAddr != "" {
		if err := gossip.CheckDialAddr(c.DLMAdvertiseAddr); err != nil {
			errs = append(errs, fmt.Errorf("DLMAdvertiseAddr: %w", err))
		}
	}
	if len(c.ClusterKey) < 16 {
		errs = append(errs, fmt.Errorf("cluster key of %d bytes, need at least 16", len(c.ClusterKey)))
	}
	if c.DataDir == "" && c.Store == nil {
		errs = append(errs, errors.New("DataDir is not set (nor an injected Store)"))
	}
	if c.Fencer == nil {
		errs = append(errs, errors.New("no Fencer configured: failed nodes could never be fenced"))
	}
	if c.Tick <= 0 || c.FenceTimeout <= 0 || c.JoinRetry <= 0 {
		errs = append(errs, errors.New("the Tick, FenceTimeout and JoinRetry settings must be positive (start from a profile)"))
	}
	return errors.Join(errs...)
}
