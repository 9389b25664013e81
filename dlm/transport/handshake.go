package transport

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// The handshake runs on every new connection before any data frame:
//
//	dialer   -> acceptor  Hello     {from, to, nonceD}                 clear
//	acceptor -> dialer    Challenge {from, to, nonceA}                 clear
//	dialer   -> acceptor  Auth      {macD}                             clear
//	dialer   -> acceptor  Session   {incD, streamForD}                 sealed
//	acceptor -> dialer    Proof     {macA}                             clear
//	acceptor -> dialer    Session   {incA, streamForA, ack=ackA}       sealed
//	dialer   -> acceptor  Session   {incD, streamForD, ack=ackD}       sealed
//
// T    = Hello body | Challenge body (both IDs, both nonces)
// macD = HMAC-SHA256(key, "dialer" label | T)
// macA = HMAC-SHA256(key, "acceptor" label | T)
// keys = HKDF-SHA256(key, salt = nonceD | nonceA,
//                    info = direction label | dialer ID | acceptor ID), one per direction
//
// Nothing a node sends before its peer proved the key depends on the key or
// on its state: the Challenge is the acceptor's own IDs and a fresh nonce.
// The acceptor proves the key only after verifying macD; the dialer's
// session record, sent right after macD, is sealed with a key the acceptor
// can only derive if it holds the cluster key. Each MAC covers the other
// side's fresh nonce, so a recorded handshake cannot be replayed, and the
// labels differ, so a MAC cannot be reflected. Incarnations and receive
// positions travel only inside the sealed channel; from then on every frame
// is sealed (see seal.go).

const (
	nonceLen = 32
	macLen   = sha256.Size

	helloBodyLen   = 4 + 4 + nonceLen
	authBodyLen    = macLen
	sessionBodyLen = 8 + 8

	handshakeMaxBody = helloBodyLen

	labelAcceptor = "mdcluster dlm transport v2 acceptor\x00"
	labelDialer   = "mdcluster dlm transport v2 dialer\x00"
	labelKeyD2A   = "mdcluster dlm transport v2 key dialer->acceptor\x00"
	labelKeyA2D   = "mdcluster dlm transport v2 key acceptor->dialer\x00"
)

// handshakeBodySize is the exact payload size of a handshake frame type.
func handshakeBodySize(t FrameType) int {
	switch t {
	case FrameHello, FrameChallenge:
		return helloBodyLen
	case FrameAuth, FrameProof:
		return authBodyLen
	case FrameSession:
		return sessionBodyLen
	}
	return -1
}

// hello is the body of Hello and Challenge.
type hello struct {
	From, To NodeID
	Nonce    [nonceLen]byte
}

func (h *hello) put(b []byte) {
	binary.BigEndian.PutUint32(b[0:], uint32(h.From))
	binary.BigEndian.PutUint32(b[4:], uint32(h.To))
	copy(b[8:8+nonceLen], h.Nonce[:])
}

func parseHello(b []byte) (hello, error) {
	var h hello
	if len(b) != helloBodyLen {
		return h, fmt.Errorf("%w: hello body of %d bytes, want %d", ErrMalformed, len(b), helloBodyLen)
	}
	h.From = NodeID(binary.BigEndian.Uint32(b[0:]))
	h.To = NodeID(binary.BigEndian.Uint32(b[4:]))
	copy(h.Nonce[:], b[8:8+nonceLen])
	if h.From == 0 || h.To == 0 {
		return h, fmt.Errorf("%w: handshake with zero node ID", ErrMalformed)
	}
	return h, nil
}

// newNonce returns a fresh random nonce.
func newNonce() ([nonceLen]byte, error) {
	var n [nonceLen]byte
	if _, err := rand.Read(n[:]); err != nil {
		return n, fmt.Errorf("handshake nonce: %w", err)
	}
	return n, nil
}

// helloFrame encodes a Hello (or, with t FrameChallenge, a Challenge).
func helloFrame(t FrameType, h *hello) []byte {
	b := make([]byte, HeaderSize+helloBodyLen)
	putHeader(b, t, 0, helloBodyLen, 0, 0, 0)
	h.put(b[HeaderSize:])
	return b
}

// macFrame encodes an Auth or Proof frame carrying mac.
func macFrame(t FrameType, mac []byte) []byte {
	b := make([]byte, HeaderSize+authBodyLen)
	putHeader(b, t, 0, authBodyLen, 0, 0, 0)
	copy(b[HeaderSize:], mac)
	return b
}

// transcriptMAC is the proof of the key for one side.
func transcriptMAC(key []byte, label string, helloBody, challengeBody []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(label))
	m.Write(helloBody)
	m.Write(challengeBody)
	return m.Sum(nil)
}

// sessionKeys derives the two per-connection keys (dialer to acceptor,
// acceptor to dialer) from the cluster key, both nonces and both IDs.
func sessionKeys(key []byte, dialer, acceptor NodeID, nonceD, nonceA []byte) (d2a, a2d []byte, err error) {
	salt := make([]byte, 0, 2*nonceLen)
	salt = append(salt, nonceD...)
	salt = append(salt, nonceA...)
	info := func(label string) string {
		var ids [8]byte
		binary.BigEndian.PutUint32(ids[0:], uint32(dialer))
		binary.BigEndian.PutUint32(ids[4:], uint32(acceptor))
		return label + string(ids[:])
	}
	prk, err := hkdf.Extract(sha256.New, key, salt)
	if err != nil {
		return nil, nil, err
	}
	if d2a, err = hkdf.Expand(sha256.New, prk, info(labelKeyD2A), keyLen); err != nil {
		return nil, nil, err
	}
	if a2d, err = hkdf.Expand(sha256.New, prk, info(labelKeyA2D), keyLen); err != nil {
		return nil, nil, err
	}
	return d2a, a2d, nil
}

// session is a side's stream state, exchanged sealed.
type session struct {
	Incarnation uint64
	StreamFor   uint64 // the peer incarnation our outgoing stream is bound to (0: none)
	Ack         uint64 // highest sequence received on the peer's stream (in the header)
}

// sessionFrame encodes a Session frame (plaintext, to be sealed).
func sessionFrame(s session) []byte {
	b := make([]byte, HeaderSize+sessionBodyLen)
	putHeader(b, FrameSession, 0, sessionBodyLen, 0, 0, s.Ack)
	binary.BigEndian.PutUint64(b[HeaderSize:], s.Incarnation)
	binary.BigEndian.PutUint64(b[HeaderSize+8:], s.StreamFor)
	return b
}

// parseSession decodes an opened Session frame.
func parseSession(f Frame) (session, error) {
	if f.Type != FrameSession || len(f.Payload) != sessionBodyLen {
		return session{}, fmt.Errorf("%w: got %v frame, want session", ErrMalformed, f.Type)
	}
	s := session{
		Incarnation: binary.BigEndian.Uint64(f.Payload),
		StreamFor:   binary.BigEndian.Uint64(f.Payload[8:]),
		Ack:         f.Ack,
	}
	if s.Incarnation == 0 {
		return s, fmt.Errorf("%w: session with zero incarnation", ErrMalformed)
	}
	return s, nil
}
