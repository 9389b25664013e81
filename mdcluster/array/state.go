package array

import (
	"fmt"
	"slices"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// MemberStatus is one member of a running array as this node has it bound.
type MemberStatus struct {
	// Dev is the member's device number (md's dev_number).
	Dev uint32
	// DeviceUUID is the member's device UUID (what NEWDISK carries).
	DeviceUUID [16]byte
	// Path is where this node reaches the member (it may differ between
	// nodes: members are found by UUID).
	Path string
	// Slot is the raid slot of an in-sync or recovering member, else -1.
	Slot int
	// State is the member's state on this node.
	State MemberState
	// RecoveryOffset is how far a recovering member is rebuilt (sectors).
	RecoveryOffset uint64
}

// String renders the member for logs and test failures.
func (s MemberStatus) String() string {
	return fmt.Sprintf("dev %d (%x) slot %d %s", s.Dev, s.DeviceUUID[:4], s.Slot, s.State)
}

// memberRec is a bound member.
type memberRec struct {
	MemberStatus
	Member Member
	// Super is the member's own superblock as last read.
	Super *superblock.Superblock
}

// arrayState is the array as this node last read it from the members:
// the freshest superblock, the members it uses, and the bitmap layout.
type arrayState struct {
	Shared  *superblock.Superblock
	Members map[uint32]*memberRec
	// Rejected explains every device with the array's UUID that is not
	// used (stale, removed, mismatched ...), one line each.
	Rejected []string
	// Layout is the bitmap's layout (valid when HasBitmap).
	Layout    bitmap.Layout
	HasBitmap bool
	Clustered bool
	Nodes     int
	// BitmapSuper is the bitmap superblock read from the freshest member.
	BitmapSuper *bitmap.Superblock
	// Seen holds the device number of every device this node found with
	// the array's superblock, used or not (nil: not recorded).
	Seen map[uint32]bool
}

// missingWorking lists the device numbers that the freshest superblock
// gives a working slot (in sync or recovering) but that no device this
// node read carries.
func (s *arrayState) missingWorking() []uint32 {
	if s == nil || s.Shared == nil || s.Seen == nil {
		return nil
	}
	var out []uint32
	for d, role := range s.Shared.DevRoles {
		if uint32(role) < s.Shared.RaidDisks && role < superblock.RoleMax && !s.Seen[uint32(d)] {
			out = append(out, uint32(d))
		}
	}
	return out
}

// unseen is missingWorking for a clustered array: a node that does not
// see such a member must not write to the array, because its writes would
// miss that mirror while the other nodes keep reading it (md-cluster
// assumes every node sees every member; this is where the assumption is
// checked). A node-local array instead records its missing members as
// faulty when it assembles, as md does (assembleStandalone).
func (s *arrayState) unseen() []uint32 {
	if s == nil || !s.Clustered {
		return nil
	}
	return s.missingWorking()
}

// errUnseen is the error of a node that does not see working members.
func errUnseen(devs []uint32) error {
	return fmt.Errorf("%w: this node does not see device number(s) %v, which the array lists as working members: "+
		"every node must see every member (check this node's device paths); fail the member from a node that sees it, "+
		"or assemble with --run or --force to record it as faulty for every node (for a member that is really gone); "+
		"writing without it here would leave that mirror stale while other nodes read it", ErrMemberNotSeen, devs)
}

// Events returns the freshest superblock's event count.
func (s *arrayState) Events() uint64 {
	if s == nil || s.Shared == nil {
		return 0
	}
	return s.Shared.Events
}

// statuses returns the members sorted by device number.
func (s *arrayState) statuses() []MemberStatus {
	if s == nil {
		return nil
	}
	out := make([]MemberStatus, 0, len(s.Members))
	for _, m := range s.Members {
		out = append(out, m.MemberStatus)
	}
	slices.SortFunc(out, func(a, b MemberStatus) int { return int(a.Dev) - int(b.Dev) })
	return out
}

// inUse is every device number a member (or a device that still carries
// the array's superblock) uses, for choosing a new one.
func (s *arrayState) inUse() []uint32 {
	var out []uint32
	for d := range s.Members {
		out = append(out, d)
	}
	return out
}

// slotFree reports whether no in-sync or recovering member holds slot.
func (s *arrayState) slotHolder(slot int) *memberRec {
	for _, m := range s.Members {
		if m.Slot == slot && (m.State == MemberInSync || m.State == MemberRecovering) {
			return m
		}
	}
	return nil
}

// devices returns the bound members as Devices for WriteAll, sorted by
// device number, skipping faulty ones.
func (s *arrayState) devices() []Device {
	var out []Device
	for _, st := range s.statuses() {
		m := s.Members[st.Dev]
		if m.State == MemberFaulty {
			continue
		}
		out = append(out, Device{Member: m.Member, Super: m.Super})
	}
	return out
}

// devicesExcept returns first, then the devices but dev's.
func (s *arrayState) devicesExcept(dev uint32, first ...Device) []Device {
	devs := first
	for _, d := range s.devices() {
		if d.Super.DevNumber != dev {
			devs = append(devs, d)
		}
	}
	return devs
}

// degraded reports whether some slot has no in-sync member.
func (s *arrayState) degraded() bool {
	if s == nil || s.Shared == nil {
		return false
	}
	n := 0
	for slot := 0; slot < int(s.Shared.RaidDisks); slot++ {
		if m := s.slotHolder(slot); m != nil && m.State == MemberInSync {
			n++
		}
	}
	return n < int(s.Shared.RaidDisks)
}

// stateFromInspection turns an Inspection (of the devices found among the
// configured paths that carry the array's UUID) into the members this node
// uses. It adds one rule to Inspect's: a device Inspect calls a spare is
// used only if its own superblock says it is a spare and it is current. A
// member that was failed and removed still carries its old slot in its own
// superblock and an old event count (md stops writing faulty members); a
// spare that was removed carries the removal mark (its own role faulty).
// Neither may come back as a spare just because it is still plugged in:
// members are found by UUID, not listed by hand, so this is the only thing
// that keeps a removed device out (a removed member comes back with
// ReAdd).
func stateFromInspection(insp *Inspection, paths map[Member]string) (*arrayState, error) {
	if insp.Info == nil || insp.Freshest < 0 {
		return nil, fmt.Errorf("no usable superblock of the array: %s", insp.Reason)
	}
	fresh := insp.Members[insp.Freshest].Super
	st := &arrayState{Shared: clone(fresh), Members: map[uint32]*memberRec{}, Seen: map[uint32]bool{}}
	for _, r := range insp.Members {
		if r.Super != nil {
			st.Seen[r.Super.DevNumber] = true
		}
		if r.Super == nil {
			if r.Status != StatusMissing {
				st.Rejected = append(st.Rejected, fmt.Sprintf("%s: %s", r.Name, r.Reason))
			}
			continue
		}
		rec := &memberRec{MemberStatus: MemberStatus{Dev: r.Super.DevNumber, DeviceUUID: r.Super.DeviceUUID,
			Path: paths[r.Member], Slot: -1}, Member: r.Member, Super: r.Super}
		switch r.Status {
		case StatusInSync:
			rec.Slot, rec.State = r.Slot, MemberInSync
		case StatusRecovering:
			rec.Slot, rec.State, rec.RecoveryOffset = r.Slot, MemberRecovering, r.Super.RecoveryOffset
		case StatusSpare:
			own := r.Super.Role()
			switch {
			case own == superblock.RoleFaulty:
				st.Rejected = append(st.Rejected, fmt.Sprintf("%s: removed from the array (its superblock marks it removed)", r.Name))
				continue
			case own != superblock.RoleSpare:
				st.Rejected = append(st.Rejected, fmt.Sprintf("%s: removed from the array (it held slot %d, the array no longer lists it: re-add it)", r.Name, own))
				continue
			case r.Super.Events+eventMargin < fresh.Events:
				st.Rejected = append(st.Rejected, fmt.Sprintf("%s: stale spare (events %d, array %d): not used", r.Name, r.Super.Events, fresh.Events))
				continue
			}
			rec.State = MemberSpare
		case StatusFaulty:
			rec.State = MemberFaulty
		default:
			st.Rejected = append(st.Rejected, fmt.Sprintf("%s: %s: %s", r.Name, r.Status, r.Reason))
			continue
		}
		st.Members[rec.Dev] = rec
	}
	// The bitmap: from the freshest member that has a readable one.
	for _, i := range append([]int{insp.Freshest}, allIndexes(len(insp.Members))...) {
		r := insp.Members[i]
		if r.Super == nil || !r.Status.Used() || len(r.Bitmap) == 0 || r.BitmapErr != nil {
			continue
		}
		bsb := r.Bitmap[0].Super
		l, err := bitmap.NewLayout(&bsb, r.Super.BitmapStart(), bitmap.AlignFor(r.Super.BitmapOffset))
		if err != nil {
			continue
		}
		st.HasBitmap, st.Layout, st.BitmapSuper = true, l, &bsb
		st.Clustered, st.Nodes = bsb.Nodes > 0, int(bsb.Nodes)
		break
	}
	if fresh.HasBitmap() && !st.HasBitmap {
		return nil, fmt.Errorf("the superblock names a bitmap but no member's bitmap is readable")
	}
	if st.HasBitmap && st.Clustered != (fresh.FeatureMap&superblock.FeatureClustered != 0) {
		return nil, fmt.Errorf("the superblock and the bitmap disagree on clustering (superblock feature %#x, bitmap nodes %d): a bitmap change was interrupted; start the array on the node that made it",
			fresh.FeatureMap, st.Nodes)
	}
	return st, nil
}

func allIndexes(n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = i
	}
	return out
}

