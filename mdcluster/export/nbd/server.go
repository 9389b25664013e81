package nbd

import (
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"net"
	"os"
	"sync"
	"time"
)

// ErrServerClosed is returned by Serve, ServeConn and ServeTransmission
// once Close has been called, so a caller's serve loop can tell a shutdown
// from a failure.
var ErrServerClosed = errors.New("nbd: server closed")

// Server serves exports over NBD. Create it with NewServer, hand it
// listeners with Serve (or single connections with ServeConn), and stop it
// with Close. All methods are safe for concurrent use.
type Server struct {
	cfg     Config
	log     *slog.Logger
	plog    *rateLog
	exports map[string]*export
	names   []string // export names in config order, for NBD_OPT_LIST
	defName string   // what the empty name means
	hasDef  bool
	stats   counters

	mu        sync.Mutex
	closing   bool
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	wg        sync.WaitGroup // one per registered connection
	closed    chan struct{}  // closed when Close has finished
}

// export is an Export with everything negotiation and request checking need
// worked out once.
type export struct {
	Export
	caps     Capabilities
	size     int64
	readOnly bool
	tflags   uint16
	// Block size constraints as announced: minBlock divides every
	// offset and length, maxPayload bounds reads and writes.
	minBlock, prefBlock, maxPayload uint32
}

func newExport(e Export, maxPayload int) (*export, error) {
	caps := e.Backend.Capabilities()
	x := &export{Export: e, caps: caps, size: e.Backend.Size(), readOnly: e.ReadOnly || caps.ReadOnly}
	f := uint16(tflagHasFlags)
	if x.readOnly {
		f |= tflagReadOnly
	}
	if caps.Flush {
		f |= tflagSendFlush | tflagSendFUA
	}
	if caps.Rotational {
		f |= tflagRotational
	}
	if !x.readOnly && caps.Trim {
		f |= tflagSendTrim
	}
	if !x.readOnly && caps.WriteZeroes {
		f |= tflagSendZeroes
		if caps.FastZero {
			f |= tflagSendFastZero
		}
	}
	if caps.MultiConn {
		f |= tflagCanMultiConn
	}
	x.tflags = f
	x.minBlock = max(caps.MinBlockSize, 1)
	x.prefBlock = caps.PreferredBlockSize
	if x.prefBlock == 0 {
		x.prefBlock = max(4096, x.minBlock)
	}
	mp := uint32(maxPayload)
	if caps.MaxPayload != 0 {
		mp = min(mp, caps.MaxPayload)
	}
	mp -= mp % x.minBlock
	if mp < x.minBlock {
		return nil, fmt.Errorf("nbd config: export %q: maximum payload %d is below the minimum block size %d", e.Name, maxPayload, x.minBlock)
	}
	x.maxPayload = mp
	if x.prefBlock > mp {
		// The protocol wants preferred ≤ maximum; lower it to the largest
		// power of two that fits.
		x.prefBlock = max(1<<(bits.Len32(mp)-1), x.minBlock)
	}
	return x, nil
}

// NewServer checks cfg and returns a Server that is not yet serving.
func NewServer(cfg Config) (*Server, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	s := &Server{
		cfg:       cfg,
		log:       cfg.Logger,
		exports:   map[string]*export{},
		listeners: map[net.Listener]struct{}{},
		conns:     map[*conn]struct{}{},
		closed:    make(chan struct{}),
	}
	s.plog = newRateLog(cfg.Logger, cfg.LogInterval, &s.stats.logsSuppressed)
	for _, e := range cfg.Exports {
		x, err := newExport(e, cfg.MaxPayload)
		if err != nil {
			return nil, err
		}
		s.exports[e.Name] = x
		s.names = append(s.names, e.Name)
	}
	switch {
	case cfg.DefaultExport != "":
		s.defName, s.hasDef = cfg.DefaultExport, true
	case s.exports[""] != nil:
		s.defName, s.hasDef = "", true
	case len(s.names) == 1:
		s.defName, s.hasDef = s.names[0], true
	}
	return s, nil
}

// lookup finds the export a client asked for by name, resolving the empty
// name to the default export.
func (s *Server) lookup(name string) *export {
	if name == "" {
		if !s.hasDef {
			return nil
		}
		name = s.defName
	}
	return s.exports[name]
}

// ExportInfo returns an export's size and NBD transmission flags, as the
// handshake would announce them. The kernel NBD client does no handshake,
// so whoever attaches it (netlink NBD_ATTR_SIZE_BYTES and
// NBD_ATTR_SERVER_FLAGS) needs them before calling ServeTransmission.
func (s *Server) ExportInfo(name string) (size int64, flags uint16, err error) {
	x := s.lookup(name)
	if x == nil {
		return 0, 0, fmt.Errorf("nbd: no export %q", name)
	}
	return x.size, x.tflags, nil
}

// Stats returns a snapshot of the server's counters.
func (s *Server) Stats() Stats { return s.stats.snapshot() }

