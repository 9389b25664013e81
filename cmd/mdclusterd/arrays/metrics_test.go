package arrays

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/cmd/mdclusterd/daemon"
	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
)

// metricsLayer is a layer with no node and no lease whose engines sync at
// speedKiB KiB/s at most, with its array collector in a fresh registry.
func metricsLayer(t *testing.T, speedKiB int64) (*Layer, *prometheus.Registry) {
	l := New()
	cfg := &config.Config{RAID: config.RAID{SpeedLimitMin: speedKiB, SpeedLimitMax: speedKiB}}
	l.env = daemon.ArrayEnv{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	l.log, l.testNodeID = l.env.Logger, 1
	t.Cleanup(func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		for _, a := range l.arrays {
			a.eng.Stop()
		}
	})
	reg := prometheus.NewRegistry()
	reg.MustRegister(newArrayCollector(l))
	return l, reg
}

// memberFiles creates n zeroed member images of size bytes.
func memberFiles(t *testing.T, n int, size int) []string {
	dir := t.TempDir()
	var paths []string
	for i := range n {
		p := filepath.Join(dir, string(rune('a'+i))+".img")
		if err := os.WriteFile(p, make([]byte, size), 0o600); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	return paths
}

// metricValue returns the value of the series name{labels} in reg, and
// whether it exists.
func metricValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, lp := range m.GetLabel() {
				got[lp.GetName()] = lp.GetValue()
			}
			for k, v := range labels {
				if got[k] != v {
					continue next
				}
			}
			return value(mf.GetType(), m), true
		}
	}
	return 0, false
}

func value(typ dto.MetricType, m *dto.Metric) float64 {
	switch typ {
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue()
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue()
	case dto.MetricType_SUMMARY:
		return float64(m.GetSummary().GetSampleCount())
	}
	return m.GetUntyped().GetValue()
}

// expect checks name{array="md0", labels...} == want.
func expect(t *testing.T, reg *prometheus.Registry, when, name string, want float64, kv ...string) {
	t.Helper()
	labels := map[string]string{"array": "/dev/md/md0"}
	for i := 0; i+1 < len(kv); i += 2 {
		labels[kv[i]] = kv[i+1]
	}
	got, ok := metricValue(t, reg, name, labels)
	if !ok {
		t.Fatalf("%s: no series %s%v", when, name, labels)
	}
	if got != want {
		t.Fatalf("%s: %s%v = %v, want %v", when, name, labels, got, want)
	}
}

// TestArrayMetricsIOAndFailure: the scrape-time collector follows the
// array's data path: requests and bytes are counted as the engine served
// them, and failing a member makes the array degraded, moves the member to
// faulty, counts the failure and the degraded writes after it. The
// metric names pass the Prometheus linter.
func TestArrayMetricsIOAndFailure(t *testing.T) {
	l, reg := metricsLayer(t, 200000)
	u := [16]byte{9, 8, 7}
	a := runRAID1(t, l, u, memberFiles(t, 2, 5<<20))
	l.mu.Lock()
	a.md = "/dev/md/md0"
	l.mu.Unlock()

	expect(t, reg, "idle", "mdcluster_array_running", 1)
	expect(t, reg, "idle", "mdcluster_array_degraded", 0)
	expect(t, reg, "idle", "mdcluster_array_io_writes_total", 0)
	expect(t, reg, "idle", "mdcluster_array_members", 2, "state", "in_sync")
	expect(t, reg, "idle", "mdcluster_array_members", 0, "state", "faulty")
	expect(t, reg, "idle", "mdcluster_array_member_state", 1, "dev", "1", "state", "in_sync")
	expect(t, reg, "idle", "mdcluster_array_member_io_errors_total", 0, "dev", "0")
	expect(t, reg, "idle", "mdcluster_array_member_io_errors_total", 0, "dev", "1")

	data := bytes.Repeat([]byte{0x5a}, 4096)
	for i := range 3 {
		if err := a.eng.WriteAt(data, int64(i)*4096, 0); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 8192)
	if _, err := a.eng.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := a.eng.Flush(); err != nil {
		t.Fatal(err)
	}
	expect(t, reg, "after I/O", "mdcluster_array_io_writes_total", 3)
	expect(t, reg, "after I/O", "mdcluster_array_io_written_bytes_total", 3*4096)
	expect(t, reg, "after I/O", "mdcluster_array_io_reads_total", 1)
	expect(t, reg, "after I/O", "mdcluster_array_io_read_bytes_total", 8192)
	expect(t, reg, "after I/O", "mdcluster_array_io_flushes_total", 1)
	expect(t, reg, "after I/O", "mdcluster_array_io_degraded_writes_total", 0)
	expect(t, reg, "after I/O", "mdcluster_array_io_in_flight", 0)

	if err := a.eng.FailMember(1); err != nil {
		t.Fatal(err)
	}
	expect(t, reg, "after fail", "mdcluster_array_degraded", 1)
	expect(t, reg, "after fail", "mdcluster_array_members", 1, "state", "in_sync")
	expect(t, reg, "after fail", "mdcluster_array_members", 1, "state", "faulty")
	expect(t, reg, "after fail", "mdcluster_array_member_state", 1, "dev", "1", "state", "faulty")
	if _, ok := metricValue(t, reg, "mdcluster_array_member_state", map[string]string{"dev": "1", "state": "in_sync"}); ok {
		t.Fatal("after fail: device 1 still has an in_sync series")
	}
	expect(t, reg, "after fail", "mdcluster_array_member_failures_total", 1)
	expect(t, reg, "after fail", "mdcluster_array_member_io_errors_total", 0, "dev", "0")
	if _, ok := metricValue(t, reg, "mdcluster_array_member_io_errors_total", map[string]string{"dev": "1"}); ok {
		t.Fatal("after fail: device 1, out of its slot, still has an error series")
	}
	if err := a.eng.WriteAt(data, 0, 0); err != nil {
		t.Fatal(err)
	}
	expect(t, reg, "degraded write", "mdcluster_array_io_writes_total", 4)
	expect(t, reg, "degraded write", "mdcluster_array_io_degraded_writes_total", 1)

	problems, err := testutil.GatherAndLint(reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("metric lint: %s: %s", p.Metric, p.Text)
	}

	// A stopped engine: not degraded, no I/O counters carried over.
	a.eng.Stop()
	l.mu.Lock()
	a.running = false
	l.mu.Unlock()
	expect(t, reg, "stopped", "mdcluster_array_running", 0)
	expect(t, reg, "stopped", "mdcluster_array_degraded", 0)
}

