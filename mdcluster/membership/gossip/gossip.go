// Package gossip is the daemon's side of cluster membership: it runs
// hashicorp/memberlist as the failure detector and message carrier, and a
// Runner that drives the pure membership.Agreement with a ticker and carries
// out what it decides through an apply.Applier (the code the simulator runs
// too), whose lock-manager and storage effects are the daemon's hooks.
//
// memberlist (SWIM gossip) only says who looks alive. It gives no agreement,
// and its leave notification looks the same for a crash and a graceful
// leave; both gaps are closed by the Agreement on top (agreed views, and an
// explicit LEAVE message of our own).
package gossip

import (
	"bytes"
	"context"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"

	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// NodeID is the cluster node ID; memberlist node names are its decimal form.
type NodeID = membership.NodeID

// Profile selects failure-detector timings.
type Profile int

const (
	// LAN is memberlist's DefaultLANConfig: probe every 1 s, suspicion
	// 4 probe intervals. A crashed node is declared dead after about 5-7 s
	// in small clusters. Tolerant of busy hosts and lossy networks.
	LAN Profile = iota
	// Fast is for a dedicated storage LAN between a handful of nodes: probe
	// every 100 ms with a 50 ms timeout, suspicion 2 probe intervals, gossip
	// every 20 ms. A crashed node is declared dead in about 0.3-0.6 s (see
	// docs/membership.md for the measurement). It assumes sub-millisecond
	// round trips and hosts that do not stall gossip goroutines for tens of
	// milliseconds; otherwise expect false suspicions.
	Fast
	// VM is for nodes that are virtual machines on a shared, overcommitted
	// host (or any host that deschedules the daemon for up to about a
	// second): probe every 300 ms with a 200 ms timeout, suspicion 4 probe
	// intervals (1.2 s), gossip every 100 ms. A crashed node is declared
	// dead in about 1.3-2 s. What keeps a healthy but descheduled node in
	// is the suspicion: a late or lost probe only makes the node a
	// suspect, and it refutes the suspicion as soon as it runs again and
	// hears of it; only a node silent for the whole suspicion timeout (plus
	// the failed probe before it, 0.3 s) is declared dead. See
	// docs/membership.md, "Timings".
	VM
)

func (p Profile) String() string {
	switch p {
	case LAN:
		return "lan"
	case Fast:
		return "fast"
	case VM:
		return "vm"
	}
	return fmt.Sprintf("profile(%d)", int(p))
}

// Config describes one node's failure detector.
type Config struct {
	// Self is this node; its memberlist name is the decimal ID.
	Self NodeID
	// BindAddr is the address gossip binds to and advertises (UDP and TCP,
	// same port). Default 127.0.0.1.
	BindAddr string
	// Port is the gossip port; 0 picks a free one (see Detector.Port).
	Port int
	// ClusterKey is the cluster's shared secret (any length, at least 16
	// bytes). Gossip is encrypted and authenticated with a 32-byte key
	// derived from it, so nodes of another cluster cannot join or inject
	// messages.
	ClusterKey []byte
	// Profile selects the timings.
	Profile Profile
	// Logger receives memberlist's own log lines at their level; nil uses
	// slog.Default.
	Logger *slog.Logger
	// Meta is what this node publishes about itself (its DLM address),
	// authenticated with a key derived from ClusterKey; see meta.go. It
	// can be changed later with Detector.SetMeta.
	Meta Meta
	// OnMeta, if set, receives other nodes' verified metadata: when a node
	// joins (before the node is reported alive through onChange, so that
	// whatever the metadata enables is in place before the agreement can
	// count the node) and when its metadata changes (a restart on another
	// address), with gone=false; and with gone=true after a node was
	// declared dead or left. Metadata that fails to verify or decode is
	// logged (once per node and record) and counted, never passed on: the
	// previous record of that node stays in force. Called from memberlist's
	// goroutines, never concurrently, with memberlist's node lock held: it
	// must not block nor call into memberlist.
	OnMeta func(id NodeID, m Meta, gone bool)

	// wrapTransport, if set (tests only), wraps memberlist's UDP/TCP
	// transport, e.g. to hold a node's traffic as a descheduled VM would.
	wrapTransport func(memberlist.Transport) memberlist.Transport
}

// maxBadMetaLogged bounds the nodes whose rejected metadata is remembered
// for rate-limiting its log lines; beyond it rejections are only counted.
const maxBadMetaLogged = 256

// badMetaLogEvery is the least time between two log lines about one node's
// rejected metadata (the first is logged at once; a repeat of the same
// record is never logged again).
const badMetaLogEvery = time.Minute

// badMetaLog remembers the last rejected record of a node that was logged.
type badMetaLog struct {
	sum        [sha256.Size]byte
	at         time.Time
	suppressed uint64 // rejections not logged since
}

// DeriveKey derives memberlist's AES-256 gossip key (memberlist needs 16,
// 24 or 32 bytes) from the cluster key, with a label so that the same
// cluster key can be reused for other purposes without sharing this key.
func DeriveKey(clusterKey []byte) ([]byte, error) {
	if len(clusterKey) < 16 {
		return nil, fmt.Errorf("gossip: cluster key of %d bytes, need at least 16", len(clusterKey))
	}
	k, err := hkdf.Key(sha256.New, clusterKey, nil, "mdcluster gossip v1", 32)
	if err != nil {
		return nil, fmt.Errorf("gossip: deriving gossip key: %w", err)
	}
	return k, nil
}

// MemberlistConfig returns the memberlist configuration for cfg, with no
// delegates set.
func MemberlistConfig(cfg Config) (*memberlist.Config, error) {
	if cfg.Self == 0 {
		return nil, errors.New("gossip: Config.Self is not set")
	}
	key, err := DeriveKey(cfg.ClusterKey)
	if err != nil {
		return nil, err
	}
	mc := memberlist.DefaultLANConfig()
	switch cfg.Profile {
	case LAN:
	case Fast:
		mc.ProbeInterval = 100 * time.Millisecond
		mc.ProbeTimeout = 50 * time.Millisecond
		mc.SuspicionMult = 2           // suspicion timeout 2 × max(1, log10 n) × 100 ms
		mc.SuspicionMaxTimeoutMult = 3 // at most 3× that when waiting for confirmations
		mc.IndirectChecks = 2
		mc.GossipInterval = 20 * time.Millisecond
		mc.GossipNodes = 3
		mc.RetransmitMult = 3
		mc.TCPTimeout = time.Second
		mc.PushPullInterval = 5 * time.Second
		mc.GossipToTheDeadTime = 5 * time.Second
		mc.AwarenessMaxMultiplier = 3 // a struggling node slows its probing to at most 300 ms
	case VM:
		mc.ProbeInterval = 300 * time.Millisecond
		mc.ProbeTimeout = 200 * time.Millisecond
		// Suspicion timeout 4 × max(1, log10 n) × 300 ms: 1.2 s below 10
		// nodes. With 4 the timer waits for 2 confirmations, which a
		// cluster of fewer than 4 nodes cannot give, so it runs at that
		// minimum there; larger clusters start at 3× and shorten it as
		// other nodes confirm.
		mc.SuspicionMult = 4
		mc.SuspicionMaxTimeoutMult = 3
		mc.IndirectChecks = 3
		// Suspicions and refutations travel by gossip: a short interval
		// lets a suspect's refutation reach the others well inside the
		// suspicion timeout.
		mc.GossipInterval = 100 * time.Millisecond
		mc.GossipNodes = 3
		mc.RetransmitMult = 4
		mc.TCPTimeout = 2 * time.Second
		mc.PushPullInterval = 15 * time.Second
		mc.GossipToTheDeadTime = 15 * time.Second
		// Lifeguard: a node that sees itself missing acks (it is the slow
		// one) stretches its own probe interval and timeout up to 8×, so a
		// descheduled prober does not suspect healthy peers.
		mc.AwarenessMaxMultiplier = 8
	default:
		return nil, fmt.Errorf("gossip: unknown profile %d", int(cfg.Profile))
	}
	mc.Name = strconv.FormatUint(uint64(cfg.Self), 10)
	addr := cfg.BindAddr
	if addr == "" {
		addr = "127.0.0.1"
	}
	mc.BindAddr, mc.AdvertiseAddr = addr, addr
	mc.BindPort, mc.AdvertisePort = cfg.Port, cfg.Port
	mc.SecretKey = key
	mc.GossipVerifyIncoming, mc.GossipVerifyOutgoing = true, true
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	mc.Logger = log.New(&slogWriter{l: logger.With("component", "memberlist", "node", cfg.Self)}, "", 0)
	return mc, nil
}

// slogWriter turns memberlist's "[LEVEL] memberlist: ..." lines into slog
// records at the matching level.
type slogWriter struct{ l *slog.Logger }

func (w *slogWriter) Write(p []byte) (int, error) {
	line := string(bytes.TrimSpace(p))
	level := slog.LevelInfo
	for prefix, lv := range map[string]slog.Level{"[DEBUG]": slog.LevelDebug, "[INFO]": slog.LevelInfo,
		"[WARN]": slog.LevelWarn, "[ERR]": slog.LevelError, "[ERROR]": slog.LevelError} {
		if len(line) >= len(prefix) && line[:len(prefix)] == prefix {
			level = lv
			line = string(bytes.TrimSpace([]byte(line[len(prefix):])))
			break
		}
	}
	w.l.Log(context.Background(), level, line)
	return len(p), nil
}

// Detector is one node's memberlist: it keeps the set of nodes memberlist
// believes alive (alive or suspect; memberlist's Members) and carries the
// agreement's messages over memberlist's encrypted TCP channel.
type Detector struct {
	ml   *memberlist.Memberlist
	self NodeID

	mu    sync.Mutex
	alive map[NodeID]bool
	// addrs is each node's gossip address as memberlist last reported it
	// (NotifyJoin, NotifyUpdate: called under memberlist's node lock, so
	// reading the node there is safe). Send uses it instead of the nodes
	// Members returns, whose fields memberlist rewrites without a lock
	// the caller could take (every alive message does).
	addrs    map[NodeID]memberlist.Node
	onChange func([]NodeID)
	onMsg    func(from NodeID, payload []byte)
	log      *slog.Logger

	// Node metadata (meta.go): our record, and what was rejected.
	metaKey      []byte
	onMeta       func(NodeID, Meta, bool)
	metaMu       sync.Mutex
	metaBytes    []byte                 // our encoded record, for NodeMeta
	badMeta      map[NodeID]*badMetaLog // per node, the last rejected record logged
	metaRejected atomic.Uint64
}

// NewDetector starts memberlist for cfg. onChange is called (from
// memberlist's goroutines, never concurrently, and it must not block) with
// the new alive set, Self included, whenever it changes; onMsg receives the
// agreement messages other nodes sent with Send (it must not block either:
// copy and queue).
func NewDetector(cfg Config, onChange func([]NodeID), onMsg func(from NodeID, payload []byte)) (*Detector, error) {
	mc, err := MemberlistConfig(cfg)
	if err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = slog.Default()
	}
	metaKey, err := DeriveMetaKey(cfg.ClusterKey)
	if err != nil {
		return nil, err
	}
	meta, err := EncodeMeta(metaKey, cfg.Self, cfg.Meta)
	if err != nil {
		return nil, err
	}
	d := &Detector{self: cfg.Self, alive: map[NodeID]bool{cfg.Self: true}, onChange: onChange, onMsg: onMsg,
		log: logger.With("node", cfg.Self), metaKey: metaKey, onMeta: cfg.OnMeta, metaBytes: meta,
		badMeta: map[NodeID]*badMetaLog{}}
	mc.Events = (*events)(d)
	mc.Delegate = (*delegate)(d)
	if cfg.wrapTransport != nil {
		nt, err := memberlist.NewNetTransport(&memberlist.NetTransportConfig{
			BindAddrs: []string{mc.BindAddr}, BindPort: mc.BindPort, Logger: mc.Logger})
		if err != nil {
			return nil, fmt.Errorf("gossip: node %s: transport on %s:%d: %w", cfg.Self, mc.BindAddr, mc.BindPort, err)
		}
		if mc.BindPort == 0 {
			mc.BindPort = nt.GetAutoBindPort()
			mc.AdvertisePort = mc.BindPort
		}
		mc.Transport = cfg.wrapTransport(nt)
	}
	ml, err := memberlist.Create(mc)
	if err != nil {
		return nil, fmt.Errorf("gossip: node %s: starting memberlist on %s:%d: %w", cfg.Self, mc.BindAddr, cfg.Port, err)
	}
	d.ml = ml
	return d, nil
}

