package transport

import (
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"time"
)

// NodeID names a storage node in the cluster. It is a plain uint32 so this
// package stays independent of the dlm package; zero is not a valid node.
type NodeID uint32

// LockspaceID names a lockspace; the transport only uses it to look up the
// lockspace's current generation.
type LockspaceID uint32

// Handler receives the data frames of every peer.
//
// Calls for one peer are serialised and come in the peer's sending order;
// calls for different peers may run concurrently. payload is only valid until
// the handler returns: it points into the connection's read buffer, so a
// handler that keeps the bytes must copy them. The handler runs on the path
// that reads the peer's connection, so while it blocks nothing more is read
// from that peer (TCP flow control pushes back on the sender); it may call
// Send, but must not call Close.
type Handler func(from NodeID, ls LockspaceID, gen uint64, payload []byte)

// Config configures a Transport. Start from DefaultConfig and fill in the
// node's identity; zero durations and sizes are replaced by the defaults.
type Config struct {
	// NodeID is this node's ID (non-zero).
	NodeID NodeID
	// ListenAddr is the TCP address to listen on for peers with lower IDs,
	// e.g. "10.0.0.1:7410" or "127.0.0.1:0". Ignored when Listener is set.
	ListenAddr string
	// Listener, if set, is used instead of listening on ListenAddr; the
	// transport closes it on Close.
	Listener net.Listener
	// Peers maps every other node's ID to its address ("host:port"). It can
	// be changed later with SetPeers, or one peer at a time with SetPeer and
	// RemovePeer, so a cluster can grow without restarting its nodes.
	Peers map[NodeID]string
	// ClusterKey is the secret shared by all nodes; the handshake proves
	// knowledge of it. At least MinKeyLen bytes.
	ClusterKey []byte
	// Incarnation identifies this run of the node. Zero picks a random one,
	// which is what a daemon wants: a restart must look different to peers so
	// they reset their sequence state instead of discarding our new frames as
	// duplicates.
	Incarnation uint64
	// Handler receives data frames; required.
	Handler Handler
	// BatchDone, if set, is called by the reader of from's connection when
	// it has handled every frame it had whole in memory, before it waits
	// for the network again (and at least every AckEvery frames of a
	// stream that never pauses). A handler may hold back what it sends in
	// reply to each frame and send it all here: replies to a burst of
	// frames then leave in one write instead of one write each. It runs on
	// the reader, like Handler, and must not block.
	BatchDone func(from NodeID)
	// Logger receives connection events and protocol errors; nil means
	// slog.Default().
	Logger *slog.Logger

	// DialTimeout bounds a TCP connect.
	DialTimeout time.Duration
	// HandshakeTimeout bounds the whole authentication exchange.
	HandshakeTimeout time.Duration
	// MaxFrameSize is the largest payload accepted or sent, in bytes. A peer
	// announcing more is treated as malformed.
	MaxFrameSize int
	// ReconnectMin and ReconnectMax bound the exponential back-off between
	// failed connection attempts. The first attempt after losing an
	// established connection is immediate.
	ReconnectMin, ReconnectMax time.Duration
	// AckDelay is how long a received frame may wait for an outgoing data
	// frame to carry its acknowledgement before a standalone ack is sent.
	AckDelay time.Duration
	// AckEvery sends an acknowledgement at once when this many received
	// frames are unacknowledged, bounding the peer's resend buffer.
	AckEvery int
	// MaxWriteBatch is the most bytes coalesced into one write.
	MaxWriteBatch int
	// ReadBufferSize is the size of each connection's read buffer; payloads
	// that fit are handed to the handler without copying.
	ReadBufferSize int
	// PeerTimeout is how long a connection may go without any sign of life
	// from the kernel's point of view (TCP keepalive on an idle connection,
	// unacknowledged data on a busy one) before it is declared dead.
	PeerTimeout time.Duration
	// MaxUnaddressedQueue bounds the bytes (frames with their headers)
	// queued for a peer whose address is not known yet (SetPeer with ""),
	// beyond which Send refuses with ErrQueueFull. Such a peer may never
	// become reachable, and without a bound whatever is sent to it would
	// accumulate for as long as it stays in the peer set. Queues of peers
	// with an address are bounded by the lock manager (see docs/transport.md).
	MaxUnaddressedQueue int
	// MaxUnackedBytes bounds the bytes (frames with their headers) queued
	// for a peer with an address and not yet acknowledged by it: a peer
	// that stopped reading, or is unreachable, cannot make this node
	// buffer without limit. Past the bound Send refuses with ErrQueueFull
	// (counted in Stats.Dropped.Backlog); see docs/transport.md.
	MaxUnackedBytes int
	// MaxHandshakes bounds the connections accepted and not yet
	// authenticated; more are closed at once (Stats.HandshakesRefused).
	// Each costs one goroutine and a few hundred bytes until it
	// authenticates or HandshakeTimeout ends it; the read buffer is only
	// allocated after authentication.
	MaxHandshakes int
	// KeepCurrentGeneration addresses frames to a node in a generation
	// rather than to one run of it. When a peer comes back as a new
	// incarnation, the frames still unacknowledged by the old one are
	// normally dropped (Stats.Dropped.PeerRestarted). With this set, those
	// whose generation is at least their lockspace's current one
	// (SetGeneration) are kept and sent first on the new stream; older ones
	// are dropped. The lock manager under membership control sets it: its
	// messages belong to a view, and the view that readmits a restarted node
	// is agreed with its new run, which must get every message of that view
	// even if they were queued before its connection came up.
	KeepCurrentGeneration bool
	// LogInterval is the least time between two log lines about the same
	// kind of failure (per peer once authenticated); the lines in between
	// are counted and the count reported with the next one.
	LogInterval time.Duration
}

