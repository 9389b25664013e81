package transport

import (
	"io"
	"log/slog"
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// benchPair starts nodes 1 and 2 on loopback; node 2 answers every frame
// whose payload starts with 'Q' with the same payload, and ignores others.
// It returns node 1 and the channel node 1's handler signals on each reply.
func benchPair(b *testing.B) (*Transport, chan struct{}) {
	b.Helper()
	return benchPairWith(b, nil)
}

// benchPairWith is benchPair with node 1 calling onReply (instead of
// signalling the channel) for each reply after the warm-up.
func benchPairWith(b *testing.B, onReply func()) (*Transport, chan struct{}) {
	b.Helper()
	var warm atomic.Bool
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	replies := make(chan struct{}, 1)
	var n2 *Transport
	mk := func(id NodeID, h Handler) *Transport {
		cfg := DefaultConfig()
		cfg.NodeID = id
		cfg.ListenAddr = "127.0.0.1:0"
		cfg.ClusterKey = testKey
		cfg.Logger = quiet
		cfg.Handler = h
		tr, err := New(cfg)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { tr.Close() })
		return tr
	}
	n1 := mk(1, func(NodeID, LockspaceID, uint64, []byte) {
		if onReply != nil && warm.Load() {
			onReply()
			return
		}
		replies <- struct{}{}
	})
	n2 = mk(2, func(from NodeID, ls LockspaceID, gen uint64, p []byte) {
		if len(p) > 0 && p[0] == 'Q' {
			n2.Send(from, ls, gen, p)
		}
	})
	n1.SetPeers(map[NodeID]string{2: n2.Addr().String()})
	n2.SetPeers(map[NodeID]string{1: n1.Addr().String()})
	// Warm up: the first message also waits for the connection.
	msg := make([]byte, 64)
	msg[0] = 'Q'
	for range 100 {
		n1.Send(2, 1, 1, msg)
		select {
		case <-replies:
		case <-time.After(time.Minute):
			b.Fatal("no reply")
		}
	}
	warm.Store(true)
	return n1, replies
}

// BenchmarkTransportRoundTrip measures a request/reply of a 64-byte payload
// between two nodes through the transport, from the caller's point of view:
// Send, then block until the reply's handler signals. Compare with
// BenchmarkTCPRoundTrip in package dlm, run in the same invocation.
func BenchmarkTransportRoundTrip(b *testing.B) {
	n1, replies := benchPair(b)
	msg := make([]byte, 64)
	msg[0] = 'Q'
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if err := n1.Send(2, 1, 1, msg); err != nil {
			b.Fatal(err)
		}
		<-replies
	}
}

// BenchmarkTransportLockUnlock mimics a remote lock+unlock pair as the DLM
// will issue it: a request and its reply, then an unlock sent without
// waiting for anything.
func BenchmarkTransportLockUnlock(b *testing.B) {
	n1, replies := benchPair(b)
	req := make([]byte, 64)
	req[0] = 'Q'
	unlock := make([]byte, 64)
	unlock[0] = 'U'
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if err := n1.Send(2, 1, 1, req); err != nil {
			b.Fatal(err)
		}
		<-replies
		if err := n1.Send(2, 1, 1, unlock); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkTCPLockUnlockFloor is the raw-TCP floor for
// BenchmarkTransportLockUnlock: over one loopback connection with
// TCP_NODELAY, a 64-byte request, its 64-byte reply, then a 64-byte one-way
// message the server reads and does not answer.
func BenchmarkTCPLockUnlockFloor(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, 64)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			if buf[0] == 'Q' {
				if _, err := c.Write(buf); err != nil {
					return
				}
			}
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	c.(*net.TCPConn).SetNoDelay(true)
	req, unlock, reply := make([]byte, 64), make([]byte, 64), make([]byte, 64)
	req[0], unlock[0] = 'Q', 'U'
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(unlock); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	c.Close()
	<-done
}

// BenchmarkTCPRoundTripHandoff is raw TCP ping-pong shaped like any
// dispatching client: a dedicated goroutine reads the replies and hands each
// to the blocked caller over a channel. The difference from
// BenchmarkTCPRoundTrip is the cost of that one goroutine wake-up, which a
// lock manager whose callers block in Lock pays whatever its transport.
func BenchmarkTCPRoundTripHandoff(b *testing.B) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
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
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	c.(*net.TCPConn).SetNoDelay(true)
	replies := make(chan struct{}, 1)
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		buf := make([]byte, 64)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				return
			}
			replies <- struct{}{}
		}
	}()
	buf := make([]byte, 64)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		<-replies
	}
	b.StopTimer()
	c.Close()
	<-readerDone
}

// BenchmarkTransportRoundTripInline drives the ping-pong from node 1's
// handler, which sends the next request itself, so no caller goroutine is
// woken: it isolates the transport's own cost, to compare with
// BenchmarkTCPRoundTrip.
func BenchmarkTransportRoundTripInline(b *testing.B) {
	var n1 *Transport
	msg := make([]byte, 64)
	msg[0] = 'Q'
	left := 0
	done := make(chan struct{}, 1)
	n1, _ = benchPairWith(b, func() {
		left-- // only the reader goroutine touches left while a run is on
		if left <= 0 {
			done <- struct{}{}
			return
		}
		n1.Send(2, 1, 1, msg)
	})
	b.ReportAllocs()
	b.ResetTimer()
	left = b.N
	n1.Send(2, 1, 1, msg)
	<-done
}
