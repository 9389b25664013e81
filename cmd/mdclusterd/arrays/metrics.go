package arrays

import (
	"strconv"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/prometheus/client_golang/prometheus"
)

// arrayCollector exports every array this node knows at scrape time: its
// state and members from the manager, its I/O and sync counters from the
// RAID engine, its broadcast's counters. It reads counters the data path
// keeps anyway, so the write path does no extra work for metrics.
//
// Labels stay bounded: "array" is the md name (or the UUID of an array
// not running here), "dev" is md's device number, "state" and "kind" are
// from fixed sets.
type arrayCollector struct {
	l *Layer

	running, degraded, members, memberState             *prometheus.Desc
	syncRunning, syncPending, syncRemote                *prometheus.Desc
	syncDone, syncTotal, syncSpeed, resyncBytes         *prometheus.Desc
	reads, writes, flushes, trims, readBytes, wrBytes   *prometheus.Desc
	inFlight, readErrors, degradedWrites, failures      *prometheus.Desc
	failuresRefused, memberErrors                       *prometheus.Desc
	bcSends, bcSendErrors, bcSendDur, bcRecv, bcRecvErr *prometheus.Desc
	bcHandlerErr, bcGaps                                *prometheus.Desc
}

// memberStates are the member states exported, in a fixed order.
var memberStates = []array.MemberState{array.MemberInSync, array.MemberRecovering, array.MemberSpare, array.MemberFaulty}

func newArrayCollector(l *Layer) *arrayCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc(name, help, append([]string{"array"}, labels...), nil)
	}
	return &arrayCollector{l: l,
		running:     d("mdcluster_array_running", "1 if the array runs (is exported) on this node, 0 if it is only known here."),
		degraded:    d("mdcluster_array_degraded", "1 if some raid slot of the running array has no in-sync member on this node."),
		members:     d("mdcluster_array_members", "Members this node has bound, by state (in_sync, recovering, spare, faulty).", "state"),
		memberState: d("mdcluster_array_member_state", "1 for each bound member (by md device number) in its current state.", "dev", "state"),
		syncRunning: d("mdcluster_array_sync_running", "1 while this node runs a sync of the kind (resync, recovery).", "kind"),
		syncPending: d("mdcluster_array_sync_pending", "1 while this node has sync work and waits for the cluster's resync lock."),
		syncRemote:  d("mdcluster_array_sync_remote", "1 while another node announces a resync window."),
		syncDone:    d("mdcluster_array_sync_done_sectors", "Progress of this node's running sync (sectors); 0 when none runs."),
		syncTotal:   d("mdcluster_array_sync_total_sectors", "Size of this node's running sync (sectors); 0 when none runs."),
		syncSpeed:   d("mdcluster_array_sync_speed_bytes_per_second", "Copy rate of this node's running sync over the last few seconds."),
		resyncBytes: d("mdcluster_array_sync_copied_bytes_total", "Bytes copied by resync, recovery and catch-up since the array started here."),
		reads:       d("mdcluster_array_io_reads_total", "Read requests the array's data path served since it started here."),
		writes:      d("mdcluster_array_io_writes_total", "Write requests (FUA included) since the array started here."),
		flushes:     d("mdcluster_array_io_flushes_total", "Flush requests since the array started here."),
		trims:       d("mdcluster_array_io_trims_total", "Trim and write-zeroes requests since the array started here."),
		readBytes:   d("mdcluster_array_io_read_bytes_total", "Bytes read through the array since it started here."),
		wrBytes:     d("mdcluster_array_io_written_bytes_total", "Bytes written through the array since it started here."),
		inFlight:    d("mdcluster_array_io_in_flight", "Requests running in the array's data path now."),
		readErrors: d("mdcluster_array_io_read_errors_total",
			"Member read errors, by outcome: retried (on another copy), corrected (bad copy rewritten), unrecoverable (no good copy).", "outcome"),
		degradedWrites: d("mdcluster_array_io_degraded_writes_total", "Writes that could not reach every copy (their bitmap chunks stay dirty)."),
		failures:       d("mdcluster_array_member_failures_total", "Members the data path failed after I/O errors (or as asked) since the array started here."),
		failuresRefused: d("mdcluster_array_member_failures_refused_total",
			"Member errors that did not fail the member because it holds the last copy of some data."),
		memberErrors: d("mdcluster_array_member_io_errors_total",
			"I/O errors on each member holding a raid slot, by md device number (counted from when it took its slot).", "dev"),
		bcSends:      d("mdcluster_broadcast_sends_total", "Broadcasts this node published for the array since it assembled it."),
		bcSendErrors: d("mdcluster_broadcast_send_errors_total", "Broadcast sends that returned an error."),
		bcSendDur:    d("mdcluster_broadcast_send_duration_seconds", "Latency of the successful broadcast sends as their callers saw it (count and sum)."),
		bcRecv:       d("mdcluster_broadcast_receives_total", "Broadcasts from other nodes this node acted on."),
		bcRecvErr:    d("mdcluster_broadcast_receiver_errors_total", "Receivers' errors reported back to this node's sends."),
		bcHandlerErr: d("mdcluster_broadcast_handler_errors_total", "Received broadcasts whose handling failed on this node."),
		bcGaps:       d("mdcluster_broadcast_gaps_total", "Broadcasts received out of sequence (this node missed some)."),
	}
}

