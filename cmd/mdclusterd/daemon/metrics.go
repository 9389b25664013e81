package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/dlm/transport"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics is the daemon's Prometheus registry and the instruments the
// daemon updates itself. Membership and transport figures are read from
// the node at scrape time (collectors below), so they are never stale.
// The array layer registers its own collectors in Registry (see ArrayEnv).
type Metrics struct {
	// Registry holds every collector; /metrics serves it.
	Registry *prometheus.Registry

	viewInstalls   prometheus.Counter
	recoveries     prometheus.Counter
	quorumLost     prometheus.Counter
	lockMgrStops   prometheus.Counter
	fenceAttempts  *prometheus.CounterVec
	fenceFailures  *prometheus.CounterVec
	fenceLastSecs  *prometheus.GaugeVec
	fenceLastOK    *prometheus.GaugeVec
	dlmOps         *prometheus.CounterVec
	dlmLatency     *prometheus.HistogramVec
	ctlRequests    *prometheus.CounterVec
	ctlErrors      *prometheus.CounterVec
	ctlConns       prometheus.Gauge
	ctlRefused     *prometheus.CounterVec
	ctlLogSuppress prometheus.Counter
	ctlReqBytes    prometheus.Histogram
	httpConns      prometheus.Gauge
	httpRefused    prometheus.Counter
}

// newMetrics creates the registry with the Go runtime and process
// collectors and the daemon's own instruments.
func newMetrics() *Metrics {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	f := func(c prometheus.Collector) { reg.MustRegister(c) }
	m := &Metrics{Registry: reg}
	m.viewInstalls = prometheus.NewCounter(prometheus.CounterOpts{Name: "mdcluster_membership_view_installs_total",
		Help: "Agreed views installed on this node."})
	m.recoveries = prometheus.NewCounter(prometheus.CounterOpts{Name: "mdcluster_membership_recoveries_total",
		Help: "Lock recoveries finished on this node (every lockspace recovered into a view)."})
	m.quorumLost = prometheus.NewCounter(prometheus.CounterOpts{Name: "mdcluster_membership_quorum_lost_total",
		Help: "Times this node lost quorum."})
	m.lockMgrStops = prometheus.NewCounter(prometheus.CounterOpts{Name: "mdcluster_membership_lock_manager_stops_total",
		Help: "Times the lock manager was stopped for a view change."})
	m.fenceAttempts = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mdcluster_fence_attempts_total",
		Help: "Fence attempts this node ran, by victim."}, []string{"victim"})
	m.fenceFailures = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mdcluster_fence_failures_total",
		Help: "Fence attempts that failed (every level), by victim."}, []string{"victim"})
	m.fenceLastSecs = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mdcluster_fence_last_duration_seconds",
		Help: "Duration of the last fence attempt, by victim."}, []string{"victim"})
	m.fenceLastOK = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "mdcluster_fence_last_success",
		Help: "1 if the last fence attempt on the victim succeeded, 0 if it failed."}, []string{"victim"})
	m.dlmOps = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mdcluster_dlm_operations_total",
		Help: "Lock operations through the daemon's instrumented lockers, by operation and outcome."}, []string{"op", "result"})
	m.dlmLatency = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "mdcluster_dlm_operation_duration_seconds",
		Help:    "Time from a lock operation's call to its outcome (a request includes its wait in the queue).",
		Buckets: prometheus.ExponentialBuckets(50e-6, 4, 10)}, []string{"op"})
	m.ctlRequests = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mdcluster_control_requests_total",
		Help: "Control socket requests, by command and result (ok, or the error code)."}, []string{"command", "result"})
	m.ctlErrors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mdcluster_control_errors_total",
		Help: "Control socket connections ended by an error, by reason."}, []string{"reason"})
	m.ctlConns = prometheus.NewGauge(prometheus.GaugeOpts{Name: "mdcluster_control_connections",
		Help: "Open control socket connections (bounded by control.max_connections)."})
	m.ctlRefused = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mdcluster_control_connections_refused_total",
		Help: "Control socket connections refused, by reason (not_root, limit, peer_credentials)."}, []string{"reason"})
	m.ctlLogSuppress = prometheus.NewCounter(prometheus.CounterOpts{Name: "mdcluster_control_refusal_logs_suppressed_total",
		Help: "Log lines about refused control socket peers left out by control.refused_log_interval."})
	m.ctlReqBytes = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mdcluster_control_request_bytes",
		Help: "Size of control requests (bounded by control.max_request_bytes).", Buckets: prometheus.ExponentialBuckets(64, 4, 8)})
	m.httpConns = prometheus.NewGauge(prometheus.GaugeOpts{Name: "mdcluster_metrics_http_connections",
		Help: "Open connections to the metrics endpoint (bounded by metrics.max_connections)."})
	m.httpRefused = prometheus.NewCounter(prometheus.CounterOpts{Name: "mdcluster_metrics_http_connections_refused_total",
		Help: "Connections to the metrics endpoint closed at once because metrics.max_connections were open."})
	for _, c := range []prometheus.Collector{m.viewInstalls, m.recoveries, m.quorumLost, m.lockMgrStops, m.fenceAttempts,
		m.fenceFailures, m.fenceLastSecs, m.fenceLastOK, m.dlmOps, m.dlmLatency, m.ctlRequests, m.ctlErrors, m.ctlConns,
		m.ctlRefused, m.ctlLogSuppress, m.ctlReqBytes, m.httpConns, m.httpRefused} {
		f(c)
	}
	return m
}

