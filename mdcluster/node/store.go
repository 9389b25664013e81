package node

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"

	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// Keys in the state store. The store will also hold array configurations and
// the journal of in-flight configuration changes; each gets its own prefix.
var (
	keyNodeID    = []byte("node/id")
	keyHardState = []byte("membership/hardstate")
)

// Store is the node's durable state, kept in an embedded badger database in
// the node's data directory: its identity and the membership agreement's
// hard state (promise, accepted proposal, installed view). Every write is
// synced before it returns, because the agreement may only send a message
// once the promise it makes is durable.
type Store struct {
	db *badger.DB
}

// OpenStore opens (creating if needed) the state store in dir for node id.
// A directory written by another node ID is refused: copying a node's data
// directory to another node would make two nodes share one promise.
// The database is opened with small memory settings: it holds a few small
// records, not bulk data.
func OpenStore(dir string, id membership.NodeID, logger *slog.Logger) (*Store, error) {
	if dir == "" {
		return nil, errors.New("state store: no data directory configured")
	}
	if logger == nil {
		logger = slog.Default()
	}
	opts := badger.DefaultOptions(dir).
		WithSyncWrites(true).
		WithMemTableSize(4 << 20).
		WithValueThreshold(64 << 10). // must stay below 15% of the memtable
		WithValueLogFileSize(1 << 20).
		WithNumMemtables(2).
		WithNumLevelZeroTables(2).
		WithNumLevelZeroTablesStall(4).
		WithNumCompactors(2).
		WithNumGoroutines(1).
		WithBlockCacheSize(0).
		WithIndexCacheSize(0).
		WithCompression(options.None).
		WithMetricsEnabled(false).
		WithLogger(badgerLogger{logger.With("component", "state-store")})
	db, err := badger.Open(opts)
	if err != nil {
		return nil, fmt.Errorf("state store %s: open: %w", dir, err)
	}
	s := &Store{db: db}
	if err := s.claim(id); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("state store %s: %w", dir, err)
	}
	return s, nil
}

// claim records id as the store's owner, or checks that it already is.
func (s *Store) claim(id membership.NodeID) error {
	return s.db.Update(func(txn *badger.Txn) error {
		it, err := txn.Get(keyNodeID)
		switch {
		case errors.Is(err, badger.ErrKeyNotFound):
			return txn.Set(keyNodeID, binary.BigEndian.AppendUint32(nil, uint32(id)))
		case err != nil:
			return fmt.Errorf("reading node ID: %w", err)
		}
		v, err := it.ValueCopy(nil)
		if err != nil {
			return fmt.Errorf("reading node ID: %w", err)
		}
		if len(v) != 4 {
			return fmt.Errorf("stored node ID has %d bytes, want 4", len(v))
		}
		if got := membership.NodeID(binary.BigEndian.Uint32(v)); got != id {
			return fmt.Errorf("data directory belongs to node %s, not node %s", got, id)
		}
		return nil
	})
}

// LoadHardState returns the persisted agreement state; ok is false when this
// node never persisted one (a node that never ran).
func (s *Store) LoadHardState() (hs membership.HardState, ok bool, err error) {
	err = s.db.View(func(txn *badger.Txn) error {
		it, err := txn.Get(keyHardState)
		if errors.Is(err, badger.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return err
		}
		v, err := it.ValueCopy(nil)
		if err != nil {
			return err
		}
		hs, err = membership.UnmarshalHardState(v)
		if err != nil {
			return err
		}
		ok = true
		return nil
	})
	if err != nil {
		return membership.HardState{}, false, fmt.Errorf("state store: loading membership state: %w", err)
	}
	return hs, ok, nil
}

// SaveHardState durably replaces the persisted agreement state.
func (s *Store) SaveHardState(hs membership.HardState) error {
	b := hs.Marshal()
	if err := s.db.Update(func(txn *badger.Txn) error { return txn.Set(keyHardState, b) }); err != nil {
		return fmt.Errorf("state store: saving membership state (installed gen %d, promised %d): %w",
			hs.Installed.Gen, hs.Promised, err)
	}
	return nil
}

// Close flushes and closes the database.
func (s *Store) Close() error {
	if err := s.db.Close(); err != nil {
		return fmt.Errorf("state store: close: %w", err)
	}
	return nil
}

// badgerLogger sends badger's log to slog. badger is chatty at INFO (level
// compaction, replay), so its INFO goes to debug.
type badgerLogger struct{ l *slog.Logger }

func (b badgerLogger) Errorf(f string, a ...any)   { b.l.Error(trimLine(f, a)) }
func (b badgerLogger) Warningf(f string, a ...any) { b.l.Warn(trimLine(f, a)) }
func (b badgerLogger) Infof(f string, a ...any)    { b.l.Debug(trimLine(f, a)) }
func (b badgerLogger) Debugf(f string, a ...any)   { b.l.Debug(trimLine(f, a)) }

func trimLine(f string, a []any) string { return strings.TrimSpace(fmt.Sprintf(f, a...)) }
