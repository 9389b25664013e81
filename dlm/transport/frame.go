package transport

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// The wire format of one frame. Everything is big-endian (network order).
//
//	offset size field
//	     0    4 magic "MDLT"
//	     4    1 version (Version)
//	     5    1 frame type (FrameType)
//	     6    2 flags, reserved, must be zero
//	     8    4 lockspace ID
//	    12    4 payload length in bytes
//	    16    8 generation of the lockspace at the sender
//	    24    8 sequence number (data frames only, starting at 1)
//	    32    8 cumulative acknowledgement (highest sequence received in order)
//	    40    n payload
//
// The header has a fixed size so a reader can always ask for exactly
// HeaderSize bytes first and then for the announced payload; the payload
// length is checked against a configured maximum before anything is
// allocated or read, so a hostile length cannot make a node buffer
// gigabytes.

// HeaderSize is the size of the fixed frame header in bytes.
const HeaderSize = 40

// Magic identifies a transport frame ("MDLT"); it lets a reader notice at once
// that it is talking to something that is not a transport peer.
const Magic uint32 = 0x4d444c54

// Version is the frame format version this package writes and accepts. A peer
// speaking another version is refused rather than misread.
const Version uint8 = 2

// Header field offsets, shared by the encoder, the decoder and the code that
// patches the acknowledgement field of already encoded frames.
const (
	offMagic   = 0
	offVersion = 4
	offType    = 5
	offFlags   = 6
	offLS      = 8
	offLen     = 12
	offGen     = 16
	offSeq     = 24
	offAck     = 32
)

// FrameType says what a frame carries.
type FrameType uint8

// Frame types. Data frames carry DLM messages and are the only ones with a
// sequence number; the handshake types appear only before a connection is
// authenticated, Ack only after.
const (
	// FrameData carries one message for the handler.
	FrameData FrameType = 1
	// FrameAck carries only a cumulative acknowledgement; it is sent when
	// there is no data frame to piggyback the acknowledgement on.
	FrameAck FrameType = 2
	// FrameHello is the dialer's first handshake message.
	FrameHello FrameType = 3
	// FrameChallenge is the acceptor's answer to Hello: its identity and
	// its nonce, nothing that depends on the key.
	FrameChallenge FrameType = 4
	// FrameAuth is the dialer's proof of the cluster key.
	FrameAuth FrameType = 5
	// FrameProof is the acceptor's proof of the cluster key, sent only
	// after the dialer's verified.
	FrameProof FrameType = 6
	// FrameSession carries a side's incarnation, stream binding and (in
	// the Ack field) receive position; it only travels sealed, at the end
	// of the handshake.
	FrameSession FrameType = 7
)

// String names the frame type for logs.
func (t FrameType) String() string {
	switch t {
	case FrameData:
		return "data"
	case FrameAck:
		return "ack"
	case FrameHello:
		return "hello"
	case FrameChallenge:
		return "challenge"
	case FrameAuth:
		return "auth"
	case FrameProof:
		return "proof"
	case FrameSession:
		return "session"
	}
	return fmt.Sprintf("FrameType(%d)", uint8(t))
}

// Header is the decoded fixed part of a frame.
type Header struct {
	// Type says what the frame carries.
	Type FrameType
	// Lockspace is the lockspace a data frame belongs to; zero otherwise.
	Lockspace LockspaceID
	// Length is the payload length in bytes.
	Length uint32
	// Generation is the sender's generation of Lockspace (data frames).
	Generation uint64
	// Seq is the data frame's sequence number in its stream, from 1.
	Seq uint64
	// Ack is the highest sequence number the sender has received in order
	// from the receiver (data and ack frames).
	Ack uint64
}

// Frame is a decoded frame. Payload aliases the buffer it was decoded from.
type Frame struct {
	Header
	Payload []byte
}

// ErrMalformed is wrapped by every decoding error, so callers can tell a
// protocol violation (close the connection) from an I/O error.
var ErrMalformed = errors.New("malformed frame")

// EncodeFrame appends the encoding of f to dst and returns the extended
// slice. The Length field of f is ignored: the payload's length is written.
// It does not validate f; the decoder does, on the other side.
func EncodeFrame(dst []byte, f *Frame) []byte {
	var h [HeaderSize]byte
	putHeader(h[:], f.Type, f.Lockspace, uint32(len(f.Payload)), f.Generation, f.Seq, f.Ack)
	dst = append(dst, h[:]...)
	return append(dst, f.Payload...)
}