// Port is the gossip port actually bound.
func (d *Detector) Port() int { return int(d.ml.LocalNode().Port) }

// Addr is "host:port" of this node's gossip endpoint, for other nodes' Join.
func (d *Detector) Addr() string {
	n := d.ml.LocalNode()
	return net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port)))
}

// Join contacts existing nodes ("host:port"); it succeeds if any answered.
func (d *Detector) Join(peers []string) error {
	if _, err := d.ml.Join(peers); err != nil {
		return fmt.Errorf("gossip: node %s: joining %v: %w", d.self, peers, err)
	}
	return nil
}

// Alive returns the current alive set, sorted, Self included.
func (d *Detector) Alive() []NodeID {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.sortedLocked()
}

func (d *Detector) sortedLocked() []NodeID {
	out := make([]NodeID, 0, len(d.alive))
	for id := range d.alive {
		out = append(out, id)
	}
	slices.Sort(out)
	return out
}

// Send delivers an agreement message to node to over memberlist's reliable
// (TCP, encrypted) channel. The message is framed with the sender's ID.
func (d *Detector) Send(to NodeID, payload []byte) error {
	d.mu.Lock()
	n, ok := d.addrs[to]
	d.mu.Unlock()
	if !ok {
		return fmt.Errorf("gossip: node %s: node %s is not known to memberlist", d.self, to)
	}
	msg := binary.BigEndian.AppendUint32(make([]byte, 0, 4+len(payload)), uint32(d.self))
	if err := d.ml.SendReliable(&n, append(msg, payload...)); err != nil {
		return fmt.Errorf("gossip: node %s: sending to %s: %w", d.self, to, err)
	}
	return nil
}

