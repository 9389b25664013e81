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
// one broadcast plus one round trip. It also reports the lock manager's
// frames per broadcast (all nodes together) and the CPU time the
// process (all three nodes and the echo end) used per broadcast and per
// round trip (getrusage around each block; its granularity needs thousands
// of ops): on two processors a broadcast is mostly bound by it, and on a
// machine shared with other work it moves less than the wall times.
//
// Node 1 joins first, so it masters the token and message locks, and each
// receiver masters its own ack locks, mailbox and copy lock: the placement
// a long-running array settles into for its most frequent sender. The
// token (and with it the receivers' mailboxes) stays cached at node 1
// between broadcasts (Config.ReleaseToken unset).
func BenchmarkBroadcast3(b *testing.B) { benchBroadcast(b, 3, false) }

// BenchmarkBroadcast2 is BenchmarkBroadcast3 with one receiver: the same
// critical path without two receivers competing for the CPUs.
func BenchmarkBroadcast2(b *testing.B) { benchBroadcast(b, 2, false) }

// BenchmarkBroadcast3Ack is BenchmarkBroadcast3 without the mailboxes
// (Config.NoMailbox): every receiver is asked through its ack locks and
// reads the message lock, the protocol before the mailboxes.
func BenchmarkBroadcast3Ack(b *testing.B) { benchBroadcast(b, 3, true) }

func benchBroadcast(b *testing.B, nodes int, noMailbox bool) {
	c := startCluster(b, nodes, func(cfg *Config) { cfg.NoMailbox = noMailbox })
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
	var tBcast, tPing, cBcast, cPing time.Duration
	frames := func() (n uint64) {
		for _, nd := range c.nodes {
			n += nd.dn.Controller().Transport().Stats().FramesSent
		}
		return n
	}
	f0 := frames()
	b.ReportAllocs()
	b.ResetTimer()
	for done := 0; done < b.N; {
		n := min(block, b.N-done)
		c0, t0 := cpuTime(), time.Now()
		for range n {
			bcast()
		}
		c1, t1 := cpuTime(), time.Now()
		for range n {
			ping()
		}
		tPing += time.Since(t1)
		cPing += cpuTime() - c1
		tBcast += t1.Sub(t0)
		cBcast += c1 - c0
		done += n
	}
	b.StopTimer()
	b.ReportMetric(float64(frames()-f0)/float64(b.N), "frames/bcast")
	b.ReportMetric(float64(tBcast.Nanoseconds())/float64(b.N), "bcast-ns")
	b.ReportMetric(float64(tPing.Nanoseconds())/float64(b.N), "rtt-ns")
	b.ReportMetric(float64(tBcast)/float64(tPing), "bcast/rtt")
	if cBcast > 0 && cPing > 0 {
		b.ReportMetric(float64(cBcast.Nanoseconds())/float64(b.N), "bcast-cpu-ns")
		b.ReportMetric(float64(cPing.Nanoseconds())/float64(b.N), "rtt-cpu-ns")
	}
}
