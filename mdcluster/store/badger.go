package store

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync"

	"github.com/dgraph-io/badger/v4"
	"github.com/dgraph-io/badger/v4/options"
)

// formatVersion is the on-disk layout Badger writes and reads: keys encoded
// with their namespace (see key.go), the version recorded under the
// metadata key "format". Directories without it are format 0 (two raw keys,
// from before namespaces) and are migrated when opened.
const formatVersion = 1

// legacyKeys maps the raw keys of format 0 to where format 1 keeps them.
var legacyKeys = []struct {
	raw string
	ns  Namespace
	key string
}{
	{"node/id", NSNode, keyNodeID},
	{"membership/hardstate", NSMembership, keyHardState},
}

// Badger is the Store in an embedded badger database
// (github.com/dgraph-io/badger/v4), the one a node keeps in its data
// directory. Every commit is synced to disk before Update returns.
type Badger struct {
	db  *badger.DB
	dir string
	g   gate
	upd sync.Mutex // serialises Updates, so they never conflict
}

// OpenBadger opens the store in dir, creating it if needed. badger allows
// one process per directory, so a second open fails while the first is
// open.
//
// The database is opened with small settings (4 MiB memtable, 1 MiB
// value-log files, no block or index cache, no compression): it holds a few
// small records, not bulk data. A directory written before namespaces
// existed is migrated in one transaction (its two keys move into NSNode and
// NSMembership); a directory of an unknown, newer format is refused
// unchanged. badger's log goes to logger (its INFO at debug level); nil
// means slog.Default().
func OpenBadger(dir string, logger *slog.Logger) (*Badger, error) {
	if dir == "" {
		return nil, errors.New("state store: no directory given")
	}
	if logger == nil {
		logger = slog.Default()
	}
	logger = logger.With("component", "state-store")
	opts := badger.DefaultOptions(dir).
		WithSyncWrites(true).
		WithMemTableSize(4 << 20).
		WithValueThreshold(64 << 10). // must stay below 15% of the memtable; above MaxValueLen
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
		WithLogger(badgerLogger{logger})
	db, err := badger.Open(opts)
	if err != nil {
		return nil, fmt.Errorf("state store %s: open: %w", dir, err)
	}
	b := &Badger{db: db, dir: dir}
	if err := b.upgrade(logger); err != nil {
		_ = db.Close()
		return nil, fmt.Errorf("state store %s: %w", dir, err)
	}
	return b, nil
}

// upgrade checks the directory's format, migrating format 0, in one
// transaction: on any error nothing is written.
func (b *Badger) upgrade(logger *slog.Logger) error {
	return b.db.Update(func(bt *badger.Txn) error {
		fk := metaKey("format")
		v, found, err := badgerGet(bt, fk)
		if err != nil {
			return fmt.Errorf("reading the format version: %w", err)
		}
		if found {
			if len(v) != 1 {
				return fmt.Errorf("%w: format version record of %d bytes, want 1", ErrCorrupt, len(v))
			}
			if v[0] != formatVersion {
				return fmt.Errorf("%w: store format %d, this program reads format %d (written by a newer version?); nothing was changed",
					ErrCorrupt, v[0], formatVersion)
			}
			return nil
		}
		var moved []string
		for _, l := range legacyKeys {
			old, ok, err := badgerGet(bt, []byte(l.raw))
			if err != nil {
				return fmt.Errorf("migrating %q: %w", l.raw, err)
			}
			if !ok {
				continue
			}
			nk := encodeKey(l.ns, []byte(l.key))
			if _, clash, err := badgerGet(bt, nk); err != nil || clash {
				return fmt.Errorf("%w: migrating %q: %s/%s exists already in a store without a format version (err %v); nothing was changed",
					ErrCorrupt, l.raw, l.ns, l.key, err)
			}
			if err := bt.Set(nk, old); err != nil {
				return fmt.Errorf("migrating %q: %w", l.raw, err)
			}
			if err := bt.Delete([]byte(l.raw)); err != nil {
				return fmt.Errorf("migrating %q: %w", l.raw, err)
			}
			moved = append(moved, l.raw+" → "+string(l.ns)+"/"+l.key)
		}
		if err := bt.Set(fk, []byte{formatVersion}); err != nil {
			return fmt.Errorf("recording the format version: %w", err)
		}
		if len(moved) > 0 {
			logger.Info("state store migrated to namespaced keys", "dir", b.dir, "format", formatVersion, "moved", moved)
		}
		return nil
	})
}

func badgerGet(bt *badger.Txn, k []byte) ([]byte, bool, error) {
	it, err := bt.Get(k)
	if errors.Is(err, badger.ErrKeyNotFound) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	v, err := it.ValueCopy(nil)
	if err != nil {
		return nil, false, err
	}
	return v, true, nil
}

// View implements Store.
func (b *Badger) View(fn func(Txn) error) error {
	if b.g.enter() != nil {
		return fmt.Errorf("state store %s: view: %w", b.dir, ErrClosed)
	}
	defer b.g.leave()
	bt := b.db.NewTransaction(false)
	defer bt.Discard()
	t := &txn{raw: badgerTxn{bt}}
	defer func() { t.done = true }()
	return fn(t)
}

// Update implements Store.
func (b *Badger) Update(fn func(Txn) error) error {
	if b.g.enter() != nil {
		return fmt.Errorf("state store %s: update: %w", b.dir, ErrClosed)
	}
	defer b.g.leave()
	b.upd.Lock()
	defer b.upd.Unlock()
	bt := b.db.NewTransaction(true)
	defer bt.Discard()
	t := &txn{raw: badgerTxn{bt}, update: true}
	err := func() error {
		defer func() { t.done = true }()
		return fn(t)
	}()
	if err != nil {
		return err
	}
	if err := bt.Commit(); err != nil {
		return fmt.Errorf("state store %s: update: commit: %w", b.dir, err)
	}
	return nil
}

// Close implements Store: it waits for running transactions, then flushes
// and closes the database.
func (b *Badger) Close() error {
	if !b.g.close(true) {
		return nil
	}
	if err := b.db.Close(); err != nil {
		return fmt.Errorf("state store %s: close: %w", b.dir, err)
	}
	return nil
}

// badgerTxn is a rawTxn over a badger transaction.
type badgerTxn struct{ bt *badger.Txn }

func (t badgerTxn) get(k []byte) ([]byte, bool, error) { return badgerGet(t.bt, k) }

func (t badgerTxn) set(k, v []byte) error { return t.bt.Set(k, v) }

func (t badgerTxn) del(k []byte) error { return t.bt.Delete(k) }

func (t badgerTxn) scan(prefix []byte, fn func(k, v []byte) error) error {
	it := t.bt.NewIterator(badger.IteratorOptions{Prefix: prefix})
	defer it.Close()
	for it.Seek(prefix); it.ValidForPrefix(prefix); it.Next() {
		item := it.Item()
		v, err := item.ValueCopy(nil)
		if err != nil {
			return err
		}
		if err := fn(item.KeyCopy(nil), v); err != nil {
			return err
		}
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