// Leave announces a graceful leave to memberlist and waits up to timeout
// for it to spread. memberlist cannot be rejoined after this: Shutdown, and
// create a new Detector to come back. Note that other nodes cannot tell this
// from a crash; the agreement's own LEAVE message says it was graceful.
func (d *Detector) Leave(timeout time.Duration) error {
	if err := d.ml.Leave(timeout); err != nil {
		return fmt.Errorf("gossip: node %s: leaving: %w", d.self, err)
	}
	return nil
}

// Shutdown stops gossiping at once without telling anyone (to others it
// looks like a crash).
func (d *Detector) Shutdown() error {
	if err := d.ml.Shutdown(); err != nil {
		return fmt.Errorf("gossip: node %s: shutdown: %w", d.self, err)
	}
	return nil
}

// SetMeta publishes a new metadata record for this node (e.g. its DLM
// address changed) and waits up to timeout for memberlist to start
// spreading it; other nodes get it through OnMeta. An invalid record is
// refused and the old one stays.
func (d *Detector) SetMeta(m Meta, timeout time.Duration) error {
	b, err := EncodeMeta(d.metaKey, d.self, m)
	if err != nil {
		return err
	}
	d.metaMu.Lock()
	d.metaBytes = b
	d.metaMu.Unlock()
	if err := d.ml.UpdateNode(timeout); err != nil {
		return fmt.Errorf("gossip: node %s: publishing metadata: %w", d.self, err)
	}
	return nil
}

