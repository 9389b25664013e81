package broadcast

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// echoConn returns a loopback TCP connection (TCP_NODELAY) whose other end,
// a goroutine in this process, echoes 64-byte frames: the raw round trip a
// broadcast is compared with, as dlm's BenchmarkTCPRoundTrip measures it.
func echoConn(b *testing.B) net.Conn {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		c, err := ln.Accept()
		ln.Close()
		if err != nil {
			return
		}
		defer c.Close()
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
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		ln.Close()
		b.Fatal(err)
	}
	c.(*net.TCPConn).SetNoDelay(true)
	b.Cleanup(func() {
		c.Close()
		<-done
	})
	return c
}

// BenchmarkBroadcast3 measures one broadcast among three nodes in this
// process over loopback TCP (node 1 sends METADATA_UPDATED, nodes 2 and 3
// act with a handler that does nothing and answer; the default lock
// manager configuration) against a raw 64-byte
// TCP round trip, alternating blocks of each so that both see the same
// machine state, and reports each one's time and their ratio. One op is
// one broadcast plus one round trip.
//
// Node 1 joins first, so it masters the token and message locks, and each
// receiver masters its own ack lock: the placement a long-running array
// settles into for its most frequent sender. The token stays cached at
// node 1 between broadcasts (Config.ReleaseToken unset).
func BenchmarkBroadcast3(b *testing.B) { benchBroadcast(b, 3) }

// BenchmarkBroadcast2 is BenchmarkBroadcast3 with one receiver: the same
// critical path without two receivers competing for the CPUs.
func BenchmarkBroadcast2(b *testing.B) { benchBroadcast(b, 2) }

func benchBroadcast(b *testing.B, nodes int) {
	c := startCluster(b, nodes, nil)
	c.joinAll()
	ctx := context.Background()
	send := c.nodes[0].b
	msg := Message{Type: MetadataUpdated, RaidSlot: 1}
	bcast := func() {
		if _, err := send.Send(ctx, msg); err != nil {
			b.Fatal(err)
		}
	}
	conn := echoConn(b)
	buf := make([]byte, 64)
	ping := func() {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			b.Fatal(err)
		}
	}
	for range 200 { // warm both paths: masters cached, token cached
		bcast()
		ping()
	}
	const block = 64
	var tBcast, tPing time.Duration
	b.ReportAllocs()
	b.ResetTimer()
	for done := 0; done < b.N; {
		n := min(block, b.N-done)
		t0 := time.Now()
		for range n {
			bcast()
		}
		t1 := time.Now()
		for range n {
			ping()
		}
		tPing += time.Since(t1)
		tBcast += t1.Sub(t0)
		done += n
	}
	b.StopTimer()
	b.ReportMetric(float64(tBcast.Nanoseconds())/float64(b.N), "bcast-ns")
	b.ReportMetric(float64(tPing.Nanoseconds())/float64(b.N), "rtt-ns")
	b.ReportMetric(float64(tBcast)/float64(tPing), "bcast/rtt")
}