// engineOp is one step that brings the engine from one member set to
// another.
type engineOp struct {
	Kind   engineOpKind
	Member EngineMember
}

type engineOpKind int

const (
	opFail engineOpKind = iota
	opSet
	opRemove
)

func (k engineOpKind) String() string {
	return [...]string{"fail", "set", "remove"}[k]
}

func engineMember(m *memberRec) EngineMember {
	return EngineMember{Dev: m.Dev, Slot: m.Slot, State: m.State, Member: m.Member,
		DataOffset: m.Super.DataOffset, RecoveryOffset: m.RecoveryOffset}
}

// planEngine lists the engine calls that take the engine from old's
// members to next's: failures first (a member that failed must get no more
// writes before anything else changes), then additions and state changes,
// then removals. Pure: the tests check it directly.
func planEngine(old, next *arrayState) []engineOp {
	var fails, sets, removes []engineOp
	oldM := map[uint32]*memberRec{}
	if old != nil {
		oldM = old.Members
	}
	for _, st := range next.statuses() {
		n := next.Members[st.Dev]
		o := oldM[st.Dev]
		switch {
		case n.State == MemberFaulty:
			if o == nil {
				sets = append(sets, engineOp{Kind: opSet, Member: engineMember(n)})
			} else if o.State != MemberFaulty {
				fails = append(fails, engineOp{Kind: opFail, Member: engineMember(n)})
			}
		case o == nil || o.State != n.State || o.Slot != n.Slot || o.DeviceUUID != n.DeviceUUID || o.Member != n.Member ||
			(n.State == MemberRecovering && o.RecoveryOffset != n.RecoveryOffset):
			if o != nil && o.DeviceUUID != n.DeviceUUID {
				removes = append(removes, engineOp{Kind: opRemove, Member: engineMember(o)})
			}
			sets = append(sets, engineOp{Kind: opSet, Member: engineMember(n)})
		}
	}
	if old != nil {
		for _, st := range old.statuses() {
			if _, ok := next.Members[st.Dev]; !ok {
				removes = append(removes, engineOp{Kind: opRemove, Member: engineMember(oldM[st.Dev])})
			}
		}
	}
	// A device number reused by another device: remove the old one first.
	out := append(fails, removes...)
	return append(out, sets...)
}
