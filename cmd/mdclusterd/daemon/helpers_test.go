package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
)

// freeGossipPort returns a port free for both TCP and UDP on 127.0.0.1
// (memberlist needs both).
func freeGossipPort(t *testing.T) int {
	t.Helper()
	for range 50 {
		tl, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := tl.Addr().(*net.TCPAddr).Port
		ul, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		tl.Close()
		if err == nil {
			ul.Close()
			return port
		}
	}
	t.Fatal("no free port for gossip")
	return 0
}

// failingAgent writes a fence agent that always fails, so that any fence
// attempt shows in the history as a failure.
func failingAgent(t *testing.T, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "fence_fail")
	if err := os.WriteFile(p, []byte("#!/bin/sh\necho 'test agent: refusing to fence' >&2\nexit 1\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// testConfig is a one-node cluster's configuration in dir.
func testConfig(t *testing.T, dir string) *config.Config {
	t.Helper()
	return &config.Config{
		Path:       filepath.Join(dir, "mdclusterd.toml"),
		NodeID:     1,
		Profile:    config.ProfileStorageLAN,
		DataDir:    filepath.Join(dir, "data"),
		ClusterKey: bytes.Repeat([]byte{7}, 32),
		Gossip:     config.Gossip{BindAddr: "127.0.0.1", Port: freeGossipPort(t)},
		DLM:        config.DLM{ListenAddr: "127.0.0.1:0"},
		Quorum:     ddraid.Config{DataNodes: []ddraid.NodeID{1}, Quorum: 1},
		Fencing: config.Fencing{Timeout: 5 * time.Second,
			Levels: []config.FenceLevel{{Agents: []config.FenceAgent{{Path: failingAgent(t, dir)}}}}},
		Log:     config.Log{Format: "text", Level: "debug"},
		Metrics: config.Metrics{Listen: "127.0.0.1:0", MaxConnections: 4},
		Control: config.Control{Socket: filepath.Join(dir, "run", "mdclusterd.sock"), MaxRequestBytes: 4096,
			MaxConnections: 4, IdleTimeout: 10 * time.Second, RefusedLogInterval: time.Hour},
		Shutdown: config.Shutdown{LeaveTimeout: 10 * time.Second},
	}
}

// syncBuffer is a log sink the test can read while the daemon writes.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func testLogger(w *syncBuffer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// eventually polls cond until it holds; the deadline only guards against
// a hang.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func dial(t *testing.T, path string) *ctl.Client {
	t.Helper()
	c, err := ctl.Dial(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func ctx10(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func jsonUnmarshal(b []byte, v any) error { return json.Unmarshal(b, v) }
