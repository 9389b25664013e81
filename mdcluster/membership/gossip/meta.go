package gossip

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"strconv"

	"github.com/hashicorp/memberlist"
)

// Node metadata is the small record each node publishes through memberlist
// (Delegate.NodeMeta, at most memberlist.MetaMaxSize bytes), so that what
// the other nodes need to reach it travels with its membership instead of
// being configured on every node. Layout (see docs/node.md):
//
//	version  1 byte   MetaVersion
//	fields   type (1 byte), length (2 bytes, big-endian), value; any number
//	mac      32 bytes HMAC-SHA256(meta key, node ID (4 bytes, big-endian) ‖ version ‖ fields)
//
// The meta key is derived from the cluster key for this purpose only
// (DeriveMetaKey). The MAC binds the record to the node ID it is published
// under, so a record cannot be replayed as another node's. Unknown field
// types are skipped, so newer nodes can add fields that older ones ignore;
// a new version is for changes older nodes must not misread.

// MetaVersion is the metadata format version this code writes and reads.
const MetaVersion = 1

// Field types of version 1. 0 is reserved (it would make zero padding look
// like a field).
const (
	// metaDLMAddr is the node's DLM transport address, "host:port".
	metaDLMAddr = 1
)

const (
	metaMACLen    = sha256.Size
	metaFieldHdr  = 3
	metaMinLen    = 1 + metaMACLen
	metaMaxAddr   = 255 // a DNS name is at most 253 bytes; the port and colon fit in what is left of 512
	metaKeyLabel  = "mdcluster gossip node metadata v1"
	metaMaxLength = memberlist.MetaMaxSize
)

// Errors returned (wrapped, with the details) by DecodeMeta and EncodeMeta.
var (
	// ErrMetaMalformed: the record does not parse, or a field's value is
	// not acceptable (e.g. an address nobody can dial).
	ErrMetaMalformed = errors.New("malformed node metadata")
	// ErrMetaAuth: the MAC does not verify: the record was not made with
	// this cluster's key for this node ID.
	ErrMetaAuth = errors.New("node metadata failed authentication")
)

// Meta is what a node publishes about itself through gossip.
type Meta struct {
	// DLMAddr is the address ("host:port") the node's DLM transport
	// accepts connections on, as other nodes must dial it: not a wildcard
	// address, not port 0. Empty means the node publishes none (its peers
	// then need it in their static configuration).
	DLMAddr string
}

// DeriveMetaKey derives the key that authenticates node metadata from the
// cluster key. It is distinct from the gossip encryption key (DeriveKey),
// so metadata stays authenticated by the cluster key even if gossip were
// run without encryption or with a separately managed keyring.
func DeriveMetaKey(clusterKey []byte) ([]byte, error) {
	if len(clusterKey) < 16 {
		return nil, fmt.Errorf("gossip: cluster key of %d bytes, need at least 16", len(clusterKey))
	}
	k, err := hkdf.Key(sha256.New, clusterKey, nil, metaKeyLabel, 32)
	if err != nil {
		return nil, fmt.Errorf("gossip: deriving the metadata key: %w", err)
	}
	return k, nil
}

// metaMAC computes the MAC of body (version and fields) published by id.
func metaMAC(key []byte, id NodeID, body []byte) []byte {
	h := hmac.New(sha256.New, key)
	var idb [4]byte
	binary.BigEndian.PutUint32(idb[:], uint32(id))
	h.Write(idb[:])
	h.Write(body)
	return h.Sum(nil)
}

// EncodeMeta builds node id's metadata record, authenticated with key (from
// DeriveMetaKey). It refuses values other nodes would refuse, so that a
// misconfiguration shows at start instead of as silence on the others.
func EncodeMeta(key []byte, id NodeID, m Meta) ([]byte, error) {
	b := []byte{MetaVersion}
	if m.DLMAddr != "" {
		if err := CheckDialAddr(m.DLMAddr); err != nil {
			return nil, fmt.Errorf("gossip: node %s: encoding metadata: %w", id, err)
		}
		b = append(b, metaDLMAddr)
		b = binary.BigEndian.AppendUint16(b, uint16(len(m.DLMAddr)))
		b = append(b, m.DLMAddr...)
	}
	if len(b)+metaMACLen > metaMaxLength {
		return nil, fmt.Errorf("gossip: node %s: %w: %d bytes, the limit is %d", id, ErrMetaMalformed, len(b)+metaMACLen, metaMaxLength)
	}
	return append(b, metaMAC(key, id, b)...), nil
}