// TestArrayMetricsSync: while a resync copies (throttled so that it is
// seen running), the sync series report its kind and size, and its
// progress moves; once it ends they fall back to zero and the copied
// bytes stay counted.
func TestArrayMetricsSync(t *testing.T) {
	l, reg := metricsLayer(t, 256) // KiB/s: 3 MiB takes about 12 s
	u := [16]byte{4, 5, 6}
	a := runRAID1(t, l, u, memberFiles(t, 2, 5<<20))
	l.mu.Lock()
	a.md = "/dev/md/md0"
	l.mu.Unlock()
	sectors := uint64(a.eng.Size() / 512)
	expect(t, reg, "before", "mdcluster_array_sync_running", 0, "kind", "resync")
	expect(t, reg, "before", "mdcluster_array_sync_total_sectors", 0)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- a.eng.Sync(ctx, array.SyncRequest{Kind: array.SyncResync, Lo: 0, Hi: sectors, Targets: []uint32{1}})
	}()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, _ := metricValue(t, reg, "mdcluster_array_sync_done_sectors", map[string]string{"array": "/dev/md/md0"})
		r, _ := metricValue(t, reg, "mdcluster_array_sync_running", map[string]string{"array": "/dev/md/md0", "kind": "resync"})
		if r == 1 && v > 0 {
			break
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("no running resync with progress seen in 10s (running %v, done %v)", r, v)
		}
		time.Sleep(50 * time.Millisecond)
	}
	expect(t, reg, "syncing", "mdcluster_array_sync_running", 0, "kind", "recovery")
	expect(t, reg, "syncing", "mdcluster_array_sync_total_sectors", float64(sectors))
	if v, _ := metricValue(t, reg, "mdcluster_array_sync_done_sectors", map[string]string{"array": "/dev/md/md0"}); v >= float64(sectors) {
		t.Fatalf("syncing: done %v of %d sectors: the throttled resync cannot have finished", v, sectors)
	}
	cancel()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("resync did not stop after its context ended")
	}
	expect(t, reg, "stopped", "mdcluster_array_sync_running", 0, "kind", "resync")
	expect(t, reg, "stopped", "mdcluster_array_sync_total_sectors", 0)
	expect(t, reg, "stopped", "mdcluster_array_sync_done_sectors", 0)
	if v, _ := metricValue(t, reg, "mdcluster_array_sync_copied_bytes_total", map[string]string{"array": "/dev/md/md0"}); v <= 0 {
		t.Fatalf("stopped: %v bytes copied counted, want some", v)
	}
}

// TestStartRegistersArrayMetrics: Start puts the array collector into the
// registry the daemon gives it, so the daemon's /metrics carries the
// arrays; a second registration (a layer started twice on one registry)
// is refused with an error, not a panic.
func TestStartRegistersArrayMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	cfg := &config.Config{RAID: config.RAID{SpeedLimitMin: 1000, SpeedLimitMax: 200000}}
	env := daemon.ArrayEnv{Config: cfg, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Metrics: reg}
	l := New()
	l.testNodeID = 1
	if err := l.Start(context.Background(), env); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	a := runRAID1(t, l, [16]byte{1, 1, 1}, memberFiles(t, 2, 5<<20))
	l.mu.Lock()
	a.md = "/dev/md/md0"
	l.mu.Unlock()
	if err := a.eng.WriteAt(bytes.Repeat([]byte{1}, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
	expect(t, reg, "started", "mdcluster_array_running", 1)
	expect(t, reg, "started", "mdcluster_array_io_writes_total", 1)
	if err := New().Start(context.Background(), env); err == nil {
		t.Fatal("a second layer registered its collector in the same registry")
	}
}
