package array

import (
	"fmt"
	"io"
	"slices"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// The change protocol's decisions, as pure functions over the member set
// a node read from the disks: which changes are refused, what is
// journalled, which superblock images go to which members in which order,
// which messages are broadcast, what a receiver answers, and what a
// restarted sender does with a change it left half done. They do no I/O
// beyond what their arguments are (members are only read, by ReadState),
// start no goroutines and read no clock: the Manager runs them with its
// node's locks, journal and broadcaster, and the simulator (internal/sim)
// runs the very same functions with simulated ones under thousands of
// seeds, crashing senders between any two steps.

// State is the array's member set as one node read it from the members:
// the freshest superblock and the members it uses (see ReadState).
type State struct{ st *arrayState }

// ReadState inspects members (the devices a node sees that carry the
// array's UUID, or its candidate UUID: those are left out) and returns
// the member set the node uses, with md's rules and this package's one
// addition (a removed device never comes back as a spare). paths names
// the members for MemberStatus.Path (may be nil).
func ReadState(members []Member, uuid [16]byte, paths map[Member]string) (*State, error) {
	st, err := readState(members, uuid, paths)
	if err != nil {
		return nil, err
	}
	return &State{st}, nil
}

func readState(ms []Member, uuid [16]byte, paths map[Member]string) (*arrayState, error) {
	insp, err := Inspect(ms, InspectOptions{UUID: uuid})
	if err != nil {
		return nil, err
	}
	return stateFromInspection(insp, paths)
}

// Events is the freshest superblock's event count.
func (s *State) Events() uint64 { return s.st.Events() }

// Members lists the members in use, by device number.
func (s *State) Members() []MemberStatus { return s.st.statuses() }

// Shared returns a copy of the freshest superblock.
func (s *State) Shared() *superblock.Superblock { return clone(s.st.Shared) }

// Step is one step of a change's sender. The steps run in the order
// ChangePlan.Steps lists them, each durable before the next begins; a
// sender that dies between two steps leaves what DecideRecovery resolves.
type Step string

const (
	// StepJournal appends the plan's journal entry (StatePrepared) to the
	// node's store: nothing is written to a member before the change is
	// on record.
	StepJournal Step = "journal"
	// StepCandidate (add): the new device gets the bitmap copy and its
	// candidate superblock; the journal entry moves to StateCandidate.
	StepCandidate Step = "candidate"
	// StepConfirm (add, re-add): NEWDISK asks every node to find the
	// device (and no-new-dev's EX checks that every node dropped its CR).
	// A node that does not see it ends the change: the add is abandoned
	// everywhere.
	StepConfirm Step = "confirm"
	// StepConfirmed (add): the journal entry moves to StateConfirmed.
	StepConfirmed Step = "confirmed"
	// StepCommit moves the journal entry to StateCommitted: from the next
	// member write on, the disk holds the change.
	StepCommit Step = "commit"
	// StepMark (remove of a spare): the spare's own superblock is marked
	// removed, so that no node takes it for a spare again.
	StepMark Step = "mark"
	// StepWrite writes the new superblock to the plan's members in order;
	// the first write is the commit point.
	StepWrite Step = "write"
	// StepReload re-reads the members (the sender's own view).
	StepReload Step = "reload"
	// StepAnnounce broadcasts the change (Announcement) and waits until
	// every node acted on it.
	StepAnnounce Step = "announce"
)

// ChangePlan is everything a change does, decided from the member set
// read under the broadcast token before any of it is carried out.
type ChangePlan struct {
	// Entry is the journal entry (its Array, Node and Started are filled
	// in by whoever journals it).
	Entry JournalEntry
	// Next is the shared superblock after the change, events bumped.
	Next *superblock.Superblock
	// Writes are the members Next goes to (WriteAll), the commit point
	// first.
	Writes []Device
	// Mark (remove of a spare) is the spare with its own superblock marked
	// removed, written before Writes.
	Mark *Device
	// Candidate (add) is the new device with its candidate superblock;
	// Real its superblock once the add commits (also Writes[0]).
	Candidate, Real *Device
	// Own (re-add) is the member with its own superblock set recovering
	// (the last of Writes).
	Own *Device
	// Confirm (add, re-add) is the NEWDISK message.
	Confirm *broadcast.Message
	// Announce is the type of the broadcast after the writes:
	// METADATA_UPDATED, REMOVE or RE_ADD.
	Announce broadcast.Type
}

// Steps lists the plan's steps in the order they run.
func (p *ChangePlan) Steps() []Step {
	switch p.Entry.Kind {
	case ChangeAdd:
		return []Step{StepJournal, StepCandidate, StepConfirm, StepConfirmed, StepCommit, StepWrite, StepReload, StepAnnounce}
	case ChangeReAdd:
		return []Step{StepJournal, StepConfirm, StepCommit, StepWrite, StepReload, StepAnnounce}
	case ChangeRemove:
		if p.Mark != nil {
			return []Step{StepJournal, StepCommit, StepMark, StepWrite, StepReload, StepAnnounce}
		}
	}
	return []Step{StepJournal, StepCommit, StepWrite, StepReload, StepAnnounce}
}

// Announcement is the message that tells the other nodes about a change
// the sender wrote and re-read (st is the sender's state after its
// reload): the events written (receivers must find at least those), and
// md's raid_slot: the member concerned for REMOVE and RE_ADD, else a good
// member to reload from.
func Announcement(typ broadcast.Type, dev uint32, st *State) broadcast.Message {
	return announcement(typ, dev, st.st)
}

func announcement(typ broadcast.Type, dev uint32, st *arrayState) broadcast.Message {
	raid := goodDevice(st)
	if typ == broadcast.Remove || typ == broadcast.ReAdd {
		raid = dev
	}
	return broadcast.Message{Type: typ, RaidSlot: raid, Low: st.Events()}
}

// goodDevice is md's good_device_nr: the first in-sync member.
func goodDevice(st *arrayState) uint32 {
	for _, s := range st.statuses() {
		if s.State == MemberInSync {
			return s.Dev
		}
	}
	return 0
}

// PlanFail plans mdadm --fail of member dev. Failing the last in-sync copy
// of some data is refused (ErrRefusedChange).
func PlanFail(s *State, dev uint32, now time.Time) (*ChangePlan, error) {
	return planFail(s.st, dev, now)
}

func planFail(st *arrayState, dev uint32, now time.Time) (*ChangePlan, error) {
	rec := st.Members[dev]
	if rec == nil && slices.Contains(st.missingWorking(), dev) {
		// A working member this node does not see (a forced or a
		// node-local assemble): failed by its role alone, as md records
		// a member missing at assemble.
		rec = &memberRec{MemberStatus: MemberStatus{Dev: dev, Slot: int(st.Shared.DevRoles[dev]), State: MemberInSync}}
	}
	if rec == nil {
		return nil, fmt.Errorf("fail device %d: %w: no such member", dev, ErrRefusedChange)
	}
	if rec.State == MemberFaulty {
		return nil, fmt.Errorf("fail device %d: %w: already faulty", dev, ErrRefusedChange)
	}
	if rec.State == MemberInSync {
		sh := st.Shared
		if !Enough(sh.Level, sh.Layout, int(sh.RaidDisks), func(slot int) bool {
			h := st.slotHolder(slot)
			return h != nil && h.State == MemberInSync && h.Dev != dev
		}) {
			return nil, fmt.Errorf("fail device %d: %w: it holds the last in-sync copy of some data", dev, ErrRefusedChange)
		}
	}
	next, err := Fail(st.Shared, dev)
	if err != nil {
		return nil, fmt.Errorf("fail device %d: %w", dev, err)
	}
	return &ChangePlan{
		Entry: JournalEntry{Kind: ChangeFail, State: StatePrepared, BaseEvents: st.Events(), Dev: dev,
			DeviceUUID: rec.DeviceUUID, Path: rec.Path, Slot: rec.Slot},
		Next: BumpEvents(next, now), Writes: st.devices(), Announce: broadcast.MetadataUpdated,
	}, nil
}

// PlanRemove plans mdadm --remove of a faulty member or a spare; any
// other member is refused (ErrRefusedChange: fail it first).
func PlanRemove(s *State, dev uint32, now time.Time) (*ChangePlan, error) {
	return planRemove(s.st, dev, now)
}

func planRemove(st *arrayState, dev uint32, now time.Time) (*ChangePlan, error) {
	rec := st.Members[dev]
	if rec == nil {
		return nil, fmt.Errorf("remove device %d: %w: no such member", dev, ErrRefusedChange)
	}
	if rec.State != MemberFaulty && rec.State != MemberSpare {
		return nil, fmt.Errorf("remove device %d: %w: it is %s: hot remove failed: Device or resource busy (fail it first)", dev, ErrRefusedChange, rec.State)
	}
	p := &ChangePlan{
		Entry: JournalEntry{Kind: ChangeRemove, State: StatePrepared, BaseEvents: st.Events(), Dev: dev,
			DeviceUUID: rec.DeviceUUID, Path: rec.Path, Slot: rec.Slot},
		Writes: st.devicesExcept(dev), Announce: broadcast.Remove,
	}
	next := st.Shared
	if rec.State == MemberFaulty {
		var err error
		if next, err = Remove(st.Shared, dev); err != nil {
			return nil, fmt.Errorf("remove device %d: %w", dev, err)
		}
	} else {
		mark := clone(rec.Super)
		if dev < uint32(len(mark.DevRoles)) {
			mark.DevRoles[dev] = superblock.RoleFaulty
		}
		mark.UpdateChecksum()
		p.Mark = &Device{Member: rec.Member, Super: mark}
	}
	p.Next = BumpEvents(next, now)
	return p, nil
}

// PlanAdd plans mdadm --add of device d (not yet checked: a member, or a
// device with another array's superblock, is refused). inUse lists device
// numbers taken besides the members' (devices that still carry the
// array's or its candidate UUID, pending candidates); rnd draws the new
// device UUID.
func PlanAdd(s *State, d Member, path string, inUse []uint32, rnd io.Reader, now time.Time) (*ChangePlan, error) {
	return planAdd(s.st, d, path, inUse, rnd, now)
}

func planAdd(st *arrayState, d Member, path string, inUse []uint32, rnd io.Reader, now time.Time) (*ChangePlan, error) {
	if err := checkNewDevice(st.Shared.SetUUID, d, st); err != nil {
		return nil, err
	}
	shared, devNo, err := AddSpare(st.Shared, append(st.inUse(), inUse...))
	if err != nil {
		return nil, err
	}
	var like *superblock.Superblock
	for _, s := range st.statuses() {
		if s.State == MemberInSync {
			like = st.Members[s.Dev].Super
			break
		}
	}
	if like == nil {
		return nil, fmt.Errorf("no in-sync member to model the new superblock on")
	}
	real, err := NewDevice(shared, like, devNo, d, rnd)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrRefusedChange, err)
	}
	cand := clone(real)
	cand.SetUUID = candidateUUID(st.Shared.SetUUID)
	cand.UpdateChecksum()
	return &ChangePlan{
		Entry: JournalEntry{Kind: ChangeAdd, State: StatePrepared, BaseEvents: st.Events(), Dev: devNo,
			DeviceUUID: real.DeviceUUID, Path: path, Slot: -1},
		Next:      BumpEvents(shared, now),
		Writes:    append([]Device{{Member: d, Super: real}}, st.devices()...),
		Candidate: &Device{Member: d, Super: cand},
		Real:      &Device{Member: d, Super: real},
		Confirm:   &broadcast.Message{Type: broadcast.NewDisk, UUID: real.DeviceUUID, RaidSlot: devNo, Low: st.Events()},
		Announce:  broadcast.MetadataUpdated,
	}, nil
}