// MinKeyLen is the shortest cluster key accepted, in bytes.
const MinKeyLen = 16

// DefaultConfig returns a Config with every tunable set to its default. The
// caller fills in NodeID, ListenAddr, Peers, ClusterKey and Handler.
func DefaultConfig() Config {
	return Config{
		DialTimeout:      3 * time.Second,
		HandshakeTimeout: 5 * time.Second,
		MaxFrameSize:     1 << 20,
		ReconnectMin:     100 * time.Millisecond,
		ReconnectMax:     2 * time.Second,
		AckDelay:         5 * time.Millisecond,
		AckEvery:         64,
		MaxWriteBatch:    256 << 10,
		ReadBufferSize:   64 << 10,
		PeerTimeout:      15 * time.Second,

		MaxUnaddressedQueue: 64 << 20,
		MaxUnackedBytes:     64 << 20,
		MaxHandshakes:       64,
		LogInterval:         time.Second,
	}
}

// withDefaults fills zero tunables from DefaultConfig and checks the
// required fields.
func (c Config) withDefaults() (Config, error) {
	d := DefaultConfig()
	if c.DialTimeout <= 0 {
		c.DialTimeout = d.DialTimeout
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = d.HandshakeTimeout
	}
	if c.MaxFrameSize <= 0 {
		c.MaxFrameSize = d.MaxFrameSize
	}
	if c.ReconnectMin <= 0 {
		c.ReconnectMin = d.ReconnectMin
	}
	if c.ReconnectMax < c.ReconnectMin {
		c.ReconnectMax = max(d.ReconnectMax, c.ReconnectMin)
	}
	if c.AckDelay <= 0 {
		c.AckDelay = d.AckDelay
	}
	if c.AckEvery <= 0 {
		c.AckEvery = d.AckEvery
	}
	if c.MaxWriteBatch <= 0 {
		c.MaxWriteBatch = d.MaxWriteBatch
	}
	if c.ReadBufferSize < HeaderSize+handshakeMaxBody {
		c.ReadBufferSize = d.ReadBufferSize
	}
	if c.PeerTimeout <= 0 {
		c.PeerTimeout = d.PeerTimeout
	}
	if c.MaxUnaddressedQueue <= 0 {
		c.MaxUnaddressedQueue = d.MaxUnaddressedQueue
	}
	if c.MaxUnackedBytes <= 0 {
		c.MaxUnackedBytes = d.MaxUnackedBytes
	}
	if c.MaxHandshakes <= 0 {
		c.MaxHandshakes = d.MaxHandshakes
	}
	if c.LogInterval <= 0 {
		c.LogInterval = d.LogInterval
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.NodeID == 0 {
		return c, fmt.Errorf("transport config: NodeID must be non-zero")
	}
	if len(c.ClusterKey) < MinKeyLen {
		return c, fmt.Errorf("transport config: cluster key is %d bytes, need at least %d", len(c.ClusterKey), MinKeyLen)
	}
	if c.Handler == nil {
		return c, fmt.Errorf("transport config: Handler is required")
	}
	if c.Listener == nil && c.ListenAddr == "" {
		return c, fmt.Errorf("transport config: ListenAddr or Listener is required")
	}
	for id, addr := range c.Peers {
		if id == 0 || id == c.NodeID {
			return c, fmt.Errorf("transport config: invalid peer ID %d", id)
		}
		if err := CheckAddr(addr); err != nil {
			return c, fmt.Errorf("transport config: peer %d: %w", id, err)
		}
	}
	return c, nil
}

// CheckAddr checks that addr can name a peer: "" (address not known yet),
// or "host:port" with a non-empty host and a port from 1 to 65535. It
// checks the syntax only; it does not resolve the host. Addresses come from
// configuration and, through the lock manager, from other nodes, so a bad
// one is refused with a clear error instead of failing every dial later.
func CheckAddr(addr string) error {
	if addr == "" {
		return nil
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("peer address %q: %w", addr, err)
	}
	if host == "" {
		return fmt.Errorf("peer address %q: no host", addr)
	}
	if n, err := strconv.ParseUint(port, 10, 16); err != nil || n == 0 {
		return fmt.Errorf("peer address %q: port must be a number from 1 to 65535", addr)
	}
	return nil
}
