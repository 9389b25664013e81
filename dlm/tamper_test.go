package dlm_test

import (
	"encoding/binary"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// tamperProxy forwards TCP between its listener and target. A one-shot
// action per direction (0: dialer to acceptor, 1: back) may rewrite the
// next chunk read in that direction, given the chunks seen before in it.
type tamperProxy struct {
	ln      net.Listener
	target  string
	mu      sync.Mutex
	action  [2]func(chunk []byte, earlier [][]byte) []byte
	earlier [2][][]byte
	applied atomic.Int64
	conns   []net.Conn
}

func newTamperProxy(t *testing.T, target string) *tamperProxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &tamperProxy{ln: ln, target: target}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, c, s)
			p.mu.Unlock()
			go p.pump(0, c, s)
			go p.pump(1, s, c)
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		p.mu.Lock()
		for _, c := range p.conns {
			c.Close()
		}
		p.mu.Unlock()
	})
	return p
}

func (p *tamperProxy) pump(dir int, src, dst net.Conn) {
	defer dst.Close()
	defer src.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			b := append([]byte(nil), buf[:n]...)
			out := b
			p.mu.Lock()
			if act := p.action[dir]; act != nil {
				p.action[dir] = nil
				out = act(append([]byte(nil), b...), p.earlier[dir])
				p.applied.Add(1)
			}
			p.earlier[dir] = append(p.earlier[dir], b)
			if len(p.earlier[dir]) > 64 {
				p.earlier[dir] = p.earlier[dir][1:]
			}
			p.mu.Unlock()
			if _, werr := dst.Write(out); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *tamperProxy) arm(dir int, f func([]byte, [][]byte) []byte) {
	p.mu.Lock()
	p.action[dir] = f
	p.mu.Unlock()
}

// TestClusterOnPathTampering: two lock managers whose connection runs
// through an on-path proxy that, while both nodes take turns on one
// resource (mastered on node 2), modifies a chunk, injects an earlier one
// (a replay from the past) or repeats the current one (an immediate
// replay), in both directions. Every lock operation is a read-modify-write
// of a counter in the resource's value block under EX, with a check that
// nobody else is inside: a forged or replayed grant would let two holders
// in at once, a lost or doubly applied request or unlock would hang or
// skew the counter. The transport rejects every tampered record and
// reconnects; the counter ends equal to the number of operations, so each
// completed exactly once.
func TestClusterOnPathTampering(t *testing.T) {
	c := startClusterWith(t, 2, nil, func(cfg *dlm.Config) {
		cfg.Transport.ReconnectMin = 2 * time.Millisecond
		cfg.Transport.ReconnectMax = 20 * time.Millisecond
	})
	pr := newTamperProxy(t, c.addrs[2])
	if err := c.nodes[0].SetPeer(2, pr.ln.Addr().String()); err != nil { // node 1 dials node 2 through the proxy
		t.Fatal(err)
	}
	ls := c.open(t, "md0", 8)
	ctx := withGuard(t)
	if _, err := ls[1].Lock(ctx, "r", dlm.NL, 0); err != nil { // node 2 masters r
		t.Fatal(err)
	}
	var inside atomic.Int32
	var ops [2]atomic.Int64
	stop := make(chan struct{})
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	for w := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				l, err := ls[w].Lock(ctx, "r", dlm.EX, dlm.ValBlk)
				if err != nil {
					errs <- err
					return
				}
				if n := inside.Add(1); n != 1 {
					t.Errorf("node %d: %d holders of an EX lock", w+1, n)
				}
				v := make([]byte, 8)
				binary.BigEndian.PutUint64(v, binary.BigEndian.Uint64(l.LVB())+1)
				if err := l.SetLVB(v); err != nil {
					errs <- err
					return
				}
				inside.Add(-1)
				if err := l.Unlock(ctx, dlm.ValBlk); err != nil {
					errs <- err
					return
				}
				ops[w].Add(1)
			}
		}()
	}
	kinds := []struct {
		name string
		f    func(chunk []byte, earlier [][]byte) []byte
	}{
		{"modify", func(c []byte, _ [][]byte) []byte { c[len(c)/2] ^= 0x40; return c }},
		{"inject an earlier chunk", func(c []byte, e [][]byte) []byte {
			if len(e) == 0 {
				return append(append([]byte(nil), c...), c...)
			}
			return append(append([]byte(nil), e[len(e)/2]...), c...)
		}},
		{"replay the chunk", func(c []byte, _ [][]byte) []byte { return append(append([]byte(nil), c...), c...) }},
	}
	bad := func() uint64 { // records rejected and malformed, both nodes
		var n uint64
		for _, nd := range c.nodes {
			st := nd.Controller().Transport().Stats()
			n += st.RecordsRejected + st.MalformedFrames
		}
		return n
	}
	progress := func(what string, n int64) {
		b0, b1 := ops[0].Load(), ops[1].Load()
		eventually(t, what, func() bool { return ops[0].Load() >= b0+n && ops[1].Load() >= b1+n })
	}
	total := 0
	for range 2 {
		for dir := range 2 {
			for _, k := range kinds {
				// Both nodes make progress, so the connection in use is
				// the current one: the tampered chunk belongs to it.
				progress("lock traffic on both nodes", 5)
				bad0 := bad()
				pr.arm(dir, k.f)
				total++
				eventually(t, k.name+" applied", func() bool { return pr.applied.Load() == int64(total) })
				eventually(t, k.name+" rejected", func() bool { return bad() > bad0 })
			}
		}
	}
	progress("lock traffic after the last tampering", 20)
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	l, err := ls[0].Lock(ctx, "r", dlm.PR, dlm.ValBlk)
	if err != nil {
		t.Fatal(err)
	}
	n := ops[0].Load() + ops[1].Load()
	if got := binary.BigEndian.Uint64(l.LVB()); got != uint64(n) {
		t.Fatalf("counter %d after %d operations", got, n)
	}
	var rejected, malformed, conns uint64
	for _, nd := range c.nodes {
		st := nd.Controller().Transport().Stats()
		rejected += st.RecordsRejected
		malformed += st.MalformedFrames
		conns += st.ConnectionsEstablished
	}
	t.Logf("%d tamperings, %d lock operations (node 1 %d, node 2 %d), %d records rejected, %d malformed, %d connections (counted at both ends)",
		total, n, ops[0].Load(), ops[1].Load(), rejected, malformed, conns)
}
