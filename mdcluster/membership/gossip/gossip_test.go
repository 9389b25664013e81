package gossip

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
	"github.com/mdcluster/mdcluster/mdcluster/membership"
	"github.com/mdcluster/mdcluster/mdcluster/membership/apply"
)

func TestDeriveKey(t *testing.T) {
	if _, err := DeriveKey([]byte("short")); err == nil {
		t.Fatal("a 5-byte cluster key was accepted")
	}
	a, err := DeriveKey([]byte("0123456789abcdef-cluster-a"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := DeriveKey([]byte("0123456789abcdef-cluster-b"))
	if len(a) != 32 || bytes.Equal(a, b) {
		t.Fatalf("keys %x %x: want 32 bytes, different per cluster", a, b)
	}
}

func TestProfiles(t *testing.T) {
	key := []byte("0123456789abcdef")
	lan, err := MemberlistConfig(Config{Self: 7, ClusterKey: key, Profile: LAN})
	if err != nil {
		t.Fatal(err)
	}
	fast, err := MemberlistConfig(Config{Self: 7, ClusterKey: key, Profile: Fast, Port: 7000})
	if err != nil {
		t.Fatal(err)
	}
	if lan.ProbeInterval != time.Second || fast.ProbeInterval != 100*time.Millisecond || fast.ProbeTimeout != 50*time.Millisecond {
		t.Fatalf("probe intervals: lan %v, fast %v/%v", lan.ProbeInterval, fast.ProbeInterval, fast.ProbeTimeout)
	}
	// The minimum suspicion timeout for a small cluster is SuspicionMult
	// probe intervals: it must stay well under a second in the fast profile.
	if s := time.Duration(fast.SuspicionMult) * fast.ProbeInterval; s >= 500*time.Millisecond {
		t.Fatalf("fast suspicion timeout %v", s)
	}
	// The VM profile: a healthy node descheduled for up to a second must
	// be able to refute its suspicion in time (the suspicion timeout, what
	// a stall must outlast to exclude it), and a crashed node must still
	// be declared dead within 2 s: at most two probe intervals until a
	// probe of it fails (both survivors probe it in turn), then the
	// suspicion.
	vm, err := MemberlistConfig(Config{Self: 7, ClusterKey: key, Profile: VM})
	if err != nil {
		t.Fatal(err)
	}
	suspicion := time.Duration(vm.SuspicionMult) * vm.ProbeInterval
	if detect := 2*vm.ProbeInterval + suspicion; suspicion < time.Second || detect > 2*time.Second || vm.ProbeTimeout >= vm.ProbeInterval {
		t.Fatalf("vm profile: probe %v/%v, suspicion %v, detection up to %v", vm.ProbeInterval, vm.ProbeTimeout, suspicion, detect)
	}
	if VM.String() != "vm" {
		t.Fatalf("VM.String() = %q", VM.String())
	}
	if fast.Name != "7" || fast.BindAddr != "127.0.0.1" || fast.BindPort != 7000 || len(fast.SecretKey) != 32 {
		t.Fatalf("fast config: name %q bind %s:%d key %d bytes", fast.Name, fast.BindAddr, fast.BindPort, len(fast.SecretKey))
	}
	if _, err := MemberlistConfig(Config{Self: 0, ClusterKey: key}); err == nil {
		t.Fatal("node 0 accepted")
	}
}

func TestSlogWriterLevels(t *testing.T) {
	var buf bytes.Buffer
	w := &slogWriter{l: slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	w.Write([]byte("[WARN] memberlist: Was able to connect to 2 over TCP but UDP probes failed\n"))
	w.Write([]byte("[DEBUG] memberlist: Stream connection\n"))
	out := buf.String()
	if !bytes.Contains([]byte(out), []byte("level=WARN msg=\"memberlist: Was able")) || !bytes.Contains([]byte(out), []byte("level=DEBUG")) {
		t.Fatalf("log output:\n%s", out)
	}
}

// testNode is one daemon's membership side: a Detector, a Runner, and the
// installs it saw.
type testNode struct {
	id     NodeID
	det    *Detector
	run    *Runner
	cancel context.CancelFunc
	done   chan error

	mu       sync.Mutex
	installs []membership.Install
	deadAt   map[NodeID]time.Time // when the detector dropped a node
}

func (n *testNode) lastView() membership.View { return n.run.View() }

func (n *testNode) deadSince(id NodeID) (time.Time, bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	at, ok := n.deadAt[id]
	return at, ok
}

func startNode(t *testing.T, id NodeID, q ddraid.Config, key []byte, f *fence.TestFencer, logger *slog.Logger) *testNode {
	t.Helper()
	n := &testNode{id: id, deadAt: map[NodeID]time.Time{}, done: make(chan error, 1)}
	var det *Detector
	run, err := NewRunner(RunnerConfig{
		Agreement: membership.Config{Self: id, Quorum: q},
		Tick:      10 * time.Millisecond,
		Send: func(to NodeID, p []byte) error {
			if det == nil {
				return errors.New("not started")
			}
			return det.Send(to, p)
		},
		Hooks: Hooks{
			Recover: func(rc apply.Recovery) error {
				n.mu.Lock()
				n.installs = append(n.installs, rc.Install)
				n.mu.Unlock()
				return nil
			},
			Fence: func(ctx context.Context, req membership.FenceRequest) error {
				_, err := f.Fence(ctx, fence.Request{Node: req.Node, Generation: req.Gen, FailedAt: time.Now()})
				return err
			},
		},
		Logger: logger,
	})
	if err != nil {
		t.Fatal(err)
	}
	n.run = run
	det, err = NewDetector(Config{Self: id, ClusterKey: key, Profile: testProfile(), Logger: logger},
		func(alive []NodeID) {
			now := time.Now()
			n.mu.Lock()
			for _, o := range []NodeID{1, 2, 3} {
				if !slices.Contains(alive, o) {
					if _, ok := n.deadAt[o]; !ok {
						n.deadAt[o] = now
					}
				} else {
					delete(n.deadAt, o)
				}
			}
			n.mu.Unlock()
			run.SetAlive(alive)
		},
		run.Deliver)
	if err != nil {
		t.Fatal(err)
	}
	n.det = det
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	go func() { n.done <- run.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-n.done
		det.Shutdown()
	})
	return n
}

// testProfile is Fast, or LAN with MEMBERSHIP_GOSSIP_PROFILE=lan, or VM
// with MEMBERSHIP_GOSSIP_PROFILE=vm (to measure those profiles' detection
// times; they take seconds).
func testProfile() Profile {
	switch os.Getenv("MEMBERSHIP_GOSSIP_PROFILE") {
	case "lan":
		return LAN
	case "vm":
		return VM
	}
	return Fast
}

func waitFor(t *testing.T, limit time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > limit {
			t.Fatalf("timed out after %v waiting for %s", limit, what)
		}
		time.Sleep(2 * time.Millisecond)
	}
	return time.Since(start)
}

// TestFastProfileDetectsCrashAndAgrees runs three real memberlist instances
// on 127.0.0.1 with the fast profile and the Agreement on top, kills one
// without a leave, and checks that the others declare it dead, fence it and
// install a view without it. The times are logged; the limits are only
// generous guards.
func TestFastProfileDetectsCrashAndAgrees(t *testing.T) {
	if testing.Short() {
		t.Skip("real sockets and timers")
	}
	q := ddraid.Config{DataNodes: []NodeID{1, 2, 3}, Quorum: 2}
	key := []byte("test cluster key, 32 bytes long!")
	logger := slog.New(slog.NewTextHandler(newTestWriter(t), &slog.HandlerOptions{Level: slog.LevelWarn}))
	var f fence.TestFencer
	nodes := []*testNode{startNode(t, 1, q, key, &f, logger), startNode(t, 2, q, key, &f, logger), startNode(t, 3, q, key, &f, logger)}
	for _, n := range nodes[1:] {
		if err := n.det.Join([]string{nodes[0].det.Addr()}); err != nil {
			t.Fatal(err)
		}
	}
	all := []NodeID{1, 2, 3}
	formed := waitFor(t, 10*time.Second, "a view of all three nodes", func() bool {
		for _, n := range nodes {
			if !slices.Equal(n.lastView().Members, all) || !n.run.Quorate() {
				return false
			}
		}
		return true
	})
	t.Logf("view of %v formed %v after joining", all, formed.Round(time.Millisecond))

	// Kill node 3: its gossip stops without a leave, like a crash.
	victim := nodes[2]
	killed := time.Now()
	victim.cancel()
	if err := victim.det.Shutdown(); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes[:2] {
		waitFor(t, 10*time.Second, "the failure detector to drop node 3", func() bool { _, ok := n.deadSince(3); return ok })
		at, _ := n.deadSince(3)
		t.Logf("node %s: node 3 declared dead after %v", n.id, at.Sub(killed).Round(time.Millisecond))
	}
	installed := waitFor(t, 10*time.Second, "a view without node 3", func() bool {
		for _, n := range nodes[:2] {
			if !slices.Equal(n.lastView().Members, []NodeID{1, 2}) {
				return false
			}
		}
		return true
	})
	t.Logf("view without node 3 installed on both survivors %v after the kill", time.Since(killed).Round(time.Millisecond))
	_ = installed
	calls := f.Calls()
	if len(calls) == 0 || calls[0].Node != 3 {
		t.Fatalf("fence calls %+v, want node 3 fenced", calls)
	}
	for _, n := range nodes[:2] {
		n.mu.Lock()
		in := n.installs[len(n.installs)-1]
		n.mu.Unlock()
		if !slices.Equal(in.Departed, []NodeID{3}) || in.Reset {
			t.Fatalf("node %s install %+v", n.id, in)
		}
	}
	// Generous guard only: the fast profile is meant to detect well under a
	// second; on a loaded test machine allow much more.
	for _, n := range nodes[:2] {
		if at, _ := n.deadSince(3); at.Sub(killed) > 5*time.Second && testProfile() == Fast {
			t.Errorf("node %s took %v to declare node 3 dead", n.id, at.Sub(killed))
		}
	}
}

// testWriter logs through t until the test ends; memberlist's goroutines
// may still log after Shutdown, and those lines are dropped.
type testWriter struct {
	t      *testing.T
	mu     *sync.Mutex
	closed *bool
}

func newTestWriter(t *testing.T) testWriter {
	w := testWriter{t: t, mu: new(sync.Mutex), closed: new(bool)}
	t.Cleanup(func() { w.mu.Lock(); *w.closed = true; w.mu.Unlock() })
	return w
}

func (w testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !*w.closed {
		w.t.Log(string(bytes.TrimRight(p, "\n")))
	}
	return len(p), nil
}