func (m *Metrics) fenceAttempt(victim ddraid.NodeID, took time.Duration, ok bool) {
	v := victim.String()
	m.fenceAttempts.WithLabelValues(v).Inc()
	m.fenceLastSecs.WithLabelValues(v).Set(took.Seconds())
	if ok {
		m.fenceLastOK.WithLabelValues(v).Set(1)
	} else {
		m.fenceFailures.WithLabelValues(v).Inc()
		m.fenceLastOK.WithLabelValues(v).Set(0)
	}
}

// membershipCollector reads the node's status at every scrape.
type membershipCollector struct {
	status func() (ctl.Status, bool)
	descs  map[string]*prometheus.Desc
}

var membershipGauges = []struct{ name, help string }{
	{"mdcluster_membership_members", "Members of the last installed view."},
	{"mdcluster_membership_alive", "Nodes the failure detector reports alive, this one included."},
	{"mdcluster_membership_view_generation", "Generation of the last installed view."},
	{"mdcluster_membership_recovered_generation", "Last view whose lock recovery finished here."},
	{"mdcluster_membership_quorate", "1 if this node is quorate."},
	{"mdcluster_membership_lock_manager_stopped", "1 if the lock manager is stopped (no quorum, or a view change under way)."},
	{"mdcluster_quorum_data_nodes", "Configured data nodes (n, the expected votes)."},
	{"mdcluster_quorum_data_nodes_present", "Data nodes in the view and alive (the total votes)."},
	{"mdcluster_quorum_needed", "Data nodes needed for quorum (m)."},
	{"mdcluster_dlm_lockspaces", "Lockspaces open on this node."},
}

func newMembershipCollector(status func() (ctl.Status, bool)) *membershipCollector {
	c := &membershipCollector{status: status, descs: map[string]*prometheus.Desc{}}
	for _, g := range membershipGauges {
		c.descs[g.name] = prometheus.NewDesc(g.name, g.help, nil, nil)
	}
	return c
}

// Describe implements prometheus.Collector.
func (c *membershipCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *membershipCollector) Collect(ch chan<- prometheus.Metric) {
	s, ok := c.status()
	if !ok {
		return
	}
	alive := 0
	for _, m := range s.Members {
		if m.Alive {
			alive++
		}
	}
	b := func(v bool) float64 {
		if v {
			return 1
		}
		return 0
	}
	vals := map[string]float64{
		"mdcluster_membership_members":              float64(len(s.View.Members)),
		"mdcluster_membership_alive":                float64(alive),
		"mdcluster_membership_view_generation":      float64(s.View.Generation),
		"mdcluster_membership_recovered_generation": float64(s.RecoveredGeneration),
		"mdcluster_membership_quorate":              b(s.Quorum.Quorate),
		"mdcluster_membership_lock_manager_stopped": b(s.LockManagerStopped),
		"mdcluster_quorum_data_nodes":               float64(s.Quorum.ExpectedVotes),
		"mdcluster_quorum_data_nodes_present":       float64(s.Quorum.TotalVotes),
		"mdcluster_quorum_needed":                   float64(s.Quorum.Quorum),
		"mdcluster_dlm_lockspaces":                  float64(len(s.Lockspaces)),
	}
	for name, v := range vals {
		ch <- prometheus.MustNewConstMetric(c.descs[name], prometheus.GaugeValue, v)
	}
}

