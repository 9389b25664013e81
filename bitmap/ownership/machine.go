// Package ownership keeps md-cluster's bitmap slot ownership over the DLM.
//
// Every node of a clustered array owns one slot of the write-intent bitmap
// (node ID n owns slot n-1) and holds that slot's lock, "bitmap%04d", in PW
// for as long as it is in the array. Every other slot is probed with a
// NOQUEUE PW request: refused means a live node owns it (this node watches
// it), granted means it is idle or its owner died, and the prober then
// recovers whatever the slot still marks dirty. The slot lock's value block
// carries the owner's current resync window.
//
// The decisions live in Machine, a pure state machine with no I/O, so they
// can be tested exhaustively; Driver executes its actions through the
// dlm.Locker interface (the real lockspace, or the simulator's adapter over
// a dlm.Space, which runs the Driver itself under its seeded schedule), the
// member devices and the array, and is driven by the lockspace's recovery
// events (dlm.RecoveryHandler).
package ownership

import (
	"fmt"
	"slices"
)

// State is what this node knows about one bitmap slot.
type State uint8

const (
	// Unknown: not probed yet.
	Unknown State = iota
	// Idle: the last probe was granted and found (or left) the slot clean;
	// the lock was released again.
	Idle
	// Active: this node's own slot, its lock held in PW.
	Active
	// Watching: a probe was refused, so a live node holds the lock.
	Watching
	// Dead: the owner departed (fenced); the slot must be probed and, if
	// granted, recovered.
	Dead
	// Elsewhere: the slot's owner departed and another survivor won the
	// probe; it is recovering the slot. If that survivor departs too, the
	// slot is probed again.
	Elsewhere
	// Claimed: this node holds the slot's lock after a granted probe and
	// is inspecting or recovering it.
	Claimed
	// Lost: this node's own slot lock is gone; no more bitmap writes.
	Lost
)

var stateNames = [...]string{"unknown", "idle", "active", "watching", "dead", "elsewhere", "claimed", "lost"}

func (s State) String() string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("state(%d)", uint8(s))
}

// Op is an action the driver must carry out, then report back.
type Op uint8

const (
	// OpProbe: request the slot lock in PW with NOQUEUE; report
	// ProbeGranted or ProbeRefused (or ProbeFailed).
	OpProbe Op = iota + 1
	// OpRead: read the claimed slot's bits (union over mirrors); report Read.
	OpRead
	// OpMerge: set Chunks in our own slot, durably on every mirror; report
	// Merged. Must complete before the claimed slot is cleared.
	OpMerge
	// OpClear: clear every bit of the claimed slot, durably on every
	// mirror; report Cleared.
	OpClear
	// OpResync: have the array resync exactly Chunks; report Resynced.
	OpResync
	// OpRelease: release the claimed slot's lock (its window reset to
	// zero); report Released.
	OpRelease
)

var opNames = [...]string{"", "probe", "read", "merge", "clear", "resync", "release"}

func (o Op) String() string {
	if int(o) < len(opNames) && o != 0 {
		return opNames[o]
	}
	return fmt.Sprintf("op(%d)", uint8(o))
}

// Action is one step for the driver. Slot is the slot acted on (for
// OpMerge: the slot the chunks come from; for OpResync of the own slot:
// the own slot).
type Action struct {
	Op     Op
	Slot   int
	Chunks []uint64
}

func (a Action) String() string {
	if a.Chunks != nil {
		return fmt.Sprintf("%s(%d, %v)", a.Op, a.Slot, a.Chunks)
	}
	return fmt.Sprintf("%s(%d)", a.Op, a.Slot)
}

// Machine decides, for one node and one array, what to lock, read, merge,
// clear, resync and release. It does no I/O; every input is a method that
// returns the actions to carry out next, in order. Not safe for concurrent
// use: the driver serialises it.
type Machine struct {
	own    int
	state  []State
	chunks map[int][]uint64 // dirty chunks found in a claimed slot, until released
	failed map[int]bool     // a claimed slot's recovery failed: back to Dead on release
	owed   []uint64         // own-slot chunks whose resync failed, to retry
}

// NewMachine returns the machine of the node owning slot own out of slots.
func NewMachine(slots, own int) (*Machine, error) {
	if slots <= 0 || own < 0 || own >= slots {
		return nil, fmt.Errorf("ownership: own slot %d outside 0..%d", own, slots-1)
	}
	return &Machine{own: own, state: make([]State, slots), chunks: map[int][]uint64{}, failed: map[int]bool{}}, nil
}

// Own returns this node's slot.
func (m *Machine) Own() int { return m.own }

// State returns what this node knows about slot s.
func (m *Machine) State(s int) State {
	if s < 0 || s >= len(m.state) {
		return Unknown
	}
	return m.state[s]
}

// States returns a copy of every slot's state.
func (m *Machine) States() []State { return slices.Clone(m.state) }

// Owed returns own-slot chunks whose resync failed and must be retried.
func (m *Machine) Owed() []uint64 { return slices.Clone(m.owed) }

func (m *Machine) valid(s int) bool { return s >= 0 && s < len(m.state) && s != m.own }

// Joined: this node's own lock was granted in PW. ownDirty are the bits its
// slot already carried (left by an earlier crash of this node): they are
// resynced first. Then every other slot is probed.
func (m *Machine) Joined(ownDirty []uint64) []Action {
	m.state[m.own] = Active
	var out []Action
	if len(ownDirty) > 0 {
		out = append(out, Action{Op: OpResync, Slot: m.own, Chunks: slices.Clone(ownDirty)})
	}
	return append(out, m.probe(func(State) bool { return true })...)
}