// PlanReAdd plans mdadm --re-add of device d, whose own superblock is
// dsb: a failed or removed member goes back into the slot it names.
func PlanReAdd(s *State, d Member, dsb *superblock.Superblock, path string, now time.Time) (*ChangePlan, error) {
	return planReAdd(s.st, d, dsb, path, now)
}

func planReAdd(st *arrayState, d Member, dsb *superblock.Superblock, path string, now time.Time) (*ChangePlan, error) {
	if dsb.SetUUID != st.Shared.SetUUID {
		return nil, fmt.Errorf("%w: it belongs to another array", ErrRefusedChange)
	}
	dev, slot := dsb.DevNumber, int(dsb.Role())
	if dsb.Role() >= superblock.RoleMax || slot >= int(st.Shared.RaidDisks) {
		return nil, fmt.Errorf("%w: it held no slot (role %#x): add it as a spare", ErrRefusedChange, dsb.Role())
	}
	if r := st.Members[dev]; r != nil && r.State != MemberFaulty {
		return nil, fmt.Errorf("%w: device %d is %s", ErrRefusedChange, dev, r.State)
	}
	if h := st.slotHolder(slot); h != nil {
		return nil, fmt.Errorf("%w: slot %d is held by device %d now: add it as a spare", ErrRefusedChange, slot, h.Dev)
	}
	next := st.Shared
	if dev < uint32(len(next.DevRoles)) && next.DevRoles[dev] == superblock.RoleFaulty {
		next = clone(next)
		next.DevRoles[dev] = superblock.RoleSpare
	}
	next, err := ReAdd(next, dsb)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrRefusedChange, err)
	}
	own := &Device{Member: d, Super: Recovering(dsb, 0, st.HasBitmap)}
	return &ChangePlan{
		Entry: JournalEntry{Kind: ChangeReAdd, State: StatePrepared, BaseEvents: st.Events(), Dev: dev,
			DeviceUUID: dsb.DeviceUUID, Path: path, Slot: slot},
		Next:     BumpEvents(next, now),
		Writes:   append(st.devices(), *own),
		Own:      own,
		Confirm:  &broadcast.Message{Type: broadcast.NewDisk, UUID: dsb.DeviceUUID, RaidSlot: dev, Low: st.Events()},
		Announce: broadcast.ReAdd,
	}, nil
}