// Describe implements prometheus.Collector.
func (c *arrayCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.running, c.degraded, c.members, c.memberState, c.syncRunning, c.syncPending,
		c.syncRemote, c.syncDone, c.syncTotal, c.syncSpeed, c.resyncBytes, c.reads, c.writes, c.flushes, c.trims,
		c.readBytes, c.wrBytes, c.inFlight, c.readErrors, c.degradedWrites, c.failures, c.failuresRefused, c.memberErrors, c.bcSends,
		c.bcSendErrors, c.bcSendDur, c.bcRecv, c.bcRecvErr, c.bcHandlerErr, c.bcGaps} {
		ch <- d
	}
}

// scraped is what Collect copies from one arr under the layer's lock.
type scraped struct {
	label   string
	running bool
	mgr     *array.Manager
	eng     *array.RAIDEngine
}

// Collect implements prometheus.Collector.
func (c *arrayCollector) Collect(ch chan<- prometheus.Metric) {
	c.l.mu.Lock()
	list := make([]scraped, 0, len(c.l.arrays))
	seen := map[string]bool{}
	for _, a := range c.l.arrays {
		label := a.md
		if label == "" || seen[label] {
			label = bitmap.FormatUUID(a.uuid)
		}
		seen[label] = true
		list = append(list, scraped{label: label, running: a.running, mgr: a.mgr, eng: a.eng})
	}
	c.l.mu.Unlock()
	for _, s := range list {
		c.collect(ch, s)
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

func (c *arrayCollector) collect(ch chan<- prometheus.Metric, s scraped) {
	g := func(d *prometheus.Desc, v float64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, append([]string{s.label}, lv...)...)
	}
	ctr := func(d *prometheus.Desc, v uint64, lv ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), append([]string{s.label}, lv...)...)
	}
	g(c.running, b2f(s.running))

	// Members and sync: the manager's view when there is one, else the
	// engine's (an engine driven without a manager, as in tests).
	type mem struct {
		dev   uint32
		state array.MemberState
	}
	var ms []mem
	var sync array.SyncStatus
	if s.mgr != nil {
		st := s.mgr.Status()
		for _, m := range st.Members {
			ms = append(ms, mem{m.Dev, m.State})
		}
		sync = st.Sync
	} else if s.eng != nil {
		for _, m := range s.eng.Members() {
			ms = append(ms, mem{m.Dev, m.State})
		}
		p := s.eng.Progress()
		sync = array.SyncStatus{Running: p.Running, Kind: p.Kind, Done: p.Done, Total: p.Total}
	}
	counts := map[array.MemberState]int{}
	for _, m := range ms {
		counts[m.state]++
		g(c.memberState, 1, strconv.FormatUint(uint64(m.dev), 10), m.state.String())
	}
	for _, st := range memberStates {
		g(c.members, float64(counts[st]), st.String())
	}
	for _, k := range []array.SyncKind{array.SyncResync, array.SyncRecovery} {
		g(c.syncRunning, b2f(sync.Running && sync.Kind == k), k.String())
	}
	g(c.syncPending, b2f(sync.Pending))
	g(c.syncRemote, b2f(sync.Remote.Active()))
	if !sync.Running {
		sync.Done, sync.Total = 0, 0
	}
	g(c.syncDone, float64(sync.Done))
	g(c.syncTotal, float64(sync.Total))

	var es array.EngineStats
	if s.eng != nil {
		es = s.eng.Stats()
	}
	st := es.Stats
	g(c.degraded, b2f(es.Running && es.Degraded))
	g(c.syncSpeed, es.SyncSpeed)
	ctr(c.resyncBytes, st.ResyncBytes)
	ctr(c.reads, st.Reads)
	ctr(c.writes, st.Writes)
	ctr(c.flushes, st.Flushes)
	ctr(c.trims, st.Trims+st.WriteZeroes)
	ctr(c.readBytes, st.BytesRead)
	ctr(c.wrBytes, st.BytesWritten)
	g(c.inFlight, float64(st.InFlight))
	ctr(c.readErrors, st.ReadRetries, "retried")
	ctr(c.readErrors, st.ReadErrorsCorrected, "corrected")
	ctr(c.readErrors, st.ReadErrorsUnrecoverable, "unrecoverable")
	ctr(c.degradedWrites, st.DegradedWrites)
	ctr(c.failures, st.MemberFailures)
	ctr(c.failuresRefused, st.FailuresRefused)
	for dev, n := range es.MemberErrors {
		ctr(c.memberErrors, n, strconv.FormatUint(uint64(dev), 10))
	}

	if s.mgr == nil {
		return
	}
	bs, ok := s.mgr.BroadcastStats()
	if !ok {
		return
	}
	ctr(c.bcSends, bs.Sends)
	ctr(c.bcSendErrors, bs.SendErrors)
	ch <- prometheus.MustNewConstSummary(c.bcSendDur, bs.SendOK, bs.SendTime.Seconds(), nil, s.label)
	ctr(c.bcRecv, bs.Receives)
	ctr(c.bcRecvErr, bs.ReceiverErrors)
	ctr(c.bcHandlerErr, bs.HandlerErrors)
	ctr(c.bcGaps, bs.Gaps)
}