// probe returns a probe for every other slot whose state passes want and
// which is not claimed right now.
func (m *Machine) probe(want func(State) bool) []Action {
	var out []Action
	for s, st := range m.state {
		if s == m.own || st == Claimed || !want(st) {
			continue
		}
		out = append(out, Action{Op: OpProbe, Slot: s})
	}
	return out
}

// Departed: the membership layer reports (after fencing and DLM recovery)
// that the owners of these slots died. Each becomes Dead; then every slot
// that may hold a dead owner's bits is probed: the newly dead, those still
// Dead (a failed attempt), and those another survivor was recovering
// (Elsewhere) in case that survivor is among the departed.
func (m *Machine) Departed(slots []int) []Action {
	for _, s := range slots {
		if s == m.own {
			// The cluster declared this node dead: it has been fenced.
			m.state[s] = Lost
			continue
		}
		if m.valid(s) && m.state[s] != Claimed {
			m.state[s] = Dead
		}
	}
	if m.state[m.own] == Lost {
		return nil
	}
	return m.probe(func(st State) bool { return st == Dead || st == Elsewhere })
}

// Reprobe asks for every other slot to be probed again (to refresh stale
// Watching/Elsewhere/Idle knowledge, or retry a failed recovery), and for a
// failed own-slot resync to be retried.
func (m *Machine) Reprobe() []Action {
	if m.state[m.own] == Lost {
		return nil
	}
	var out []Action
	if len(m.owed) > 0 && m.state[m.own] == Active {
		out = append(out, Action{Op: OpResync, Slot: m.own, Chunks: m.owed})
		m.owed = nil
	}
	return append(out, m.probe(func(State) bool { return true })...)
}

// ProbeGranted: this node now holds slot s in PW. Whatever the slot marks
// dirty must be recovered before it is released.
func (m *Machine) ProbeGranted(s int) []Action {
	if !m.valid(s) {
		return nil
	}
	m.state[s] = Claimed
	delete(m.failed, s)
	return []Action{{Op: OpRead, Slot: s}}
}

// ProbeRefused: a live node holds slot s. If its owner was known dead,
// the holder is a survivor recovering it.
func (m *Machine) ProbeRefused(s int) []Action {
	if !m.valid(s) {
		return nil
	}
	switch m.state[s] {
	case Dead, Elsewhere:
		m.state[s] = Elsewhere
	default:
		m.state[s] = Watching
	}
	return nil
}

// ProbeFailed: the probe did not complete (context ended, lockspace
// stopped). The state is kept; a Dead slot stays Dead for a later retry.
func (m *Machine) ProbeFailed(s int) []Action { return nil }

// Read: the claimed slot s marks chunks dirty. Nothing dirty: release.
// Otherwise merge them into our own slot first.
func (m *Machine) Read(s int, chunks []uint64) []Action {
	if !m.claimed(s) {
		return nil
	}
	if len(chunks) == 0 {
		return []Action{{Op: OpRelease, Slot: s}}
	}
	m.chunks[s] = slices.Clone(chunks)
	return []Action{{Op: OpMerge, Slot: s, Chunks: slices.Clone(chunks)}}
}

// Merged: the claimed slot's chunks are durable in our own slot on every
// mirror, so the claimed slot may now be cleared.
func (m *Machine) Merged(s int) []Action {
	if !m.claimed(s) {
		return nil
	}
	return []Action{{Op: OpClear, Slot: s}}
}

// Cleared: the claimed slot is clean on every mirror; resync the chunks it
// marked (they are covered by our own slot meanwhile).
func (m *Machine) Cleared(s int) []Action {
	if !m.claimed(s) {
		return nil
	}
	return []Action{{Op: OpResync, Slot: s, Chunks: slices.Clone(m.chunks[s])}}
}

// Resynced reports the outcome of an OpResync of chunks. A failed resync
// is owed (retried by Reprobe) rather than lost: the chunks stay dirty in
// our own slot. For a claimed slot the lock is released either way, since
// its bits are already safe in our own slot.
func (m *Machine) Resynced(s int, chunks []uint64, ok bool) []Action {
	if !ok {
		m.owed = append(m.owed, chunks...)
		slices.Sort(m.owed)
		m.owed = slices.Compact(m.owed)
	}
	if s == m.own || !m.claimed(s) {
		return nil
	}
	return []Action{{Op: OpRelease, Slot: s}}
}

// StepFailed: reading, merging or clearing the claimed slot failed. The
// slot's bits are still on disk (clearing happens only after a durable
// merge, and a failed clear leaves some of them set), so the lock is
// released and the slot stays Dead for another attempt, here or elsewhere.
func (m *Machine) StepFailed(s int) []Action {
	if !m.claimed(s) {
		return nil
	}
	m.failed[s] = true
	return []Action{{Op: OpRelease, Slot: s}}
}

// Released: the claimed slot's lock is released. It is Idle, or Dead if
// its recovery failed.
func (m *Machine) Released(s int) []Action {
	if !m.claimed(s) {
		return nil
	}
	delete(m.chunks, s)
	if m.failed[s] {
		delete(m.failed, s)
		m.state[s] = Dead
	} else {
		m.state[s] = Idle
	}
	return nil
}

// OwnLost: this node's own lock is gone (lockspace released, node reset or
// fenced). The write-intent engine must stop writing.
func (m *Machine) OwnLost() { m.state[m.own] = Lost }

// Left: this node left the array cleanly and released its own lock.
func (m *Machine) Left() { m.state[m.own] = Idle }

func (m *Machine) claimed(s int) bool { return m.valid(s) && m.state[s] == Claimed }