// transportCollector exports the DLM transport's counters at scrape time.
type transportCollector struct {
	stats func() (transport.Stats, bool)
	descs map[string]*prometheus.Desc
	drops *prometheus.Desc
}

var transportCounters = []struct {
	name, help string
	get        func(transport.Stats) uint64
}{
	{"mdcluster_dlm_transport_frames_sent_total", "DLM data frames sent for the first time.", func(s transport.Stats) uint64 { return s.FramesSent }},
	{"mdcluster_dlm_transport_frames_resent_total", "DLM data frames sent again after a reconnect.", func(s transport.Stats) uint64 { return s.FramesResent }},
	{"mdcluster_dlm_transport_frames_received_total", "DLM data frames received in sequence.", func(s transport.Stats) uint64 { return s.FramesReceived }},
	{"mdcluster_dlm_transport_frames_delivered_total", "DLM messages delivered to the lock manager.", func(s transport.Stats) uint64 { return s.FramesDelivered }},
	{"mdcluster_dlm_transport_acks_sent_total", "Standalone acknowledgement frames sent.", func(s transport.Stats) uint64 { return s.AcksSent }},
	{"mdcluster_dlm_transport_writes_total", "Write calls on DLM connections.", func(s transport.Stats) uint64 { return s.Writes }},
	{"mdcluster_dlm_transport_connections_established_total", "Authenticated DLM connections established.", func(s transport.Stats) uint64 { return s.ConnectionsEstablished }},
	{"mdcluster_dlm_transport_connections_lost_total", "Authenticated DLM connections lost.", func(s transport.Stats) uint64 { return s.ConnectionsLost }},
	{"mdcluster_dlm_transport_handshake_failures_total", "DLM connections that did not authenticate.", func(s transport.Stats) uint64 { return s.HandshakeFailures }},
	{"mdcluster_dlm_transport_auth_failures_total", "DLM handshakes with a wrong key.", func(s transport.Stats) uint64 { return s.AuthFailures }},
	{"mdcluster_dlm_transport_malformed_frames_total", "DLM connections closed for a frame that did not decode.", func(s transport.Stats) uint64 { return s.MalformedFrames }},
	{"mdcluster_dlm_transport_protocol_errors_total", "DLM connections closed for a protocol violation.", func(s transport.Stats) uint64 { return s.ProtocolErrors }},
}

func newTransportCollector(stats func() (transport.Stats, bool)) *transportCollector {
	c := &transportCollector{stats: stats, descs: map[string]*prometheus.Desc{}}
	for _, t := range transportCounters {
		c.descs[t.name] = prometheus.NewDesc(t.name, t.help, nil, nil)
	}
	c.drops = prometheus.NewDesc("mdcluster_dlm_transport_frames_dropped_total", "DLM frames dropped, by reason.", []string{"reason"}, nil)
	return c
}

// Describe implements prometheus.Collector.
func (c *transportCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
	ch <- c.drops
}

// Collect implements prometheus.Collector.
func (c *transportCollector) Collect(ch chan<- prometheus.Metric) {
	s, ok := c.stats()
	if !ok {
		return
	}
	for _, t := range transportCounters {
		ch <- prometheus.MustNewConstMetric(c.descs[t.name], prometheus.CounterValue, float64(t.get(s)))
	}
	for reason, v := range map[string]uint64{"duplicate": s.Dropped.Duplicate, "stale_generation": s.Dropped.StaleGeneration,
		"peer_restarted": s.Dropped.PeerRestarted, "peer_removed": s.Dropped.PeerRemoved, "queue_full": s.Dropped.QueueFull} {
		ch <- prometheus.MustNewConstMetric(c.drops, prometheus.CounterValue, float64(v), reason)
	}
}

// Locker wraps a lockspace so that its operations are counted and timed
// (mdcluster_dlm_operations_total, mdcluster_dlm_operation_duration_seconds).
func (m *Metrics) Locker(ls *dlm.Lockspace) dlm.Locker { return &meteredLocker{l: ls, m: m} }

