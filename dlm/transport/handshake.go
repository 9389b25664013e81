package transport

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// The handshake runs on every new connection before any data frame, and is
// three frames long:
//
//	dialer   -> acceptor  Hello     {from, to, incarnation, streamFor, nonceD}
//	acceptor -> dialer    Challenge {from, to, incarnation, streamFor, nonceA, ack, macA}
//	dialer   -> acceptor  Auth      {ack, macD}
//
// macA = HMAC-SHA256(key, "acceptor" label | Hello body | Challenge body without mac)
// macD = HMAC-SHA256(key, "dialer" label | Hello body | Challenge body without mac | Auth ack)
//
// Each MAC covers the other side's fresh nonce, so neither can be replayed,
// and distinct labels stop a MAC from being reflected back. Both node IDs and
// both incarnations are inside the MACs, so a node holding the key cannot be
// talked into believing it reached someone else. streamFor is the peer
// incarnation the sender's outgoing stream is bound to (0: not yet bound) and
// ack is the highest sequence received on the stream coming the other way;
// together they let both sides agree whether the streams continue (and what
// to resend) or start afresh.

const (
	nonceLen = 32
	macLen   = sha256.Size

	helloBodyLen     = 4 + 4 + 8 + 8 + nonceLen
	challengeMACOff  = helloBodyLen + 8
	challengeBodyLen = challengeMACOff + macLen
	authBodyLen      = 8 + macLen

	handshakeMaxBody = challengeBodyLen

	labelAcceptor = "mdcluster dlm transport v1 acceptor\x00"
	labelDialer   = "mdcluster dlm transport v1 dialer\x00"
)

// handshakeBodySize is the exact payload size of a handshake frame type.
func handshakeBodySize(t FrameType) int {
	switch t {
	case FrameHello:
		return helloBodyLen
	case FrameChallenge:
		return challengeBodyLen
	case FrameAuth:
		return authBodyLen
	}
	return -1
}

// hello is the identity part shared by Hello and Challenge.
type hello struct {
	From, To    NodeID
	Incarnation uint64
	StreamFor   uint64
	Nonce       [nonceLen]byte
}

func (h *hello) put(b []byte) {
	binary.BigEndian.PutUint32(b[0:], uint32(h.From))
	binary.BigEndian.PutUint32(b[4:], uint32(h.To))
	binary.BigEndian.PutUint64(b[8:], h.Incarnation)
	binary.BigEndian.PutUint64(b[16:], h.StreamFor)
	copy(b[24:24+nonceLen], h.Nonce[:])
}

func parseHello(b []byte) (hello, error) {
	var h hello
	if len(b) < helloBodyLen {
		return h, fmt.Errorf("%w: handshake body of %d bytes, need %d", ErrMalformed, len(b), helloBodyLen)
	}
	h.From = NodeID(binary.BigEndian.Uint32(b[0:]))
	h.To = NodeID(binary.BigEndian.Uint32(b[4:]))
	h.Incarnation = binary.BigEndian.Uint64(b[8:])
	h.StreamFor = binary.BigEndian.Uint64(b[16:])
	copy(h.Nonce[:], b[24:24+nonceLen])
	if h.From == 0 || h.To == 0 || h.Incarnation == 0 {
		return h, fmt.Errorf("%w: handshake with zero node ID or incarnation", ErrMalformed)
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

// helloFrame encodes a Hello frame.
func helloFrame(h *hello) []byte {
	b := make([]byte, HeaderSize+helloBodyLen)
	putHeader(b, FrameHello, 0, helloBodyLen, 0, 0, 0)
	h.put(b[HeaderSize:])
	return b
}

// challengeFrame encodes a Challenge frame and computes its MAC over the
// transcript so far (the Hello body as received).
func challengeFrame(key, helloBody []byte, h *hello, ack uint64) []byte {
	b := make([]byte, HeaderSize+challengeBodyLen)
	putHeader(b, FrameChallenge, 0, challengeBodyLen, 0, 0, 0)
	body := b[HeaderSize:]
	h.put(body)
	binary.BigEndian.PutUint64(body[helloBodyLen:], ack)
	copy(body[challengeMACOff:], acceptorMAC(key, helloBody, body[:challengeMACOff]))
	return b
}

// parseChallenge splits a Challenge body into its parts.
func parseChallenge(b []byte) (h hello, ack uint64, mac []byte, err error) {
	if len(b) != challengeBodyLen {
		return h, 0, nil, fmt.Errorf("%w: challenge body of %d bytes, want %d", ErrMalformed, len(b), challengeBodyLen)
	}
	h, err = parseHello(b)
	if err != nil {
		return h, 0, nil, err
	}
	return h, binary.BigEndian.Uint64(b[helloBodyLen:]), b[challengeMACOff:], nil
}

// authFrame encodes the Auth frame that completes the dialer's side.
func authFrame(key, helloBody, challengeBody []byte, ack uint64) []byte {
	b := make([]byte, HeaderSize+authBodyLen)
	putHeader(b, FrameAuth, 0, authBodyLen, 0, 0, 0)
	body := b[HeaderSize:]
	binary.BigEndian.PutUint64(body, ack)
	copy(body[8:], dialerMAC(key, helloBody, challengeBody[:challengeMACOff], body[:8]))
	return b
}

// parseAuth splits an Auth body into its parts.
func parseAuth(b []byte) (ack uint64, mac []byte, err error) {
	if len(b) != authBodyLen {
		return 0, nil, fmt.Errorf("%w: auth body of %d bytes, want %d", ErrMalformed, len(b), authBodyLen)
	}
	return binary.BigEndian.Uint64(b), b[8:], nil
}

func acceptorMAC(key, helloBody, challengeNoMAC []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(labelAcceptor))
	m.Write(helloBody)
	m.Write(challengeNoMAC)
	return m.Sum(nil)
}

func dialerMAC(key, helloBody, challengeNoMAC, ackBytes []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte(labelDialer))
	m.Write(helloBody)
	m.Write(challengeNoMAC)
	m.Write(ackBytes)
	return m.Sum(nil)
}