// putHeader writes a header into b[:HeaderSize]. It is the one place that
// knows the layout on the encoding side; the hot path uses it directly to
// avoid building a Frame.
func putHeader(b []byte, t FrameType, ls LockspaceID, n uint32, gen, seq, ack uint64) {
	_ = b[HeaderSize-1]
	binary.BigEndian.PutUint32(b[offMagic:], Magic)
	b[offVersion] = Version
	b[offType] = byte(t)
	binary.BigEndian.PutUint16(b[offFlags:], 0)
	binary.BigEndian.PutUint32(b[offLS:], uint32(ls))
	binary.BigEndian.PutUint32(b[offLen:], n)
	binary.BigEndian.PutUint64(b[offGen:], gen)
	binary.BigEndian.PutUint64(b[offSeq:], seq)
	binary.BigEndian.PutUint64(b[offAck:], ack)
}

// DecodeHeader decodes and validates the fixed header at the start of b.
// maxPayload bounds the announced payload length. It never panics; every
// error wraps ErrMalformed and says what was wrong.
func DecodeHeader(b []byte, maxPayload int) (Header, error) {
	var h Header
	if len(b) < HeaderSize {
		return h, fmt.Errorf("%w: truncated header: %d of %d bytes", ErrMalformed, len(b), HeaderSize)
	}
	if m := binary.BigEndian.Uint32(b[offMagic:]); m != Magic {
		return h, fmt.Errorf("%w: bad magic %#08x", ErrMalformed, m)
	}
	if v := b[offVersion]; v != Version {
		return h, fmt.Errorf("%w: unsupported version %d (want %d)", ErrMalformed, v, Version)
	}
	if fl := binary.BigEndian.Uint16(b[offFlags:]); fl != 0 {
		return h, fmt.Errorf("%w: reserved flags set: %#04x", ErrMalformed, fl)
	}
	h.Type = FrameType(b[offType])
	h.Lockspace = LockspaceID(binary.BigEndian.Uint32(b[offLS:]))
	h.Length = binary.BigEndian.Uint32(b[offLen:])
	h.Generation = binary.BigEndian.Uint64(b[offGen:])
	h.Seq = binary.BigEndian.Uint64(b[offSeq:])
	h.Ack = binary.BigEndian.Uint64(b[offAck:])
	if maxPayload < 0 || uint64(h.Length) > uint64(maxPayload) {
		return h, fmt.Errorf("%w: payload length %d over maximum %d", ErrMalformed, h.Length, maxPayload)
	}
	switch h.Type {
	case FrameData:
		if h.Seq == 0 {
			return h, fmt.Errorf("%w: data frame with sequence 0", ErrMalformed)
		}
	case FrameAck:
		if h.Length != 0 || h.Seq != 0 || h.Lockspace != 0 || h.Generation != 0 {
			return h, fmt.Errorf("%w: ack frame with payload, sequence, lockspace or generation", ErrMalformed)
		}
	case FrameHello, FrameChallenge, FrameAuth, FrameProof, FrameSession:
		if h.Seq != 0 || (h.Ack != 0 && h.Type != FrameSession) || h.Lockspace != 0 || h.Generation != 0 {
			return h, fmt.Errorf("%w: %v frame with sequence, ack, lockspace or generation", ErrMalformed, h.Type)
		}
		if want := handshakeBodySize(h.Type); int(h.Length) != want {
			return h, fmt.Errorf("%w: %v frame body is %d bytes, want %d", ErrMalformed, h.Type, h.Length, want)
		}
	default:
		return h, fmt.Errorf("%w: unknown frame type %d", ErrMalformed, uint8(h.Type))
	}
	return h, nil
}

// DecodeFrame decodes one complete frame from the start of b and returns it
// with the number of bytes it used. The payload aliases b. A b shorter than
// the frame it starts is reported as truncated. It never panics; every error
// wraps ErrMalformed.
func DecodeFrame(b []byte, maxPayload int) (Frame, int, error) {
	h, err := DecodeHeader(b, maxPayload)
	if err != nil {
		return Frame{}, 0, err
	}
	end := HeaderSize + int(h.Length)
	if len(b) < end {
		return Frame{}, 0, fmt.Errorf("%w: truncated %v frame: payload %d of %d bytes",
			ErrMalformed, h.Type, len(b)-HeaderSize, h.Length)
	}
	return Frame{Header: h, Payload: b[HeaderSize:end:end]}, end, nil
}
