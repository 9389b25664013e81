package array

import (
	"encoding/base32"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/store"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// ChangeKind names a configuration change the manager journals.
type ChangeKind string

// The changes. Each one moves the array's superblocks from events E to
// E+1 (see docs/array.md, "Control plane").
const (
	// ChangeAdd adds a spare (mdadm --add / --add-spare).
	ChangeAdd ChangeKind = "add"
	// ChangeReAdd puts a failed or removed member back into its slot
	// (mdadm --re-add).
	ChangeReAdd ChangeKind = "re-add"
	// ChangeFail marks a member faulty (mdadm --fail, or an I/O error).
	ChangeFail ChangeKind = "fail"
	// ChangeRemove removes a faulty member or a spare (mdadm --remove).
	ChangeRemove ChangeKind = "remove"
	// ChangeActivate puts a spare into an empty slot to be rebuilt.
	ChangeActivate ChangeKind = "activate"
	// ChangeInSync marks a rebuilt member in sync.
	ChangeInSync ChangeKind = "in-sync"
	// ChangeResynced records that the array's resync finished.
	ChangeResynced ChangeKind = "resynced"
	// ChangeBitmap switches the bitmap between clustered and internal
	// (mdadm --grow --bitmap=), or changes the node count (--nodes).
	ChangeBitmap ChangeKind = "bitmap"
)

// JournalState is how far a journalled change got. The states are written
// in this order; each is durable before the step after it begins.
type JournalState string

const (
	// StatePrepared: journalled under the token; nothing written to any
	// member, nothing broadcast.
	StatePrepared JournalState = "prepared"
	// StateCandidate (add): the new device carries a candidate superblock
	// (the array's superblock under the candidate UUID, so no node takes
	// it for a member); NEWDISK may be on its way.
	StateCandidate JournalState = "candidate"
	// StateConfirmed (add, re-add): every node confirmed it sees the
	// device (broadcast answers and the no-new-dev lock).
	StateConfirmed JournalState = "confirmed"
	// StateCommitted: the new superblocks are being written (or are
	// written) to the members: from the first write on, the disk holds
	// the change.
	StateCommitted JournalState = "committed"
	// StateUndoing: a receiver could not apply an undoable change; the
	// sender is taking it back off the disk.
	StateUndoing JournalState = "undoing"
)

// JournalEntry is one journalled change, stored as JSON (small, readable
// in a store dump, and tolerant of fields added later).
type JournalEntry struct {
	Kind  ChangeKind   `json:"kind"`
	State JournalState `json:"state"`
	// Array is the array's UUID.
	Array [16]byte `json:"array"`
	// Node is the node that makes the change.
	Node uint32 `json:"node"`
	// BaseEvents is the superblock event count the change starts from.
	BaseEvents uint64 `json:"base_events"`
	// Dev is the device number concerned (every kind but resynced and
	// bitmap); DeviceUUID its device UUID; Path where the sender reaches
	// it; Slot its raid slot (re-add, activate).
	Dev        uint32   `json:"dev"`
	DeviceUUID [16]byte `json:"device_uuid"`
	Path       string   `json:"path,omitempty"`
	Slot       int      `json:"slot"`
	// Bitmap and Nodes describe a bitmap change.
	Bitmap BitmapMode `json:"bitmap,omitempty"`
	Nodes  int        `json:"nodes,omitempty"`
	// Started is when the change was journalled.
	Started time.Time `json:"started"`
}

func (e JournalEntry) encode() ([]byte, error) { return json.Marshal(e) }

func decodeEntry(b []byte) (JournalEntry, error) {
	var e JournalEntry
	if err := json.Unmarshal(b, &e); err != nil {
		return e, fmt.Errorf("%w: journal entry: %v", store.ErrCorrupt, err)
	}
	if e.Kind == "" || e.State == "" {
		return e, fmt.Errorf("%w: journal entry without kind or state", store.ErrCorrupt)
	}
	return e, nil
}

// journalNamespace is the store namespace of an array's journal: "array."
// and the UUID in lower-case base32 (26 characters), 32 bytes, the most a
// namespace may have.
func journalNamespace(uuid [16]byte) store.Namespace {
	enc := base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(uuid[:])
	return store.Namespace("array." + strings.ToLower(enc))
}

// candidateUUID is the set UUID a device carries while it is a candidate
// for the array (between the sender writing it and the add committing):
// the array's UUID with every bit of its first byte inverted. Receivers
// recognise it when they look for the device by its device UUID; Inspect
// sees it as another array's member, so no node adopts an unconfirmed
// device, and an abandoned candidate is never mistaken for a spare.
func candidateUUID(array [16]byte) [16]byte {
	c := array
	c[0] ^= 0xff
	return c
}

// CandidateUUID is the set UUID a device being added to the array carries
// until the add commits (see candidateUUID). A daemon that scans its
// devices for arrays must not take it for an array of its own: it exists
// only for the length of an add, and on the nodes that happen to look.
func CandidateUUID(array [16]byte) [16]byte { return candidateUUID(array) }

// Outcome is what became of a journalled change found after a crash.
type Outcome string

const (
	// OutcomeCompleted: the disk holds the change; every node is made to
	// reload it.
	OutcomeCompleted Outcome = "completed"
	// OutcomeRolledBack: the disk does not hold the change (or no longer
	// does); whatever it left (a candidate superblock) is removed.
	OutcomeRolledBack Outcome = "rolled back"
)

// DiskFacts is what the recovery decision needs to know about the
// members, read under the token after a crash.
type DiskFacts struct {
	// Shared is the freshest superblock of the array (nil if none).
	Shared *superblock.Superblock
	// Device is the superblock found on the entry's device (looked up by
	// device UUID among the configured paths), nil if none was found.
	Device *superblock.Superblock
}

// RecoveryDecision is what to do about one journalled change.
type RecoveryDecision struct {
	Outcome Outcome
	// ZeroCandidate: the device still carries its candidate superblock;
	// wipe it.
	ZeroCandidate bool
	Reason        string
}

// DecideRecovery decides, from the disk alone, what became of a change
// whose sender crashed: the commit point of every change is the first
// member written with the new superblock, so the disk says whether the
// change happened. Any node that decides (the restarted sender, or a
// survivor that saw the sender die) reaches the same answer, and acting on
// it is idempotent, so deciders can follow one another. The journal state
// only explains the decision in the log.
func DecideRecovery(e JournalEntry, f DiskFacts) RecoveryDecision {
	sh, dv := f.Shared, f.Device
	role := func(dev uint32) (uint16, bool) {
		if sh == nil || dev >= uint32(len(sh.DevRoles)) {
			return 0, false
		}
		return sh.DevRoles[dev], true
	}
	switch e.Kind {
	case ChangeAdd:
		switch {
		case dv == nil:
			return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: "the new device carries no superblock of the array"}
		case dv.SetUUID == candidateUUID(e.Array):
			return RecoveryDecision{Outcome: OutcomeRolledBack, ZeroCandidate: true,
				Reason: "the new device still carries its candidate superblock: the add never committed"}
		case dv.SetUUID == e.Array && dv.DevNumber == e.Dev:
			if r, ok := role(e.Dev); ok && r == superblock.RoleFaulty {
				return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: "the device was added, then failed"}
			}
			return RecoveryDecision{Outcome: OutcomeCompleted, Reason: "the new device carries the array's superblock"}
		}
		return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: "the device carries some other superblock"}
	case ChangeReAdd, ChangeActivate:
		if r, ok := role(e.Dev); ok && int(r) == e.Slot && r < superblock.RoleMax {
			return RecoveryDecision{Outcome: OutcomeCompleted, Reason: fmt.Sprintf("the freshest superblock puts device %d in slot %d", e.Dev, e.Slot)}
		}
		return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: fmt.Sprintf("the freshest superblock does not put device %d in slot %d", e.Dev, e.Slot)}
	case ChangeFail:
		if r, ok := role(e.Dev); ok && r == superblock.RoleFaulty {
			return RecoveryDecision{Outcome: OutcomeCompleted, Reason: fmt.Sprintf("device %d is faulty in the freshest superblock", e.Dev)}
		}
		return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: fmt.Sprintf("device %d is not faulty in the freshest superblock", e.Dev)}
	case ChangeRemove:
		if dv != nil && dv.SetUUID == e.Array && dv.DevNumber == e.Dev && dv.Role() == superblock.RoleFaulty {
			return RecoveryDecision{Outcome: OutcomeCompleted, Reason: "the removed spare's superblock marks it removed"}
		}
		if r, ok := role(e.Dev); ok && r == superblock.RoleSpare && (dv == nil || dv.Role() != superblock.RoleSpare) {
			return RecoveryDecision{Outcome: OutcomeCompleted, Reason: fmt.Sprintf("device %d is no longer in the freshest superblock", e.Dev)}
		}
		return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: fmt.Sprintf("device %d is still a member", e.Dev)}
	case ChangeInSync:
		if dv != nil && dv.SetUUID == e.Array && dv.FeatureMap&superblock.FeatureRecoveryOffset == 0 {
			return RecoveryDecision{Outcome: OutcomeCompleted, Reason: "the member's superblock has no recovery offset"}
		}
		return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: "the member is still recovering; the rebuild resumes"}
	case ChangeResynced:
		if sh != nil && sh.ResyncOffset == superblock.MaxSector {
			return RecoveryDecision{Outcome: OutcomeCompleted, Reason: "the superblock says the array is clean"}
		}
		return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: "the resync is still owed; it resumes"}
	case ChangeBitmap:
		if sh == nil {
			return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: "no superblock"}
		}
		clustered := sh.FeatureMap&superblock.FeatureClustered != 0
		if (e.Bitmap == BitmapClustered) == clustered {
			return RecoveryDecision{Outcome: OutcomeCompleted, Reason: fmt.Sprintf("the superblock's bitmap is %s", e.Bitmap)}
		}
		return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: fmt.Sprintf("the superblock's bitmap is not %s", e.Bitmap)}
	}
	return RecoveryDecision{Outcome: OutcomeRolledBack, Reason: fmt.Sprintf("unknown change kind %q", e.Kind)}
}