// checkNewDevice refuses a device that is already a member or carries
// another array's superblock.
func checkNewDevice(array [16]byte, d Member, st *arrayState) error {
	sectors, err := memberSectors(d)
	if err != nil {
		return err
	}
	sb, err := superblock.Probe(d, sectors)
	if err != nil {
		return nil // no superblock: a fresh device
	}
	switch sb.SetUUID {
	case array:
		if r := st.Members[sb.DevNumber]; r != nil && r.DeviceUUID == sb.DeviceUUID {
			return fmt.Errorf("%w: it is already member %d (%s)", ErrRefusedChange, r.Dev, r.State)
		}
		if own := sb.Role(); own < superblock.RoleMax {
			return fmt.Errorf("%w: it held slot %d of this array: re-add it", ErrRefusedChange, own)
		}
		return nil // a removed spare
	case candidateUUID(array):
		return nil // an abandoned candidate
	}
	return fmt.Errorf("%w: it carries a superblock of array %s: zero it first (mdadm-go --zero-superblock)", ErrRefusedChange, bitmap.FormatUUID(sb.SetUUID))
}

// CheckApplied is a receiver's verdict on a METADATA_UPDATED, REMOVE or
// RE_ADD after it re-read the members into st: the sender's events must
// be there (else this node does not see what the sender wrote), a removed
// member must be gone and a re-added one recovering. An error is the
// receiver's answer: this node did not apply the change (the sender
// undoes an add or re-add everywhere; the node retries, and stops its
// array if it cannot follow).
func CheckApplied(msg broadcast.Message, st *State) error { return checkApplied(msg, st.st) }

