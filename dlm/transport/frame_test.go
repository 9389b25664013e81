package transport

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

func TestFrameRoundTrip(t *testing.T) {
	in := Frame{Header: Header{Type: FrameData, Lockspace: 7, Generation: 9, Seq: 42, Ack: 41}, Payload: []byte("hello")}
	b := EncodeFrame([]byte("prefix"), &in)
	b = b[len("prefix"):]
	if len(b) != HeaderSize+5 {
		t.Fatalf("encoded %d bytes, want %d", len(b), HeaderSize+5)
	}
	out, n, err := DecodeFrame(append(b, "trailing"...), 1024)
	if err != nil {
		t.Fatal(err)
	}
	if n != len(b) {
		t.Fatalf("used %d bytes, want %d", n, len(b))
	}
	in.Length = 5
	if out.Header != in.Header || !bytes.Equal(out.Payload, in.Payload) {
		t.Fatalf("decoded %+v, want %+v", out, in)
	}
}

func TestDecodeRejectsMalformed(t *testing.T) {
	valid := func() []byte {
		return EncodeFrame(nil, &Frame{Header: Header{Type: FrameData, Lockspace: 1, Generation: 1, Seq: 1}, Payload: make([]byte, 16)})
	}
	mutate := func(f func(b []byte) []byte) []byte { return f(valid()) }
	cases := []struct {
		name string
		b    []byte
		max  int
		want string
	}{
		{"empty", nil, 64, "truncated header"},
		{"short header", valid()[:HeaderSize-1], 64, "truncated header"},
		{"bad magic", mutate(func(b []byte) []byte { b[0] ^= 0xff; return b }), 64, "bad magic"},
		{"bad version", mutate(func(b []byte) []byte { b[offVersion] = 9; return b }), 64, "unsupported version"},
		{"flags", mutate(func(b []byte) []byte { b[offFlags+1] = 1; return b }), 64, "reserved flags"},
		{"unknown type", mutate(func(b []byte) []byte { b[offType] = 99; return b }), 64, "unknown frame type"},
		{"over max", valid(), 15, "over maximum"},
		{"truncated payload", valid()[:HeaderSize+3], 64, "truncated data frame"},
		{"data seq 0", mutate(func(b []byte) []byte { clear(b[offSeq : offSeq+8]); return b }), 64, "sequence 0"},
		{"ack with payload", mutate(func(b []byte) []byte { b[offType] = byte(FrameAck); return b }), 64, "ack frame with"},
		{"hello wrong size", mutate(func(b []byte) []byte {
			b[offType] = byte(FrameHello)
			clear(b[offLS : offLS+4])
			clear(b[offGen : offSeq+8])
			return b
		}), 64, "hello frame body is 16 bytes"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := DecodeFrame(tc.b, tc.max)
			if err == nil {
				t.Fatal("decoded without error")
			}
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
		})
	}
}

func TestHandshakeMessages(t *testing.T) {
	key := []byte("0123456789abcdef0123456789abcdef")
	h := hello{From: 1, To: 2, Nonce: [nonceLen]byte{1, 2, 3}}
	hf := helloFrame(FrameHello, &h)
	f, _, err := DecodeFrame(hf, handshakeMaxBody)
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseHello(f.Payload)
	if err != nil || got != h {
		t.Fatalf("hello round trip: %+v, %v", got, err)
	}
	cf := helloFrame(FrameChallenge, &hello{From: 2, To: 1, Nonce: [nonceLen]byte{9}})
	macD := transcriptMAC(key, labelDialer, hf[HeaderSize:], cf[HeaderSize:])
	if bytes.Equal(macD, transcriptMAC(key, labelAcceptor, hf[HeaderSize:], cf[HeaderSize:])) {
		t.Fatal("the two sides' proofs are equal: one could be reflected")
	}
	if bytes.Equal(macD, transcriptMAC([]byte("another key, not the cluster's"), labelDialer, hf[HeaderSize:], cf[HeaderSize:])) {
		t.Fatal("proof verifies with the wrong key")
	}
	af := macFrame(FrameAuth, macD)
	afr, _, err := DecodeFrame(af, handshakeMaxBody)
	if err != nil || !bytes.Equal(afr.Payload, macD) {
		t.Fatalf("auth round trip: %v", err)
	}
	d2a, a2d, err := sessionKeys(key, 1, 2, h.Nonce[:], []byte{9})
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(d2a, a2d) {
		t.Fatal("both directions share a key")
	}
	if x, _, _ := sessionKeys(key, 1, 3, h.Nonce[:], []byte{9}); bytes.Equal(x, d2a) {
		t.Fatal("the key does not depend on the node IDs")
	}
	s := session{Incarnation: 5, StreamFor: 6, Ack: 7}
	enc, err := newAEADDir(d2a)
	if err != nil {
		t.Fatal(err)
	}
	dec, _ := newAEADDir(d2a)
	rec := enc.seal(nil, sessionFrame(s))
	pt, err := dec.open(rec[:recHdrLen], append([]byte(nil), rec[recHdrLen:]...))
	if err != nil {
		t.Fatal(err)
	}
	sf, _, err := DecodeFrame(pt, sessionBodyLen)
	if err != nil {
		t.Fatal(err)
	}
	if gotS, err := parseSession(sf); err != nil || gotS != s {
		t.Fatalf("session round trip: %+v %v", gotS, err)
	}
	// The same record again (a replay) does not open: the counter moved on.
	if _, err := dec.open(rec[:recHdrLen], append([]byte(nil), rec[recHdrLen:]...)); !errors.Is(err, errAuth) {
		t.Fatalf("replayed record: %v", err)
	}
}

func FuzzDecodeFrame(f *testing.F) {
	f.Add(EncodeFrame(nil, &Frame{Header: Header{Type: FrameData, Lockspace: 3, Generation: 2, Seq: 1, Ack: 9}, Payload: []byte("payload")}))
	f.Add(EncodeFrame(nil, &Frame{Header: Header{Type: FrameAck, Ack: 5}}))
	f.Add(helloFrame(FrameHello, &hello{From: 1, To: 2}))
	f.Add(helloFrame(FrameChallenge, &hello{From: 2, To: 1}))
	f.Add(macFrame(FrameAuth, make([]byte, macLen)))
	f.Add(sessionFrame(session{Incarnation: 1, Ack: 3}))
	f.Add([]byte("MDLT"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		fr, n, err := DecodeFrame(b, 4096)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if n < HeaderSize || n > len(b) || int(fr.Length) != len(fr.Payload) {
			t.Fatalf("inconsistent decode: n=%d len=%d length=%d payload=%d", n, len(b), fr.Length, len(fr.Payload))
		}
		// The encoding is canonical: re-encoding gives back the same bytes.
		if re := EncodeFrame(nil, &fr); !bytes.Equal(re, b[:n]) {
			t.Fatalf("re-encoding differs:\n got %x\nwant %x", re, b[:n])
		}
		switch fr.Type {
		case FrameHello, FrameChallenge:
			parseHello(fr.Payload)
		case FrameSession:
			parseSession(fr)
		}
	})
}
