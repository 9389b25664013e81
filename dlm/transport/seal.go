package transport

import (
	"crypto/aes"
	"crypto/cipher"
	"encoding/binary"
	"errors"
	"fmt"
)

// After the key proofs every frame travels sealed, as a record:
//
//	offset size field
//	     0    4 length n of what follows (big-endian)
//	     4    n AES-256-GCM ciphertext of the frame (header and payload), then the 16-byte tag
//
// The length is the additional authenticated data. The 12-byte GCM nonce
// is 4 zero bytes and the record's number in its direction (from 0), which
// both ends count, so it is never sent: each direction of each connection
// has its own key (see sessionKeys), so a (key, nonce) pair is never used
// twice, and a record that was modified, injected, replayed, reordered or
// taken from another connection does not open.

const (
	keyLen     = 32 // AES-256
	tagLen     = 16
	recHdrLen  = 4
	sealedOver = recHdrLen + tagLen // bytes a record adds to a frame
)

// errAuth: a record did not open. The connection is reset and nothing in
// the record is used.
var errAuth = errors.New("record failed authentication")

// aeadDir is one direction's cipher and record counter.
type aeadDir struct {
	aead  cipher.AEAD
	ctr   uint64
	nonce [12]byte
}

func newAEADDir(key []byte) (*aeadDir, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	g, err := cipher.NewGCM(b)
	if err != nil {
		return nil, err
	}
	return &aeadDir{aead: g}, nil
}

func (d *aeadDir) next() []byte {
	binary.BigEndian.PutUint64(d.nonce[4:], d.ctr)
	d.ctr++
	return d.nonce[:]
}

// seal appends the record of frame (a complete plaintext frame) to dst.
func (d *aeadDir) seal(dst, frame []byte) []byte {
	start := len(dst)
	dst = append(dst, 0, 0, 0, 0)
	dst = append(dst, frame...)
	return d.finish(dst, start)
}

// finish seals the record begun at dst[start]: 4 bytes reserved for the
// length, then the plaintext frame up to len(dst).
func (d *aeadDir) finish(dst []byte, start int) []byte {
	ptLen := len(dst) - start - recHdrLen
	if cap(dst)-len(dst) < tagLen {
		nb := make([]byte, len(dst), 2*cap(dst)+tagLen)
		copy(nb, dst)
		dst = nb
	}
	binary.BigEndian.PutUint32(dst[start:], uint32(ptLen+tagLen))
	pt := dst[start+recHdrLen : len(dst)]
	out := d.aead.Seal(pt[:0], d.next(), pt, dst[start:start+recHdrLen])
	return dst[:start+recHdrLen+len(out)]
}

// open decrypts a record body in place; hdr is its 4-byte length.
func (d *aeadDir) open(hdr, body []byte) ([]byte, error) {
	pt, err := d.aead.Open(body[:0], d.next(), body, hdr)
	if err != nil {
		return nil, fmt.Errorf("%w: record %d", errAuth, d.ctr-1)
	}
	return pt, nil
}

// recordLen checks a record's length prefix against the largest frame.
func recordLen(hdr []byte, maxPayload int) (int, error) {
	n := int(binary.BigEndian.Uint32(hdr))
	if n < HeaderSize+tagLen || n > HeaderSize+maxPayload+tagLen {
		return 0, fmt.Errorf("%w: record of %d bytes (a frame needs %d to %d)", ErrMalformed, n, HeaderSize+tagLen, HeaderSize+maxPayload+tagLen)
	}
	return n, nil
}
