package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
	"golang.org/x/sys/unix"
)

// refusalWriteTimeout bounds the write of the one response a refused peer
// gets, so that a peer that never reads cannot hold the accept loop.
const refusalWriteTimeout = 200 * time.Millisecond

// handlerFunc runs one decoded request. A *ctl.Error chooses the error
// code; any other error is sent as code "failed".
type handlerFunc func(ctx context.Context, req ctl.Request) (any, error)

// controlServer serves the control socket: root peers only (SO_PEERCRED),
// at most cfg.MaxConnections at once, requests of at most
// cfg.MaxRequestBytes, answered in order on each connection.
type controlServer struct {
	ln      *net.UnixListener
	path    string
	cfg     config.Control
	log     *slog.Logger
	m       *Metrics
	handler handlerFunc
	// allowUID is the one uid served: 0 in the daemon (tests of the
	// refusal path run as root and cannot become anyone else in-process).
	allowUID uint32

	slots   chan struct{}
	refused logLimiter

	ctx    context.Context // cancelled on an immediate stop: handlers give up
	cancel context.CancelFunc

	mu     sync.Mutex
	conns  map[net.Conn]struct{}
	closed bool
	wg     sync.WaitGroup
}

// prepareSocketDir creates the socket's directory (mode 0700) if missing,
// and refuses one that someone other than this process's user owns or can
// write to: such a user could replace the socket with their own.
func prepareSocketDir(dir string) error {
	fi, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return fmt.Errorf("control socket: creating its directory: %w", err)
		}
		fi, err = os.Lstat(dir)
	}
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("control socket: %s is not a directory", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("control socket: directory %s is owned by uid %d, not by this daemon's uid %d; it must be root-only", dir, st.Uid, os.Geteuid())
	}
	if perm := fi.Mode().Perm(); perm&0o022 != 0 {
		return fmt.Errorf("control socket: directory %s has mode %04o: group or others can write to it and replace the socket; chmod go-w it", dir, perm)
	}
	return nil
}

// listenControl prepares the directory, takes over a stale socket (one
// nobody answers on) and listens, mode 0600. A socket that answers belongs
// to a running daemon and is left alone.
func listenControl(path string) (*net.UnixListener, error) {
	if err := prepareSocketDir(filepath.Dir(path)); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("control socket: %s exists and is not a socket; refusing to replace it", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket: %s answers: another mdclusterd is running", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("control socket: removing the stale socket %s: %w", path, err)
		}
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("control socket: %w", err)
	}
	return ln, nil
}

func newControlServer(ln *net.UnixListener, cfg config.Control, log *slog.Logger, m *Metrics, h handlerFunc) *controlServer {
	ctx, cancel := context.WithCancel(context.Background())
	s := &controlServer{ln: ln, path: ln.Addr().String(), cfg: cfg, log: log, m: m, handler: h,
		slots: make(chan struct{}, cfg.MaxConnections), conns: map[net.Conn]struct{}{}, ctx: ctx, cancel: cancel}
	s.refused.interval = cfg.RefusedLogInterval
	return s
}

// serve runs the accept loop until close.
func (s *controlServer) serve() {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := s.ln.AcceptUnix()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				s.log.Warn("control socket: accept failed", "err", err)
				s.m.ctlErrors.WithLabelValues("accept").Inc()
				// A persistent accept error (e.g. out of file
				// descriptors) must not spin.
				time.Sleep(100 * time.Millisecond)
				continue
			}
			s.admit(c)
		}
	}()
}