// MetaRejected counts metadata records of other nodes that failed to
// verify or decode.
func (d *Detector) MetaRejected() uint64 { return d.metaRejected.Load() }

// parseNodeID parses a memberlist node name; false for names that are not
// node IDs (update logs them).
func parseNodeID(n *memberlist.Node) (NodeID, bool) {
	id, err := strconv.ParseUint(n.Name, 10, 32)
	if err != nil || id == 0 {
		return 0, false
	}
	return NodeID(id), true
}

// metaChanged verifies a node's metadata and hands it to OnMeta.
func (d *Detector) metaChanged(n *memberlist.Node) {
	id, ok := parseNodeID(n)
	if !ok || id == d.self {
		return
	}
	m, err := DecodeMeta(d.metaKey, id, n.Meta)
	if err != nil {
		d.rejectMeta(id, n, err)
		return
	}
	d.metaMu.Lock()
	delete(d.badMeta, id) // a later bad record is news again
	d.metaMu.Unlock()
	if d.onMeta != nil {
		d.onMeta(id, m, false)
	}
}

// rejectMeta counts a record that failed and logs it: the first of a node
// at once, a different one at most every badMetaLogEvery, the same one
// never again (memberlist hands a node's record over again with every
// refresh). So a node that keeps publishing bad records costs a line a
// minute at most.
func (d *Detector) rejectMeta(id NodeID, n *memberlist.Node, err error) {
	d.metaRejected.Add(1)
	sum := sha256.Sum256(n.Meta)
	now := time.Now()
	d.metaMu.Lock()
	b := d.badMeta[id]
	var suppressed uint64
	logIt := false
	switch {
	case b == nil && len(d.badMeta) >= maxBadMetaLogged:
		// Too many bad nodes to remember: counted only.
	case b == nil:
		d.badMeta[id] = &badMetaLog{sum: sum, at: now}
		logIt = true
	case b.sum != sum && now.Sub(b.at) >= badMetaLogEvery:
		suppressed = b.suppressed
		*b = badMetaLog{sum: sum, at: now}
		logIt = true
	default:
		b.suppressed++
	}
	d.metaMu.Unlock()
	if logIt {
		d.log.Warn("ignoring a node's gossip metadata: nothing it says is used, and an address it published earlier stays in force",
			"peer", id, "peer_gossip_addr", net.JoinHostPort(n.Addr.String(), strconv.Itoa(int(n.Port))),
			"meta_bytes", len(n.Meta), "not_logged_since_last", suppressed, "err", err)
	}
}

