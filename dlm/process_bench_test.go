package dlm_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// Nodes of a real cluster are separate processes on separate machines. Two
// nodes inside one test process share one Go scheduler, and every hand-off
// between their goroutines can bounce between the two cores. The
// "two-processes" sub-benchmarks put the other end (the lock master, or the
// raw echo server) in a child process, as a cluster has it, so that the lock
// and the raw round trip are compared in the same setting.

const childEnv = "DLM_BENCH_CHILD"

// TestBenchChild is not a test: it is the child process of the two-process
// benchmarks (selected by DLM_BENCH_CHILD). It serves until its stdin closes.
func TestBenchChild(t *testing.T) {
	mode := os.Getenv(childEnv)
	if mode == "" {
		t.Skip("only runs as the child of a two-process benchmark")
	}
	if err := runChild(mode); err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

func runChild(mode string) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	fmt.Println("addr", ln.Addr().String())
	switch mode {
	case "echo":
		go func() {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.(*net.TCPConn).SetNoDelay(true)
			buf := make([]byte, 64)
			for {
				if _, err := io.ReadFull(c, buf); err != nil {
					return
				}
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}()
		fmt.Println("ready")
	case "master":
		parent := os.Getenv("DLM_BENCH_PARENT")
		node, err := dlm.NewNode(dlm.Config{ID: 2, Listener: ln, ClusterKey: testKey, Logger: quietLogger(),
			Peers: map[dlm.NodeID]string{1: parent}})
		if err != nil {
			return err
		}
		defer node.Close()
		ls, err := node.Open("bench", dlm.OpenOptions{})
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if _, err := ls.Lock(ctx, "remote", dlm.NL, 0); err != nil { // become and stay master
			return err
		}
		fmt.Println("ready")
	default:
		return fmt.Errorf("unknown child mode %q", mode)
	}
	_, _ = io.Copy(io.Discard, os.Stdin) // until the parent goes away
	return nil
}

// startChild runs this test binary as a child in the given mode and returns
// the address it listens on once it is ready.
func startChild(b *testing.B, mode string, env ...string) string {
	b.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestBenchChild$", "-test.bench=^$")
	cmd.Env = append(append(os.Environ(), childEnv+"="+mode), env...)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		stdin.Close()
		_ = cmd.Wait()
	})
	sc := bufio.NewScanner(stdout)
	var addr string
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, "addr "):
			addr = strings.TrimPrefix(line, "addr ")
		case line == "ready":
			go io.Copy(io.Discard, stdout)
			return addr
		case strings.HasPrefix(line, "error:"):
			b.Fatalf("child %s: %s", mode, line)
		}
	}
	b.Fatalf("child %s exited before it was ready", mode)
	return ""
}

// tcpRoundTripTwoProcesses is BenchmarkTCPRoundTrip with the echo server in
// a child process.
func tcpRoundTripTwoProcesses(b *testing.B) {
	addr := startChild(b, "echo")
	c, err := net.Dial("tcp", addr)
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	pingPong(b, c)
}

// lockUnlockRemoteTwoProcesses is BenchmarkLockUnlockRemote with the master
// node in a child process.
func lockUnlockRemoteTwoProcesses(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	addr := startChild(b, "master", "DLM_BENCH_PARENT="+ln.Addr().String())
	node, err := dlm.NewNode(dlm.Config{ID: 1, Listener: ln, ClusterKey: testKey, Logger: quietLogger(),
		Peers: map[dlm.NodeID]string{2: addr}})
	if err != nil {
		b.Fatal(err)
	}
	defer node.Close()
	ls, err := node.Open("bench", dlm.OpenOptions{})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	for i := range 100 {
		l, err := ls.Lock(ctx, "remote", dlm.EX, 0)
		if err != nil {
			b.Fatal(err)
		}
		if m := masterOf(ls, "remote"); i == 0 && m != 2 {
			b.Fatalf("master is node %d, want the child (2)", m)
		}
		_ = l.Unlock(ctx, 0)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		l, err := ls.Lock(ctx, "remote", dlm.EX, 0)
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Unlock(ctx, 0); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pairs/s")
}
