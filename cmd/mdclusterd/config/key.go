package config

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"fmt"
)

// Cluster key limits.
const (
	// MinKeyBytes is the shortest cluster key accepted, after decoding: a
	// 256-bit secret, the strength of the keys derived from it.
	MinKeyBytes = 32
	// MaxKeyFileBytes bounds the key file.
	MaxKeyFileBytes = 64 << 10
)

// KeyForm says how a key file was read.
type KeyForm string

// The forms of a key file, tried in this order.
const (
	// KeyHex: the file holds only hex digits (an even number, at least
	// 2*MinKeyBytes), optionally surrounded by whitespace, e.g. written
	// by `openssl rand -hex 32`.
	KeyHex KeyForm = "hex"
	// KeyBase64: the file holds standard padded base64 (optionally
	// surrounded by whitespace) of at least MinKeyBytes, e.g. written by
	// `openssl rand -base64 32`.
	KeyBase64 KeyForm = "base64"
	// KeyRaw: anything else; the file's bytes are the key, e.g. written by
	// `head -c 32 /dev/urandom`.
	KeyRaw KeyForm = "raw"
)

// DecodeKey turns a key file's content into the key. Hex is tried first,
// then base64, then the raw bytes; the decoded key must have at least
// MinKeyBytes. Raw random bytes are practically never all hex digits or
// valid base64, so the order does not misread a raw key.
func DecodeKey(content []byte) ([]byte, KeyForm, error) {
	t := bytes.TrimSpace(content)
	if len(t) > 0 && len(t)%2 == 0 && isHex(t) {
		k := make([]byte, len(t)/2)
		if _, err := hex.Decode(k, t); err == nil {
			return checkKeyLen(k, KeyHex)
		}
	}
	if len(t) > 0 && len(t)%4 == 0 {
		k := make([]byte, base64.StdEncoding.DecodedLen(len(t)))
		if n, err := base64.StdEncoding.Strict().Decode(k, t); err == nil {
			return checkKeyLen(k[:n], KeyBase64)
		}
	}
	return checkKeyLen(bytes.Clone(content), KeyRaw)
}

func checkKeyLen(k []byte, form KeyForm) ([]byte, KeyForm, error) {
	if len(k) < MinKeyBytes {
		return nil, form, fmt.Errorf("the key is %d bytes (read as %s), need at least %d: write e.g. `openssl rand -hex %d` to it",
			len(k), form, MinKeyBytes, MinKeyBytes)
	}
	return k, form, nil
}

func isHex(b []byte) bool {
	for _, c := range b {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
			return false
		}
	}
	return true
}