type meteredLocker struct {
	l dlm.Locker
	m *Metrics
}

// LVBLen implements dlm.Locker.
func (l *meteredLocker) LVBLen() int { return l.l.LVBLen() }

// Request implements dlm.Locker, counting and timing the request.
func (l *meteredLocker) Request(ctx context.Context, spec dlm.LockSpec) (dlm.LockHandle, error) {
	start := time.Now()
	h, err := l.l.Request(ctx, spec)
	l.m.observe("request", start, err)
	if err != nil {
		return nil, err
	}
	return &meteredHandle{LockHandle: h, m: l.m}, nil
}

type meteredHandle struct {
	dlm.LockHandle
	m *Metrics
}

// Convert implements dlm.LockHandle, counting and timing the conversion.
func (h *meteredHandle) Convert(ctx context.Context, mode dlm.Mode, flags dlm.Flags) error {
	start := time.Now()
	err := h.LockHandle.Convert(ctx, mode, flags)
	h.m.observe("convert", start, err)
	return err
}

// Unlock implements dlm.LockHandle, counting and timing the unlock.
func (h *meteredHandle) Unlock(ctx context.Context, flags dlm.Flags) error {
	start := time.Now()
	err := h.LockHandle.Unlock(ctx, flags)
	h.m.observe("unlock", start, err)
	return err
}

func (m *Metrics) observe(op string, start time.Time, err error) {
	m.dlmLatency.WithLabelValues(op).Observe(time.Since(start).Seconds())
	m.dlmOps.WithLabelValues(op, dlmResult(err)).Inc()
}

// dlmResult names a lock operation's outcome with a bounded set of labels.
func dlmResult(err error) string {
	switch {
	case err == nil:
		return "ok"
	case errors.Is(err, dlm.ErrAgain):
		return "again"
	case errors.Is(err, dlm.ErrTimeout):
		return "timeout"
	case errors.Is(err, dlm.ErrCancel):
		return "cancel"
	case errors.Is(err, dlm.ErrDeadlock):
		return "deadlock"
	case errors.Is(err, dlm.ErrStopped):
		return "stopped"
	case errors.Is(err, dlm.ErrReleased):
		return "released"
	case errors.Is(err, dlm.ErrInvalid):
		return "invalid"
	}
	return "error"
}

// metricsServer serves /metrics over HTTP with a bound on connections.
type metricsServer struct {
	ln  net.Listener
	srv *http.Server
	wg  sync.WaitGroup
}

func listenMetrics(addr string) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics: listening on %s: %w", addr, err)
	}
	return ln, nil
}

// serveMetrics starts serving m on ln.
func serveMetrics(ln net.Listener, m *Metrics, maxConns int, log *slog.Logger) *metricsServer {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn)}))
	s := &metricsServer{ln: &limitListener{Listener: ln, max: int64(maxConns), m: m}}
	s.srv = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: time.Minute, MaxHeaderBytes: 8 << 10,
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelDebug)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics endpoint stopped", "addr", ln.Addr().String(), "err", err)
		}
	}()
	log.Info("serving metrics", "addr", "http://"+ln.Addr().String()+"/metrics")
	return s
}

func (s *metricsServer) close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if err := s.srv.Shutdown(ctx); err != nil {
		_ = s.srv.Close()
	}
	s.wg.Wait()
}

// limitListener closes connections beyond max at once (counted), so that a
// client opening many connections costs a bounded number of goroutines.
type limitListener struct {
	net.Listener
	max  int64
	open atomic.Int64
	m    *Metrics
}

// Accept returns the next connection within the bound; connections
// beyond it are closed and counted without being returned.
func (l *limitListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if l.open.Add(1) > l.max {
			l.open.Add(-1)
			l.m.httpRefused.Inc()
			_ = c.Close()
			continue
		}
		l.m.httpConns.Inc()
		return &countedConn{Conn: c, l: l}, nil
	}
}

type countedConn struct {
	net.Conn
	l    *limitListener
	once sync.Once
}

// Close frees the connection's place in the bound (once).
func (c *countedConn) Close() error {
	c.once.Do(func() {
		c.l.open.Add(-1)
		c.l.m.httpConns.Dec()
	})
	return c.Conn.Close()
}
