package node

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/mdcluster/mdcluster/mdcluster/membership"
	"github.com/mdcluster/mdcluster/mdcluster/store"
)

// Store is the node's durable state as the node uses it: a store.Store
// claimed by one node ID, holding the membership agreement's hard state
// (promise, accepted proposal, installed view) in store.NSMembership. The
// same store is where the array layer keeps its configurations and journal
// (see Node.Store); every write is synced before it returns, because the
// agreement may only send a message once the promise it makes is durable.
type Store struct {
	kv    store.Store
	owned bool // opened by OpenStore, so closed by Close
}

// OpenStore opens (creating if needed) the badger state store in dir for
// node id; Close closes it. A directory written by another node ID is
// refused: copying a node's data directory to another node would make two
// nodes share one promise. A directory from before namespaced keys is
// migrated transparently (see store.OpenBadger).
func OpenStore(dir string, id membership.NodeID, logger *slog.Logger) (*Store, error) {
	kv, err := store.OpenBadger(dir, logger)
	if err != nil {
		return nil, err
	}
	if err := store.ClaimNodeID(kv, id); err != nil {
		_ = kv.Close()
		return nil, fmt.Errorf("state store %s: %w", dir, err)
	}
	return &Store{kv: kv, owned: true}, nil
}

// ClaimStore uses kv, opened by the caller (a test's store.Mem, or a badger
// store the daemon shares with the array layer), as node id's state store,
// with the same node-ID check as OpenStore. Close leaves kv open: whoever
// opened it closes it.
func ClaimStore(kv store.Store, id membership.NodeID) (*Store, error) {
	if kv == nil {
		return nil, errors.New("state store: nil store")
	}
	if err := store.ClaimNodeID(kv, id); err != nil {
		return nil, err
	}
	return &Store{kv: kv}, nil
}

// openStore returns the store Config asks for: the injected one, or badger
// in DataDir.
func openStore(cfg Config, logger *slog.Logger) (*Store, error) {
	if cfg.Store != nil {
		return ClaimStore(cfg.Store, cfg.ID)
	}
	return OpenStore(cfg.DataDir, cfg.ID, logger)
}

// KV returns the underlying transactional store.
func (s *Store) KV() store.Store { return s.kv }

// LoadHardState returns the persisted agreement state; ok is false when this
// node never persisted one (a node that never ran).
func (s *Store) LoadHardState() (hs membership.HardState, ok bool, err error) {
	return store.LoadHardState(s.kv)
}

// SaveHardState durably replaces the persisted agreement state.
func (s *Store) SaveHardState(hs membership.HardState) error {
	return store.SaveHardState(s.kv, hs)
}

// Close closes the underlying store if OpenStore opened it; an injected
// store (ClaimStore) is left to its owner.
func (s *Store) Close() error {
	if !s.owned {
		return nil
	}
	return s.kv.Close()
}

// Store returns the node's durable store, for the layers that keep their
// state next to the node's (the array manager's configurations and
// journal): one badger database per data directory, since badger allows
// one opener per directory. The node closes it in Close unless it was
// injected through Config.Store.
func (n *Node) Store() store.Store { return n.store.KV() }
