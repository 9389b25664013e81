package nbd

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// benchDevice is the size of the benchmarks' device; sequential writes wrap
// around it.
const benchDevice = 256 << 20

type benchLoad struct {
	name   string
	size   int  // bytes per write
	depth  int  // writes in flight
	random bool // random aligned offsets, else sequential
}

// BenchmarkNBD compares writes through the NBD server (the test client over
// a unix socket, with depth requests in flight on one connection) with the
// same writes made by calling the backend directly from depth goroutines,
// in the same run. ns/op and MB/s are the NBD path; direct-ns/op is the
// direct path and nbd/direct their ratio, the cost the protocol and socket
// add per write.
//
//	go test -run '^$' -bench BenchmarkNBD -benchtime 2s ./mdcluster/export/nbd/
func BenchmarkNBD(b *testing.B) {
	loads := []benchLoad{
		{"seqwrite-1M-qd1", 1 << 20, 1, false},
		{"randwrite-4k-qd32", 4096, 32, true},
	}
	for _, kind := range []string{"mem", "file"} {
		for _, l := range loads {
			// One device and server per case, shared by the runs the
			// benchmark framework makes with growing b.N, and written
			// in full first: page faults and file-system block
			// allocation would otherwise land on whichever path
			// touched a block first.
			be := benchBackend(b, kind)
			_, sock := startServer(b, Config{Exports: []Export{{Name: "b", Backend: be}}})
			c := dialGo(b, sock, "b")
			b.Run(kind+"/"+l.name, func(b *testing.B) { benchWrites(b, be, c, l) })
		}
	}
}

// benchBackend returns a prefilled device of benchDevice bytes.
func benchBackend(b *testing.B, kind string) Backend {
	var be Backend
	if kind == "mem" {
		be = NewMemBackend(benchDevice)
	} else {
		f, err := OpenFile(tempFile(b, benchDevice), false)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { f.Close() })
		be = f
	}
	chunk := pattern(1<<20, 1)
	for off := int64(0); off < benchDevice; off += int64(len(chunk)) {
		if err := be.WriteAt(chunk, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	if err := be.Flush(); err != nil {
		b.Fatal(err)
	}
	return be
}

// runWrites issues n writes of l from l.depth goroutines, each calling do
// with its own buffer, and returns how long they took.
func runWrites(n int, l benchLoad, do func(p []byte, off int64) error) (time.Duration, error) {
	var next atomic.Int64
	var firstErr atomic.Pointer[error]
	var wg sync.WaitGroup
	start := time.Now()
	for g := 0; g < l.depth; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			p := pattern(l.size, byte(g))
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			for {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				off := (i * int64(l.size)) % benchDevice
				if l.random {
					off = rng.Int64N(benchDevice/int64(l.size)) * int64(l.size)
				}
				if err := do(p, off); err != nil {
					firstErr.CompareAndSwap(nil, &err)
					return
				}
			}
		}(g)
	}
	wg.Wait()
	if e := firstErr.Load(); e != nil {
		return 0, *e
	}
	return time.Since(start), nil
}

func benchWrites(b *testing.B, be Backend, c *client, l benchLoad) {
	viaNBD := func(p []byte, off int64) error {
		_, ch := c.send(cmdWrite, 0, uint64(off), uint32(len(p)), p, 0)
		r := <-ch
		if r.err != nil || r.errno != 0 {
			return fmt.Errorf("write at %d: errno %d, %v", off, r.errno, r.err)
		}
		return nil
	}
	direct := func(p []byte, off int64) error { return be.WriteAt(p, off, 0) }

	b.SetBytes(int64(l.size))
	b.ResetTimer()
	nbdTime, err := runWrites(b.N, l, viaNBD)
	b.StopTimer()
	if err != nil {
		b.Fatal(err)
	}
	directTime, err := runWrites(b.N, l, direct)
	if err != nil {
		b.Fatal(err)
	}
	directNs := float64(directTime.Nanoseconds()) / float64(b.N)
	b.ReportMetric(directNs, "direct-ns/op")
	b.ReportMetric(float64(nbdTime)/float64(directTime), "nbd/direct")
}
