package store

import (
	"encoding/binary"
	"fmt"

	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// Keys of the node's own records.
const (
	keyNodeID    = "id"        // in NSNode: the owner's node ID, 4 bytes big-endian
	keyHardState = "hardstate" // in NSMembership: membership.HardState.Marshal()
)

// ClaimNodeID records id as the store's owner, or checks that it already
// is. A store belongs to one node: copying a node's data directory to
// another node would make two nodes share one promise and vote twice. A
// store claimed by another node, or whose record does not decode, is
// refused and left unchanged.
func ClaimNodeID(s Store, id membership.NodeID) error {
	err := s.Update(func(tx Txn) error {
		v, ok, err := tx.Get(NSNode, []byte(keyNodeID))
		if err != nil {
			return fmt.Errorf("reading node ID: %w", err)
		}
		if !ok {
			return tx.Set(NSNode, []byte(keyNodeID), binary.BigEndian.AppendUint32(nil, uint32(id)))
		}
		got, err := decodeNodeID(v)
		if err != nil {
			return err
		}
		if got != id {
			return fmt.Errorf("the store belongs to node %s, not node %s (a data directory serves one node only)", got, id)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("state store: claiming it for node %s: %w", id, err)
	}
	return nil
}

func decodeNodeID(v []byte) (membership.NodeID, error) {
	if len(v) != 4 {
		return 0, fmt.Errorf("%w: stored node ID (%s/%s) has %d bytes, want 4", ErrCorrupt, NSNode, keyNodeID, len(v))
	}
	return membership.NodeID(binary.BigEndian.Uint32(v)), nil
}

// GetHardState reads the membership agreement's persisted state in tx; ok
// is false when none was ever saved (a node that never ran). Bytes that do
// not decode are an error wrapping ErrCorrupt (and membership.ErrMalformed).
func GetHardState(tx Txn) (hs membership.HardState, ok bool, err error) {
	v, ok, err := tx.Get(NSMembership, []byte(keyHardState))
	if err != nil || !ok {
		return membership.HardState{}, false, err
	}
	hs, err = membership.UnmarshalHardState(v)
	if err != nil {
		return membership.HardState{}, false, fmt.Errorf("%w: %s/%s (%d bytes): %w", ErrCorrupt, NSMembership, keyHardState, len(v), err)
	}
	return hs, true, nil
}

// PutHardState writes the agreement's state in tx, replacing the old one.
func PutHardState(tx Txn, hs membership.HardState) error {
	return tx.Set(NSMembership, []byte(keyHardState), hs.Marshal())
}

// LoadHardState returns the persisted agreement state (see GetHardState).
func LoadHardState(s Store) (hs membership.HardState, ok bool, err error) {
	err = s.View(func(tx Txn) error {
		hs, ok, err = GetHardState(tx)
		return err
	})
	if err != nil {
		return membership.HardState{}, false, fmt.Errorf("state store: loading membership state: %w", err)
	}
	return hs, ok, nil
}

// SaveHardState durably replaces the persisted agreement state: when it
// returns nil the state is on disk, so the agreement may send the messages
// that depend on it.
func SaveHardState(s Store, hs membership.HardState) error {
	if err := s.Update(func(tx Txn) error { return PutHardState(tx, hs) }); err != nil {
		return fmt.Errorf("state store: saving membership state (installed gen %d, promised %d): %w",
			hs.Installed.Gen, hs.Promised, err)
	}
	return nil
}
