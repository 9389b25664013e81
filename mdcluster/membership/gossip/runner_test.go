package gossip

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
	"github.com/mdcluster/mdcluster/mdcluster/membership/apply"
)

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// hookLog records the hooks a Runner calls, in order.
type hookLog struct {
	mu    sync.Mutex
	lines []string
}

func (h *hookLog) add(format string, args ...any) {
	h.mu.Lock()
	h.lines = append(h.lines, fmt.Sprintf(format, args...))
	h.mu.Unlock()
}

func (h *hookLog) snapshot() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return slices.Clone(h.lines)
}

func (h *hookLog) waitFor(t *testing.T, prefix string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		for _, l := range h.snapshot() {
			if strings.HasPrefix(l, prefix) {
				return l
			}
		}
		time.Sleep(time.Millisecond)
	}
	t.Fatalf("no %q hook; hooks so far: %q", prefix, h.snapshot())
	return ""
}

// TestRunnerAppliesThroughApplier: a one-node cluster forms its first view
// through the Runner; the hooks see the applier's order (persist, stop,
// recover into the view's own generation), and the agreement hears
// RecoveryDone only after the lockspace reported its recovery.
func TestRunnerAppliesThroughApplier(t *testing.T) {
	var h hookLog
	r, err := NewRunner(RunnerConfig{
		Agreement: membership.Config{Self: 1, Quorum: ddraid.Config{DataNodes: []NodeID{1}, Quorum: 1}},
		Tick:      time.Millisecond,
		Logger:    quiet(),
		Send:      func(NodeID, []byte) error { return nil },
		Hooks: Hooks{
			Persist: func(membership.HardState) error { h.add("persist"); return nil },
			Quorate: func(q bool) { h.add("quorate %v", q) },
			Stop:    func(apply.Stop) { h.add("stop") },
			Recover: func(rc apply.Recovery) error {
				h.add("recover %d %v", rc.Gen, rc.Members)
				return nil
			},
			RecoveryDone: func(gen uint64) { h.add("done %d", gen) },
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	r.LockspaceOpened("md0", 0)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	defer func() { cancel(); <-done }()
	r.SetAlive([]NodeID{1})

	rec := h.waitFor(t, "recover ")
	gen := r.View().Gen
	if want := fmt.Sprintf("recover %d [1]", gen); rec != want || gen == 0 {
		t.Fatalf("recover hook %q, view gen %d: want %q", rec, gen, want)
	}
	lines := h.snapshot()
	iPersist, iStop, iRec := slices.Index(lines, "persist"), slices.Index(lines, "stop"), slices.Index(lines, rec)
	if iPersist < 0 || iStop < 0 || iPersist > iRec || iStop > iRec {
		t.Fatalf("hooks %q: want persist and stop before the recovery", lines)
	}
	time.Sleep(20 * time.Millisecond) // ticks pass: still no RecoveryDone
	if slices.ContainsFunc(h.snapshot(), func(l string) bool { return strings.HasPrefix(l, "done") }) {
		t.Fatalf("RecoveryDone before the lockspace recovered: %q", h.snapshot())
	}
	r.LockspaceRecovered("md0", gen)
	if got, want := h.waitFor(t, "done "), fmt.Sprintf("done %d", gen); got != want {
		t.Fatalf("RecoveryDone hook %q, want %q", got, want)
	}
	h.waitFor(t, "quorate true")
}

// TestRunnerStopsWhenPersistFails: a hard state that cannot be stored ends
// Run with the error, and no message leaves after it.
func TestRunnerStopsWhenPersistFails(t *testing.T) {
	var sent sync.Mutex
	nsent := 0
	r, err := NewRunner(RunnerConfig{
		Agreement: membership.Config{Self: 1, Quorum: ddraid.Config{DataNodes: []NodeID{1, 2, 3}, Quorum: 2}},
		Tick:      time.Millisecond,
		Logger:    quiet(),
		Send:      func(NodeID, []byte) error { sent.Lock(); nsent++; sent.Unlock(); return nil },
		Hooks:     Hooks{Persist: func(membership.HardState) error { return errors.New("disk gone") }},
	})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- r.Run(context.Background()) }()
	r.SetAlive([]NodeID{1, 2, 3}) // node 1 coordinates: its PREPARE needs a persisted promise
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "disk gone") {
			t.Fatalf("Run ended with %v, want the persist error", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run went on after a persist failure")
	}
	sent.Lock()
	defer sent.Unlock()
	if nsent != 0 {
		t.Fatalf("%d messages sent without a durable promise", nsent)
	}
}