func checkApplied(msg broadcast.Message, st *arrayState) error {
	return checkAppliedSeen(msg, st, false)
}

// checkAppliedSeen is checkApplied; allowUnseen skips the check that this
// node sees every working member (a forced assemble failing them).
func checkAppliedSeen(msg broadcast.Message, st *arrayState, allowUnseen bool) error {
	if st.Events() < msg.Low {
		return fmt.Errorf("the freshest superblock found has events %d, the sender wrote %d: this node does not see the members the sender wrote", st.Events(), msg.Low)
	}
	if u := st.unseen(); len(u) > 0 && !allowUnseen {
		return errUnseen(u)
	}
	switch msg.Type {
	case broadcast.Remove:
		if r := st.Members[msg.RaidSlot]; r != nil {
			return fmt.Errorf("device %d is still a member (%s) in the superblocks this node reads", msg.RaidSlot, r.State)
		}
	case broadcast.ReAdd:
		if r := st.Members[msg.RaidSlot]; r == nil || r.State != MemberRecovering {
			return fmt.Errorf("device %d is not recovering in the superblocks this node reads", msg.RaidSlot)
		}
	}
	return nil
}

// NewDiskAnswer is a receiver's verdict on NEWDISK: found is the
// superblock of the device this node found with the message's device UUID
// (under the array's or the candidate UUID) among its device paths, nil
// if none. nil means confirmed.
func NewDiskAnswer(msg broadcast.Message, found *superblock.Superblock, where string) error {
	if found == nil {
		return fmt.Errorf("%w: device %s (device number %d) is not among %s", ErrDeviceNotFound, bitmap.FormatUUID(msg.UUID), msg.RaidSlot, where)
	}
	if found.DevNumber != msg.RaidSlot {
		return fmt.Errorf("device %s at %s carries device number %d, the sender adds it as %d", bitmap.FormatUUID(msg.UUID), where, found.DevNumber, msg.RaidSlot)
	}
	return nil
}

// MatchesNewDisk reports whether sb is the device a NEWDISK for device
// UUID dev of array names: that device UUID under the array's UUID or its
// candidate UUID.
func MatchesNewDisk(sb *superblock.Superblock, array, dev [16]byte) bool {
	return sb != nil && sb.DeviceUUID == dev && (sb.SetUUID == array || sb.SetUUID == candidateUUID(array))
}

// Reconcile plans the rewrite that makes the members agree after a
// sender died between two member writes: the members whose superblock is
// not the freshest (behind), and, if any, the freshest superblock with the
// events bumped and the members to write it to. Nothing to do: behind is
// empty.
func Reconcile(s *State, now time.Time) (behind []uint32, next *superblock.Superblock, devs []Device) {
	return planReconcile(s.st, now)
}

func planReconcile(st *arrayState, now time.Time) (behind []uint32, next *superblock.Superblock, devs []Device) {
	for _, s := range st.statuses() {
		r := st.Members[s.Dev]
		if r.State != MemberFaulty && r.Super.Events != st.Events() {
			behind = append(behind, s.Dev)
		}
	}
	if len(behind) == 0 {
		return nil, nil, nil
	}
	return behind, BumpEvents(st.Shared, now), st.devices()
}
