package broadcast

import (
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// stepLog collects Config.trace events with their times.
type stepLog struct {
	mu  sync.Mutex
	on  bool
	evs []stepEvent
}

type stepEvent struct {
	at   time.Time
	node dlm.NodeID
	step string
}

func (l *stepLog) add(step string, node dlm.NodeID) {
	at := time.Now()
	l.mu.Lock()
	if l.on {
		l.evs = append(l.evs, stepEvent{at, node, step})
	}
	l.mu.Unlock()
}

// TestTraceWarmBroadcast times the steps of warm broadcasts as
// BenchmarkBroadcast3 runs them (three nodes on loopback TCP, node 1
// sending, token cached, each receiver mastering its ack locks) and logs
// the median time of each step from the start of Send, per node: where a
// broadcast's time goes (go test -run TraceWarm -v ./broadcast/). It checks
// only that every broadcast went through every step.
func TestTraceWarmBroadcast(t *testing.T) {
	var log stepLog
	c := startCluster(t, 3, func(cfg *Config) { cfg.trace = log.add })
	c.joinAll()
	ctx := withGuard(t)
	send := c.nodes[0].b
	msg := Message{Type: MetadataUpdated, RaidSlot: 1}
	for range 200 {
		if _, err := send.Send(ctx, msg); err != nil {
			t.Fatal(err)
		}
	}
	const n = 300
	starts := make([]time.Time, 0, n+1)
	log.mu.Lock()
	log.on = true
	log.mu.Unlock()
	for range n {
		starts = append(starts, time.Now())
		if _, err := send.Send(ctx, msg); err != nil {
			t.Fatal(err)
		}
	}
	starts = append(starts, time.Now())
	// One more: each receiver answers it after its last step of the
	// previous one, on the same goroutine.
	if _, err := send.Send(ctx, msg); err != nil {
		t.Fatal(err)
	}
	log.mu.Lock()
	log.on = false
	evs := log.evs
	log.mu.Unlock()

	type key struct {
		node dlm.NodeID
		step string
	}
	offsets := map[key][]time.Duration{}
	i := 0
	for _, e := range evs {
		for i+1 < len(starts) && !e.at.Before(starts[i+1]) {
			i++
		}
		if i >= n {
			break
		}
		k := key{e.node, e.step}
		offsets[k] = append(offsets[k], e.at.Sub(starts[i]))
	}
	type row struct {
		key
		median time.Duration
		count  int
	}
	var rows []row
	for k, ds := range offsets { // each step's time, from the Send it fell in
		slices.Sort(ds)
		rows = append(rows, row{k, ds[len(ds)/2], len(ds)})
	}
	slices.SortFunc(rows, func(a, b row) int { return int(a.median - b.median) })
	var sb strings.Builder
	var total []time.Duration
	for j := range n {
		total = append(total, starts[j+1].Sub(starts[j]))
	}
	slices.Sort(total)
	fmt.Fprintf(&sb, "median of %d warm broadcasts, from the start of Send (whole Send: %v):\n", n, total[n/2])
	for _, r := range rows {
		fmt.Fprintf(&sb, "  %9v  node %d  %s (%d)\n", r.median.Round(100*time.Nanosecond), r.node, r.step, r.count)
	}
	t.Log(sb.String())

	// A receiver's last step may land after its sender went on (the
	// grant reached the sender before the receiver's goroutine ran again),
	// so count the events, not the broadcasts they fell in (above, such a
	// step counts from the next Send's start: medians are not affected).
	count := map[key]int{}
	for _, e := range evs {
		count[key{e.node, e.step}]++
	}
	for _, step := range []string{"send: ask", "send: ack granted", "recv: listener granted", "recv: message read", "recv: replied"} {
		for _, node := range []dlm.NodeID{2, 3} {
			if got := count[key{node, step}]; got < n {
				t.Errorf("node %d, step %q: %d of %d broadcasts", node, step, got, n)
			}
		}
	}
}