// Serve accepts connections on l and serves each in its own goroutine until
// Close is called (then it returns ErrServerClosed) or l fails for good.
// Serve may be called for several listeners at once, e.g. a unix socket and
// a loopback TCP port; Close closes them all.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, l)
		s.mu.Unlock()
	}()
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.isClosing() {
				return ErrServerClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbd: accepting on %s: %w", l.Addr(), err)
			}
			// Out of descriptors or a connection aborted before accept:
			// wait a little and go on, as net/http does.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			s.plog.warn("nbd: accept failed; retrying", "listener", l.Addr().String(), "err", err, "retry_in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		if c := s.admit(nc); c != nil {
			go c.serve(nil)
		}
	}
}

// ServeConn serves one already-connected client (negotiation, then
// transmission) on the caller's goroutine and returns when the connection
// ends: nil after a clean end (NBD_OPT_ABORT, NBD_CMD_DISC, the client
// hanging up between requests, or Close), otherwise what went wrong. It
// counts against MaxConnections like an accepted connection, and closes nc.
func (s *Server) ServeConn(nc net.Conn) error {
	c := s.admit(nc)
	if c == nil {
		return s.refusedErr()
	}
	return c.serve(nil)
}

// ServeTransmission serves nc in the transmission phase directly, without
// negotiation, for the named export. This is how the kernel NBD client is
// served: it is handed one end of a socket pair after userspace has settled
// the export (see ExportInfo) and speaks only transmission requests. It
// returns like ServeConn.
func (s *Server) ServeTransmission(nc net.Conn, name string) error {
	x := s.lookup(name)
	if x == nil {
		nc.Close()
		return fmt.Errorf("nbd: no export %q", name)
	}
	c := s.admit(nc)
	if c == nil {
		return s.refusedErr()
	}
	return c.serve(x)
}

func (s *Server) refusedErr() error {
	if s.isClosing() {
		return ErrServerClosed
	}
	return fmt.Errorf("nbd: connection refused: %d connections already served (MaxConnections)", s.cfg.MaxConnections)
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

// admit registers a new connection, or closes it at once if the server is
// closing or already serves MaxConnections.
func (s *Server) admit(nc net.Conn) *conn {
	s.mu.Lock()
	if s.closing || len(s.conns) >= s.cfg.MaxConnections {
		closing := s.closing
		s.mu.Unlock()
		s.stats.refused.Add(1)
		if !closing {
			s.plog.warn("nbd: refusing connection: MaxConnections reached",
				"remote", remoteName(nc), "max_connections", s.cfg.MaxConnections)
		}
		nc.Close()
		return nil
	}
	c := newConn(s, nc)
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	s.stats.accepted.Add(1)
	s.stats.active.Add(1)
	return c
}

// forget unregisters a finished connection.
func (s *Server) forget(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.stats.active.Add(-1)
	s.wg.Done()
}

// Close shuts the server down gracefully: it stops accepting, ends
// negotiations (options already received are answered
// NBD_REP_ERR_SHUTDOWN), stops reading new requests (any already received
// but not started are answered ESHUTDOWN), lets the
// requests in flight finish and their replies go out, flushes each backend
// that connection wrote to, and disconnects. Connections still busy after
// ShutdownTimeout are closed regardless. Close returns an error only if a
// backend call still had not returned after a further ShutdownTimeout; it
// is safe to call more than once.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		<-s.closed
		return nil
	}
	s.closing = true
	var errs []error
	for l := range s.listeners {
		if err := l.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, fmt.Errorf("nbd: closing listener %s: %w", l.Addr(), err))
		}
	}
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	defer close(s.closed)

	for _, c := range conns {
		c.beginShutdown()
	}
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		return errors.Join(errs...)
	case <-time.After(s.cfg.ShutdownTimeout):
	}
	s.mu.Lock()
	left := len(s.conns)
	for c := range s.conns {
		c.forceClose()
	}
	s.mu.Unlock()
	s.log.Warn("nbd: shutdown timeout: closing connections with requests still in flight",
		"connections", left, "timeout", s.cfg.ShutdownTimeout)
	select {
	case <-done:
	case <-time.After(s.cfg.ShutdownTimeout):
		s.mu.Lock()
		left = len(s.conns)
		s.mu.Unlock()
		errs = append(errs, fmt.Errorf("nbd: close: %d connections still wait for backend calls after %v", left, 2*s.cfg.ShutdownTimeout))
	}
	return errors.Join(errs...)
}

// ListenUnix listens on a unix socket at path, readable and writable by
// the owner only (the daemon runs as root; NBD has no authentication of
// its own, so the socket's permissions are the access control). A stale
// socket file left by a previous run is removed; a live one (something
// accepts on it) is an error rather than being stolen.
func ListenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("nbd: listen %s: exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("nbd: listen %s: another server is listening there", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("nbd: removing stale socket: %w", err)
		}
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("nbd: %w", err)
	}
	// The socket exists with the umask's mode for a moment; keep it in a
	// directory only root can enter (e.g. /run/mdcluster, 0700) if that
	// matters.
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("nbd: restricting socket: %w", err)
	}
	return l, nil
}

func remoteName(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "local"
}