// DecodeMeta verifies and parses the metadata record b published by node
// id. The MAC is checked before anything else is read. Any error wraps
// ErrMetaAuth or ErrMetaMalformed and says what was wrong; nothing of a
// record that fails is returned.
func DecodeMeta(key []byte, id NodeID, b []byte) (Meta, error) {
	if len(b) < metaMinLen || len(b) > metaMaxLength {
		return Meta{}, fmt.Errorf("%w: %d bytes, want %d to %d", ErrMetaMalformed, len(b), metaMinLen, metaMaxLength)
	}
	body, mac := b[:len(b)-metaMACLen], b[len(b)-metaMACLen:]
	if !hmac.Equal(mac, metaMAC(key, id, body)) {
		return Meta{}, fmt.Errorf("%w: not made with this cluster's key for node %s", ErrMetaAuth, id)
	}
	return parseMetaBody(body)
}

// parseMetaBody parses an authenticated record without its MAC.
func parseMetaBody(body []byte) (Meta, error) {
	var m Meta
	if body[0] != MetaVersion {
		return Meta{}, fmt.Errorf("%w: version %d, this node reads version %d", ErrMetaMalformed, body[0], MetaVersion)
	}
	haveAddr := false
	for rest := body[1:]; len(rest) > 0; {
		if len(rest) < metaFieldHdr {
			return Meta{}, fmt.Errorf("%w: %d stray bytes after the last field", ErrMetaMalformed, len(rest))
		}
		typ, n := rest[0], int(binary.BigEndian.Uint16(rest[1:]))
		if len(rest)-metaFieldHdr < n {
			return Meta{}, fmt.Errorf("%w: field %d of %d bytes, only %d left", ErrMetaMalformed, typ, n, len(rest)-metaFieldHdr)
		}
		val := rest[metaFieldHdr : metaFieldHdr+n]
		rest = rest[metaFieldHdr+n:]
		switch typ {
		case 0:
			return Meta{}, fmt.Errorf("%w: field type 0 is reserved", ErrMetaMalformed)
		case metaDLMAddr:
			if haveAddr {
				return Meta{}, fmt.Errorf("%w: DLM address given twice", ErrMetaMalformed)
			}
			haveAddr = true
			if err := CheckDialAddr(string(val)); err != nil {
				return Meta{}, fmt.Errorf("%w: DLM address: %w", ErrMetaMalformed, err)
			}
			m.DLMAddr = string(val)
		default:
			// A field of a newer node: skipped.
		}
	}
	return m, nil
}

// CheckDialAddr checks that addr is an address other nodes can dial:
// printable ASCII, "host:port", host not empty and not a wildcard address,
// port 1-65535. Both sides of the metadata exchange apply it (and
// mdcluster/node applies it to its configuration), so an address that
// could never work is refused where it is made, not found out by every
// dial failing.
func CheckDialAddr(addr string) error {
	if len(addr) > metaMaxAddr {
		return fmt.Errorf("address of %d bytes, at most %d", len(addr), metaMaxAddr)
	}
	for i := 0; i < len(addr); i++ {
		if c := addr[i]; c <= ' ' || c > '~' {
			return fmt.Errorf("address %q: byte %#x at %d is not printable ASCII", addr, c, i)
		}
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("address %q: %w", addr, err)
	}
	if host == "" {
		return fmt.Errorf("address %q has no host", addr)
	}
	if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
		return fmt.Errorf("address %q is a wildcard address, which other nodes cannot dial", addr)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || p == 0 {
		return fmt.Errorf("address %q: port must be a number from 1 to 65535", addr)
	}
	return nil
}
