package transport

import (
	"bufio"
	"bytes"
	"io"
	"log/slog"
	"net"
	"testing"
)

func fuzzTransport(f *testing.F) *Transport {
	cfg := DefaultConfig()
	cfg.NodeID, cfg.ListenAddr, cfg.ClusterKey = 2, "127.0.0.1:0", testKey
	cfg.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	cfg.Peers = map[NodeID]string{1: "127.0.0.1:1"}
	cfg.Handler = func(NodeID, LockspaceID, uint64, []byte) {}
	cfg.MaxFrameSize = 8192
	tr, err := New(cfg)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { tr.Close() })
	return tr
}

// FuzzHandshake feeds arbitrary bytes to the acceptor's side of the
// handshake: it must fail (nobody without the key completes it) and never
// panic or hang.
func FuzzHandshake(f *testing.F) {
	tr := fuzzTransport(f)
	f.Add(helloFrame(FrameHello, &hello{From: 1, To: 2}))
	f.Add(append(helloFrame(FrameHello, &hello{From: 1, To: 2}), macFrame(FrameAuth, make([]byte, macLen))...))
	f.Add([]byte("GET / HTTP/1.1\r\n\r\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		if _, _, err := tr.acceptHandshake(newConn(&bytesConn{r: bytes.NewReader(in)})); err == nil {
			t.Fatal("a handshake completed without the key")
		}
	})
}

// bytesConn is a connection whose peer sent r and takes whatever is written.
type bytesConn struct {
	net.Conn // nil: only the methods below are used
	r        *bytes.Reader
}

func (c *bytesConn) Read(b []byte) (int, error)  { return c.r.Read(b) }
func (c *bytesConn) Write(b []byte) (int, error) { return len(b), nil }
func (c *bytesConn) Close() error                { return nil }

// FuzzLiveStream feeds a live connection's reader sealed records made from
// arbitrary plaintext (split at the lengths in the input) and raw bytes
// after them: the reader must reject or process them without panicking.
func FuzzLiveStream(f *testing.F) {
	tr := fuzzTransport(f)
	p := (*tr.peers.Load())[1]
	key := make([]byte, keyLen)
	f.Add([]byte{80}, dataFrame(1, message(0, 40)), []byte{})
	f.Add([]byte{40, 40}, append(EncodeFrame(nil, &Frame{Header: Header{Type: FrameAck, Ack: 0}}), dataFrame(1, nil)...), []byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, cuts, plain, tail []byte) {
		enc, _ := newAEADDir(key)
		var stream []byte
		for _, n := range cuts {
			k := min(int(n), len(plain))
			stream = enc.seal(stream, plain[:k])
			plain = plain[k:]
		}
		stream = append(stream, tail...)
		c := newConn(nil)
		c.recv, _ = newAEADDir(key)
		c.br = bufio.NewReaderSize(bytes.NewReader(stream), 4096)
		p.mu.Lock()
		p.recvSeq.Store(0)
		p.nextSeq, p.ackedIn = 1, 0
		p.ackedInA.Store(0)
		p.mu.Unlock()
		for range len(cuts) + 1 {
			if err := p.readFrame(c); err != nil {
				return
			}
		}
	})
}