func (d *Detector) update(n *memberlist.Node, alive bool) {
	id, ok := parseNodeID(n)
	if !ok {
		d.log.Warn("ignoring a memberlist node whose name is not a node ID", "name", n.Name)
		return
	}
	d.mu.Lock()
	if d.alive[id] == alive || id == d.self {
		d.mu.Unlock()
		return
	}
	if alive {
		d.alive[id] = true
	} else {
		delete(d.alive, id)
	}
	set := d.sortedLocked()
	d.mu.Unlock()
	d.log.Info("failure detector", "peer", id, "alive", alive, "alive_set", set)
	if d.onChange != nil {
		d.onChange(set)
	}
}

type events Detector

// NotifyJoin hands the node's metadata on before reporting it alive.
func (e *events) NotifyJoin(n *memberlist.Node) {
	d := (*Detector)(e)
	d.noteAddr(n)
	d.metaChanged(n)
	d.update(n, true)
}

// noteAddr records the node's address for Send.
func (d *Detector) noteAddr(n *memberlist.Node) {
	id, ok := parseNodeID(n)
	if !ok {
		return
	}
	d.mu.Lock()
	if d.addrs == nil {
		d.addrs = map[NodeID]memberlist.Node{}
	}
	d.addrs[id] = memberlist.Node{Name: n.Name, Addr: slices.Clone(n.Addr), Port: n.Port}
	d.mu.Unlock()
}

// NotifyLeave reports the node dead, then its metadata gone.
func (e *events) NotifyLeave(n *memberlist.Node) {
	d := (*Detector)(e)
	d.update(n, false)
	if id, ok := parseNodeID(n); ok && id != d.self && d.onMeta != nil {
		d.onMeta(id, Meta{}, true)
	}
}

// NotifyUpdate is memberlist's report of a changed metadata record.
func (e *events) NotifyUpdate(n *memberlist.Node) {
	(*Detector)(e).noteAddr(n)
	(*Detector)(e).metaChanged(n)
}

type delegate Detector

// NodeMeta is this node's metadata record (validated to fit MetaMaxSize
// when it was encoded).
func (g *delegate) NodeMeta(limit int) []byte {
	g.metaMu.Lock()
	defer g.metaMu.Unlock()
	if len(g.metaBytes) > limit {
		g.log.Error("node metadata over memberlist's limit; publishing none", "bytes", len(g.metaBytes), "limit", limit)
		return nil
	}
	return slices.Clone(g.metaBytes)
}

func (g *delegate) NotifyMsg(b []byte) {
	if len(b) < 4 || g.onMsg == nil {
		return
	}
	from := NodeID(binary.BigEndian.Uint32(b))
	g.onMsg(from, slices.Clone(b[4:]))
}

func (g *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (g *delegate) LocalState(join bool) []byte                { return nil }
func (g *delegate) MergeRemoteState(buf []byte, join bool)     {}

var _ io.Writer = (*slogWriter)(nil)