// admit checks the peer and the connection limit, then serves c on its
// own goroutine; a refused peer gets one error response and is closed.
func (s *controlServer) admit(c *net.UnixConn) {
	cred, err := peerCred(c)
	if err != nil {
		s.m.ctlRefused.WithLabelValues("peer_credentials").Inc()
		s.logRefusal("control socket: cannot read the peer's credentials; connection refused", "err", err)
		s.refuse(c, ctl.Errorf(ctl.CodePermissionDenied, "the daemon could not read your credentials (SO_PEERCRED): %v", err))
		return
	}
	if cred.Uid != s.allowUID {
		s.m.ctlRefused.WithLabelValues("not_root").Inc()
		s.logRefusal("control socket: connection from a non-root user refused", "uid", cred.Uid, "gid", cred.Gid, "pid", cred.Pid)
		s.refuse(c, ctl.Errorf(ctl.CodePermissionDenied, "permission denied: uid %d may not use the control socket %s; only root (uid 0) may", cred.Uid, s.path))
		return
	}
	select {
	case s.slots <- struct{}{}:
	default:
		s.m.ctlRefused.WithLabelValues("limit").Inc()
		s.logRefusal("control socket: connection refused: control.max_connections reached", "max", s.cfg.MaxConnections, "pid", cred.Pid)
		s.refuse(c, ctl.Errorf(ctl.CodeBusy, "busy: %d control connections are open (control.max_connections); try again", s.cfg.MaxConnections))
		return
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		<-s.slots
		s.refuse(c, ctl.Errorf(ctl.CodeUnavailable, "mdclusterd is stopping"))
		return
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	s.m.ctlConns.Inc()
	go func() {
		defer func() {
			s.mu.Lock()
			delete(s.conns, c)
			s.mu.Unlock()
			// The slot is free before the client sees the close, so a
			// client that reconnects at once is not refused as busy.
			<-s.slots
			s.m.ctlConns.Dec()
			c.Close()
			s.wg.Done()
		}()
		s.serveConn(c, cred)
	}()
}

func peerCred(c *net.UnixConn) (*unix.Ucred, error) {
	raw, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return nil, err
	}
	return cred, credErr
}

// logRefusal logs at most one refusal per control.refused_log_interval,
// with the number left out since the last one.
func (s *controlServer) logRefusal(msg string, args ...any) {
	ok, suppressed := s.refused.allow(time.Now())
	if !ok {
		s.m.ctlLogSuppress.Inc()
		return
	}
	if suppressed > 0 {
		args = append(args, "refusals_not_logged_since_last", suppressed)
	}
	s.log.Warn(msg, args...)
}

// refuse sends one error response and closes the connection.
func (s *controlServer) refuse(c net.Conn, e *ctl.Error) {
	_ = c.SetWriteDeadline(time.Now().Add(refusalWriteTimeout))
	_ = writeResponse(c, ctl.Response{Version: ctl.Version, Error: e})
	c.Close()
}

func writeResponse(w io.Writer, resp ctl.Response) error {
	body, err := json.Marshal(resp)
	if err != nil {
		return fmt.Errorf("encoding a response: %w", err)
	}
	return ctl.WriteFrame(w, body)
}

// serveConn answers requests until the client closes, goes idle, or sends
// something that cannot be framed.
func (s *controlServer) serveConn(c *net.UnixConn, cred *unix.Ucred) {
	for {
		// Checked and set under mu, so that close's deadline is never
		// overwritten by a longer one.
		s.mu.Lock()
		closed := s.closed
		if !closed {
			_ = c.SetReadDeadline(time.Now().Add(s.cfg.IdleTimeout))
		}
		s.mu.Unlock()
		if closed {
			return
		}
		body, err := ctl.ReadFrame(c, s.cfg.MaxRequestBytes)
		if err != nil {
			s.connError(c, cred, err)
			return
		}
		s.m.ctlReqBytes.Observe(float64(len(body)))
		resp := s.handle(body)
		_ = c.SetWriteDeadline(time.Now().Add(s.cfg.IdleTimeout))
		if err := writeResponse(c, resp); err != nil {
			s.m.ctlErrors.WithLabelValues("write").Inc()
			s.log.Debug("control socket: writing a response failed", "pid", cred.Pid, "err", err)
			return
		}
	}
}

