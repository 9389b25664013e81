// Package store is a storage node's durable key-value state: small records
// in named namespaces, read and written in transactions that are atomic and,
// for writes, synced to disk before they return.
//
// The node's membership agreement keeps its promise here (it may send a
// message only once the promise it makes is durable), and the array layer
// keeps array configurations and a journal of in-flight configuration
// changes here: a change is journalled before it is broadcast, and after a
// crash the journal says which changes to complete or roll back. Both need
// several keys to change together or not at all, which is what Update
// gives.
//
// Two implementations share one behaviour, checked by one conformance test
// suite: Badger, an embedded badger database in the node's data directory
// (the real one), and Mem, an in-memory store for the simulator and tests,
// whose Crash drops exactly what a finished Update had not committed.
//
// On top of the interface sit typed helpers: the node-ID claim
// (ClaimNodeID), the membership hard state (LoadHardState, SaveHardState)
// and Journal, the ordered journal the array manager uses.
//
// Keys are stored as a length-prefixed namespace name followed by the key,
// so a namespace can neither see nor overwrite another's keys whatever bytes
// its keys contain, and keys within one namespace sort bytewise (a journal
// keyed by big-endian sequence numbers replays in order). See
// docs/node.md, "The state store".
package store

import (
	"errors"
	"fmt"
)

// Store is a durable, transactional key-value store with namespaces.
//
// Updates are serialised: an Update runs only after every earlier one has
// committed or failed, so read-modify-write inside one Update needs no
// retry loop and cannot conflict. Views run concurrently with each other
// and with an Update, each on a snapshot of what was committed when it
// began. A View inside an Update's function sees committed data only, not
// the Update's pending writes; an Update inside another Update's function
// deadlocks, as it waits for the outer one.
type Store interface {
	// View runs fn in a read-only transaction over a consistent snapshot.
	// Set and Delete fail in it with ErrReadOnly. fn's error is returned
	// unchanged.
	View(fn func(Txn) error) error
	// Update runs fn in a read-write transaction and commits what it wrote
	// atomically and durably: when Update returns nil every write is on
	// disk (synced); when fn returns an error, or the commit fails, nothing
	// fn wrote is visible, now or after a crash. fn's error is returned
	// unchanged.
	Update(fn func(Txn) error) error
	// Close waits for running transactions to finish and releases the
	// store. Afterwards View and Update fail with ErrClosed; a second Close
	// does nothing. It must not be called from inside a transaction's
	// function (it would wait for itself).
	Close() error
}

// Txn is one transaction, valid only while the function it was passed to
// runs (afterwards every method fails with ErrTxnDone) and not safe for
// concurrent use.
//
// Every byte slice a Txn returns is the caller's own copy: it may be kept
// and modified after the transaction. Every slice passed in is copied
// before the method returns, so the caller may reuse it at once.
type Txn interface {
	// Get returns the value of key in ns; ok is false when there is none.
	// In an Update it sees the Update's own writes.
	Get(ns Namespace, key []byte) (value []byte, ok bool, err error)
	// Set writes value under key in ns (an empty value is a value, not a
	// deletion).
	Set(ns Namespace, key, value []byte) error
	// Delete removes key from ns; deleting a missing key is not an error.
	Delete(ns Namespace, key []byte) error
	// Scan calls fn for every key in ns that starts with prefix, in
	// bytewise key order, with the key without its namespace. In an Update
	// it sees the Update's writes made before Scan began; writes fn makes
	// (Set, Delete, even of the keys being scanned) take effect in the
	// transaction but do not change the running scan. If fn returns an
	// error the scan stops and Scan returns that error unchanged.
	Scan(ns Namespace, prefix []byte, fn func(key, value []byte) error) error
}

// Limits on what a store holds, the same for every implementation. They
// are far above what the node keeps (a hard state is tens of bytes, an
// array configuration a few KiB) and keep badger's own limits out of reach:
// values stay below badger's value threshold (64 KiB here), so every record
// lives in the LSM tree and compaction alone reclaims deleted ones (no
// value-log garbage collection is needed), and the largest Update fits well
// within badger's batch limit for the 4 MiB memtable the store uses.
const (
	// MaxNamespaceLen is the longest namespace name, in bytes.
	MaxNamespaceLen = 32
	// MaxKeyLen is the longest key (or scan prefix) within a namespace.
	MaxKeyLen = 512
	// MaxValueLen is the largest value.
	MaxValueLen = 32 << 10
	// MaxTxnWrites is the most Set and Delete calls one Update may make.
	MaxTxnWrites = 1000
	// MaxTxnBytes bounds the keys and values one Update writes: the sum of
	// len(key)+len(value) over its Sets and len(key) over its Deletes.
	MaxTxnBytes = 256 << 10
)

// Errors returned by stores, wrapped with context; test with errors.Is.
var (
	// ErrClosed: the store was closed (or, for Mem, crashed).
	ErrClosed = errors.New("store: closed")
	// ErrReadOnly: a write in a View.
	ErrReadOnly = errors.New("store: write in a read-only transaction")
	// ErrTxnDone: a Txn used after its View or Update function returned.
	ErrTxnDone = errors.New("store: transaction already finished")
	// ErrInvalid: a bad namespace name, or a key, prefix or value over its
	// limit.
	ErrInvalid = errors.New("store: invalid argument")
	// ErrTxnTooBig: an Update over MaxTxnWrites or MaxTxnBytes.
	ErrTxnTooBig = errors.New("store: transaction too big")
	// ErrCorrupt: stored bytes that do not decode. The operation that met
	// them changed nothing.
	ErrCorrupt = errors.New("store: corrupt stored data")
	// ErrNotFound: a journal entry that does not exist.
	ErrNotFound = errors.New("store: not found")
)

// Namespace names a separate key space in a store, e.g. the membership
// state or the array configurations. A name is 1 to MaxNamespaceLen bytes of
// lower-case ASCII letters, digits, '-', '_' and '.', starting with a
// letter: readable in dumps and logs. Isolation does not depend on the
// characters: the stored key carries the name's length.
type Namespace string

// The namespaces the node uses. Each subsystem owns one; none reads
// another's.
const (
	// NSNode holds the node's identity (ClaimNodeID).
	NSNode Namespace = "node"
	// NSMembership holds the membership agreement's hard state.
	NSMembership Namespace = "membership"
	// NSArrays is for the array layer's array configurations.
	NSArrays Namespace = "arrays"
	// NSJournal is for the array layer's journal of in-flight configuration
	// changes (see Journal).
	NSJournal Namespace = "journal"
)

// Validate reports whether ns is a well-formed namespace name.
func (ns Namespace) Validate() error {
	if len(ns) == 0 || len(ns) > MaxNamespaceLen {
		return fmt.Errorf("%w: namespace %q: name must be 1..%d bytes", ErrInvalid, string(ns), MaxNamespaceLen)
	}
	for i := 0; i < len(ns); i++ {
		c := ns[i]
		switch {
		case c >= 'a' && c <= 'z':
		case i > 0 && (c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.'):
		default:
			return fmt.Errorf("%w: namespace %q: byte %d (%q) not allowed: use a-z first, then a-z, 0-9, '-', '_', '.'",
				ErrInvalid, string(ns), i, c)
		}
	}
	return nil
}
