package dlm_test

import (
	"context"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// pinMaster makes node ls the master of resource and keeps it so with an NL
// lock (the VMS idiom for keeping a resource's mastery and directory entry).
func pinMaster(b *testing.B, ls *dlm.Lockspace, resource string) {
	b.Helper()
	if _, err := ls.Lock(context.Background(), resource, dlm.NL, 0); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkLockUnlockRemote: 2 nodes, the master on the other node; one op is
// a synchronous EX lock + unlock pair from node 1 (the unlock is sent without
// waiting, as Linux does). The other node runs in this process or, as in a
// real cluster, in a process of its own.
func BenchmarkLockUnlockRemote(b *testing.B) {
	b.Run("in-process", lockUnlockRemoteInProcess)
	b.Run("two-processes", lockUnlockRemoteTwoProcesses)
}

func lockUnlockRemoteInProcess(b *testing.B) {
	c := startCluster(b, 2, nil)
	ls := c.open(b, "bench", 0)
	pinMaster(b, ls[1], "remote")
	ctx := context.Background()
	// Warm the master cache.
	if l, err := ls[0].Lock(ctx, "remote", dlm.EX, 0); err != nil {
		b.Fatal(err)
	} else {
		_ = l.Unlock(ctx, 0)
	}
	b.ReportAllocs()
	for b.Loop() {
		l, err := ls[0].Lock(ctx, "remote", dlm.EX, 0)
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Unlock(ctx, 0); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pairs/s")
}

// BenchmarkLockUnlockMasterLocal3: a 3-node lockspace, the resource mastered
// on the requesting node: no message is sent, so it should cost what a
// single-node lockspace does.
func BenchmarkLockUnlockMasterLocal3(b *testing.B) {
	c := startCluster(b, 3, nil)
	ls := c.open(b, "bench", 0)
	pinMaster(b, ls[0], "local")
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		l, err := ls[0].Lock(ctx, "local", dlm.EX, 0)
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Unlock(ctx, 0); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pairs/s")
}

// BenchmarkRemoteThroughput: 3 nodes, 64 concurrent requesters (spread over
// the nodes) each on its own resource; the resources' masters are spread
// over all nodes, and every requester's master is another node. Reports
// lock + unlock pairs per second for the whole cluster.
func BenchmarkRemoteThroughput(b *testing.B) {
	const requesters = 64
	c := startCluster(b, 3, nil)
	ls := c.open(b, "bench", 0)
	ctx := context.Background()
	for r := range requesters {
		pinMaster(b, ls[(r+1)%3], fmt.Sprintf("t%d", r)) // master: the next node
	}
	b.ReportAllocs()
	b.ResetTimer()
	var wg sync.WaitGroup
	per := b.N/requesters + 1
	for r := range requesters {
		wg.Add(1)
		go func() {
			defer wg.Done()
			node := ls[r%3]
			name := fmt.Sprintf("t%d", r)
			for range per {
				l, err := node.Lock(ctx, name, dlm.EX, 0)
				if err != nil {
					b.Error(err)
					return
				}
				if err := l.Unlock(ctx, 0); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ReportMetric(float64(per*requesters)/b.Elapsed().Seconds(), "pairs/s")
}

// BenchmarkRemoteVsTCP measures the ratio the remote-locking target is
// stated in, robustly on a noisy machine: it alternates blocks of remote
// lock + unlock pairs (2 nodes in this process, master on the other node,
// as BenchmarkLockUnlockRemote) with blocks of raw 64-byte TCP round trips
// (as BenchmarkTCPRoundTrip), so both see the same machine state, and
// reports each one's time and their ratio. One op is one pair plus one
// round trip.
func BenchmarkRemoteVsTCP(b *testing.B) {
	c := startCluster(b, 2, nil)
	ls := c.open(b, "bench", 0)
	pinMaster(b, ls[1], "remote")
	ctx := context.Background()
	pair := func() {
		l, err := ls[0].Lock(ctx, "remote", dlm.EX, 0)
		if err != nil {
			b.Fatal(err)
		}
		if err := l.Unlock(ctx, 0); err != nil {
			b.Fatal(err)
		}
	}
	conn, wait := startEcho(b)
	defer func() {
		conn.Close()
		if err := wait(); err != nil {
			b.Error(err)
		}
	}()
	buf := make([]byte, 64)
	ping := func() {
		if _, err := conn.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(conn, buf); err != nil {
			b.Fatal(err)
		}
	}
	for range 200 { // warm both paths, the master cache included
		pair()
		ping()
	}
	const block = 64
	var tPair, tPing time.Duration
	b.ReportAllocs()
	b.ResetTimer()
	for done := 0; done < b.N; {
		n := min(block, b.N-done)
		t0 := time.Now()
		for range n {
			pair()
		}
		t1 := time.Now()
		for range n {
			ping()
		}
		tPing += time.Since(t1)
		tPair += t1.Sub(t0)
		done += n
	}
	b.StopTimer()
	b.ReportMetric(float64(tPair.Nanoseconds())/float64(b.N), "pair-ns")
	b.ReportMetric(float64(tPing.Nanoseconds())/float64(b.N), "rtt-ns")
	b.ReportMetric(float64(tPair)/float64(tPing), "pair/rtt")
	b.ReportMetric(float64((tPair-tPing).Nanoseconds())/float64(b.N), "pair-rtt-ns")
}
