package store

import "fmt"

// A stored key is
//
//	[1 byte n = len(namespace)] [namespace, n bytes] [key]
//
// with 1 <= n <= MaxNamespaceLen. Decoding reads n, then the name, and the
// rest is the key, so distinct (namespace, key) pairs never share a stored
// key, and every key of a namespace starts with that namespace's own
// [n][name]: a crafted key (say one beginning with another name) still sits
// behind its own namespace's prefix, and a prefix scan of one namespace
// cannot reach into another. Keys of one namespace sort bytewise by key.
//
// A first byte of 0 (no namespace) marks the store's own metadata (the
// format version), which no namespace can reach. Keys written before
// namespaces existed ("node/id", "membership/hardstate") begin with a
// letter, above MaxNamespaceLen, so they cannot be mistaken for namespaced
// keys either; Badger migrates them when it opens a directory.

// metaPrefix starts the keys of the store's own metadata.
const metaPrefix = 0

// nsPrefix returns the stored-key prefix shared by every key of ns.
func nsPrefix(ns Namespace) []byte {
	b := make([]byte, 0, 1+len(ns))
	b = append(b, byte(len(ns)))
	return append(b, ns...)
}

// encodeKey returns the stored key of key in ns. ns must be valid.
func encodeKey(ns Namespace, key []byte) []byte {
	b := make([]byte, 0, 1+len(ns)+len(key))
	b = append(b, byte(len(ns)))
	b = append(b, ns...)
	return append(b, key...)
}

// metaKey returns the stored key of the store's own metadata record name.
func metaKey(name string) []byte {
	return append([]byte{metaPrefix}, name...)
}

// decodeKey splits a stored key into its namespace and key, rejecting
// anything encodeKey cannot produce (metadata keys included). The key
// aliases b.
func decodeKey(b []byte) (Namespace, []byte, error) {
	if len(b) == 0 {
		return "", nil, fmt.Errorf("%w: empty stored key", ErrCorrupt)
	}
	n := int(b[0])
	if n == metaPrefix {
		return "", nil, fmt.Errorf("%w: stored key %q is store metadata, not a namespaced key", ErrCorrupt, b)
	}
	if n > MaxNamespaceLen || len(b) < 1+n {
		return "", nil, fmt.Errorf("%w: stored key %q: namespace length %d does not fit", ErrCorrupt, b, n)
	}
	ns := Namespace(b[1 : 1+n])
	if err := ns.Validate(); err != nil {
		return "", nil, fmt.Errorf("%w: stored key %q: %v", ErrCorrupt, b, err)
	}
	key := b[1+n:]
	if len(key) > MaxKeyLen {
		return "", nil, fmt.Errorf("%w: stored key in namespace %q: key of %d bytes, max %d", ErrCorrupt, ns, len(key), MaxKeyLen)
	}
	return ns, key, nil
}

// checkKey validates a namespace and a key (or scan prefix) before use.
func checkKey(op string, ns Namespace, key []byte) error {
	if err := ns.Validate(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if len(key) > MaxKeyLen {
		return fmt.Errorf("%s %s: %w: key of %d bytes, max %d", op, ns, ErrInvalid, len(key), MaxKeyLen)
	}
	return nil
}