// connError accounts for the end of a connection and, when the request
// was too large, tells the client why before closing.
func (s *controlServer) connError(c net.Conn, cred *unix.Ucred, err error) {
	var ne net.Error
	switch {
	case errors.Is(err, io.EOF):
		return
	case errors.Is(err, ctl.ErrFrameTooLarge):
		s.m.ctlErrors.WithLabelValues("too_large").Inc()
		s.m.ctlRequests.WithLabelValues("unknown", ctl.CodeTooLarge).Inc()
		s.log.Warn("control socket: request too large; connection closed", "pid", cred.Pid, "limit", s.cfg.MaxRequestBytes, "err", err)
		_ = c.SetWriteDeadline(time.Now().Add(refusalWriteTimeout))
		_ = writeResponse(c, ctl.Response{Version: ctl.Version, Error: ctl.Errorf(ctl.CodeTooLarge,
			"request too large: %v (control.max_request_bytes)", err)})
	case errors.As(err, &ne) && ne.Timeout():
		s.m.ctlErrors.WithLabelValues("idle_timeout").Inc()
	case errors.Is(err, net.ErrClosed):
		s.m.ctlErrors.WithLabelValues("closed").Inc()
	default:
		s.m.ctlErrors.WithLabelValues("read").Inc()
		s.log.Debug("control socket: reading a request failed", "pid", cred.Pid, "err", err)
	}
}

// handle decodes and runs one request and builds its response.
func (s *controlServer) handle(body []byte) ctl.Response {
	req, err := ctl.DecodeRequest(body)
	if err != nil {
		s.m.ctlRequests.WithLabelValues("unknown", ctl.CodeBadRequest).Inc()
		return ctl.Response{Version: ctl.Version, Error: ctl.Errorf(ctl.CodeBadRequest, "bad request: %v", err)}
	}
	label := commandLabel(req.Command)
	resp := ctl.Response{Version: ctl.Version, ID: req.ID}
	if req.Version != ctl.Version {
		s.m.ctlRequests.WithLabelValues(label, ctl.CodeUnsupportedVersion).Inc()
		resp.Error = ctl.Errorf(ctl.CodeUnsupportedVersion, "protocol version %d is not supported; this mdclusterd speaks version %d", req.Version, ctl.Version)
		return resp
	}
	result, err := s.handler(s.ctx, req)
	if err == nil {
		raw, merr := json.Marshal(result)
		switch {
		case merr != nil:
			err = ctl.Errorf(ctl.CodeInternal, "%s: encoding the result: %v", req.Command, merr)
		case len(raw) > ctl.DefaultMaxResponse-1024:
			err = ctl.Errorf(ctl.CodeTooLarge, "%s: the result is %d bytes, more than a client accepts (%d); narrow the request", req.Command, len(raw), ctl.DefaultMaxResponse)
		default:
			resp.OK, resp.Result = true, raw
			s.m.ctlRequests.WithLabelValues(label, "ok").Inc()
			return resp
		}
	}
	var ce *ctl.Error
	if !errors.As(err, &ce) {
		ce = ctl.Errorf(ctl.CodeFailed, "%s: %v", req.Command, err)
	}
	resp.Error = ce
	s.m.ctlRequests.WithLabelValues(label, ce.Code).Inc()
	return resp
}

// commandLabel keeps the metric's command label to the known commands.
func commandLabel(cmd string) string {
	switch cmd {
	case ctl.CmdStatus, ctl.CmdLocks, ctl.CmdLeave:
		return cmd
	}
	for _, a := range ctl.ArrayCommands {
		if cmd == a {
			return cmd
		}
	}
	return "unknown"
}

// stopAccepting closes the listener (removing the socket file) and refuses
// connections admitted from now on; open connections go on.
func (s *controlServer) stopAccepting() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	_ = s.ln.Close()
}

// close stops accepting, lets requests in progress finish within grace
// (their context is cancelled then), closes every connection and waits for
// the server's goroutines.
func (s *controlServer) close(grace time.Duration) {
	s.stopAccepting()
	s.mu.Lock()
	for c := range s.conns {
		// Interrupt idle reads; a response being written still goes out.
		_ = c.SetReadDeadline(time.Now())
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		s.cancel()
		s.mu.Lock()
		for c := range s.conns {
			c.Close()
		}
		s.mu.Unlock()
		<-done
	}
	s.cancel()
}

// logLimiter allows one event per interval and counts the others.
type logLimiter struct {
	interval time.Duration

	mu         sync.Mutex
	last       time.Time
	suppressed uint64
}

// allow reports whether an event at now may be logged, and how many were
// suppressed since the last one that was.
func (l *logLimiter) allow(now time.Time) (bool, uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < l.interval {
		l.suppressed++
		return false, 0
	}
	l.last = now
	n := l.suppressed
	l.suppressed = 0
	return true, n
}
