package array

import (
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

func rec(dev uint32, slot int, st MemberState) *memberRec {
	return &memberRec{MemberStatus: MemberStatus{Dev: dev, Slot: slot, State: st, DeviceUUID: [16]byte{byte(dev + 1)}},
		Super: &superblock.Superblock{DevNumber: dev}}
}

func state(clean bool, raidDisks int, rs ...*memberRec) *arrayState {
	sh := &superblock.Superblock{RaidDisks: uint32(raidDisks), Size: 1000}
	if clean {
		sh.ResyncOffset = superblock.MaxSector
	}
	st := &arrayState{Shared: sh, Members: map[uint32]*memberRec{}}
	for _, r := range rs {
		st.Members[r.Dev] = r
	}
	return st
}

func TestPlanEngine(t *testing.T) {
	old := state(true, 2, rec(0, 0, MemberInSync), rec(1, 1, MemberInSync), rec(2, -1, MemberSpare))
	next := state(true, 2, rec(0, -1, MemberFaulty), rec(1, 1, MemberInSync), rec(3, -1, MemberSpare))
	var got []string
	for _, op := range planEngine(old, next) {
		got = append(got, op.Kind.String()+" "+string(rune('0'+op.Member.Dev)))
	}
	want := "fail 0,remove 2,set 3"
	if strings.Join(got, ",") != want {
		t.Fatalf("plan %v, want %s (failures first, then removals, then additions)", got, want)
	}
	if ops := planEngine(old, old); len(ops) != 0 {
		t.Fatalf("no change planned %v", ops)
	}
	// A spare activated into a slot, then in sync.
	act := state(true, 2, rec(0, -1, MemberFaulty), rec(1, 1, MemberInSync), rec(3, 0, MemberRecovering))
	ops := planEngine(next, act)
	if len(ops) != 1 || ops[0].Kind != opSet || ops[0].Member.State != MemberRecovering || ops[0].Member.Slot != 0 {
		t.Fatalf("activation planned as %+v", ops)
	}
}

func TestNextSyncWork(t *testing.T) {
	hints := map[string]uint64{}
	// Clean and complete: nothing.
	if w, ok := nextSyncWork(state(true, 2, rec(0, 0, MemberInSync), rec(1, 1, MemberInSync)), hints); ok {
		t.Fatalf("work on a clean array: %+v", w)
	}
	// Not clean: resync from the superblock's offset, or a taker's hint.
	st := state(false, 2, rec(0, 0, MemberInSync), rec(1, 1, MemberInSync))
	st.Shared.ResyncOffset = 100
	if w, _ := nextSyncWork(st, hints); w.Kind != SyncResync || w.From != 100 {
		t.Fatalf("resync work %+v", w)
	}
	hints[workKey(SyncResync, 0)] = 400
	if w, _ := nextSyncWork(st, hints); w.From != 400 {
		t.Fatalf("resync does not resume at the hint: %+v", w)
	}
	// Degraded with a spare: activate it into the empty slot.
	deg := state(true, 2, rec(0, -1, MemberFaulty), rec(1, 1, MemberInSync), rec(2, -1, MemberSpare))
	if w, _ := nextSyncWork(deg, hints); !w.Activate || w.Dev != 2 || w.Slot != 0 {
		t.Fatalf("degraded work %+v", w)
	}
	// A recovering member first, even if not clean.
	r := rec(2, 0, MemberRecovering)
	r.RecoveryOffset = 50
	rc := state(false, 2, r, rec(1, 1, MemberInSync))
	if w, _ := nextSyncWork(rc, map[string]uint64{workKey(SyncRecovery, 2): 300}); w.Kind != SyncRecovery || w.Dev != 2 || w.From != 300 {
		t.Fatalf("recovery work %+v", w)
	}
	// Nothing in sync: nothing to copy from.
	if _, ok := nextSyncWork(state(false, 2, rec(0, 0, MemberRecovering)), hints); ok {
		t.Fatal("work with no in-sync member")
	}
}

// TestStateFromInspectionRemoved checks the member-selection rule that
// keeps removed devices from coming back as spares.
func TestStateFromInspectionRemoved(t *testing.T) {
	ms := make([]*memMember, 5)
	for i := range ms {
		ms[i] = newMem(string(rune('a'+i))+".img", 4<<20)
	}
	c, err := Create(CreateSpec{Level: 1, RaidDevices: 2, Name: "t", AssumeClean: true, Bitmap: BitmapNone, Rand: &counterRand{}, Now: fixedNow(1)},
		asMembers(ms[0], ms[1], ms[2], ms[3]))
	if err != nil {
		t.Fatal(err)
	}
	devs := c.Devices
	// Fail and remove dev 1 (its own superblock is not written any more),
	// and remove spare dev 3 with the removal mark on its superblock.
	sh, _ := Fail(c.Shared, 1)
	sh = BumpEvents(sh, time.Unix(2, 0))
	if _, err := WriteAll(sh, []Device{devs[0], devs[2], devs[3]}); err != nil {
		t.Fatal(err)
	}
	sh, _ = Remove(sh, 1)
	sh = BumpEvents(sh, time.Unix(3, 0))
	mark := clone(readSuperOf(ms[3]))
	mark.DevRoles[3] = superblock.RoleFaulty
	mark.UpdateChecksum()
	if err := writeOwnSuper(ms[3], mark); err != nil {
		t.Fatal(err)
	}
	if _, err := WriteAll(sh, []Device{devs[0], devs[2]}); err != nil {
		t.Fatal(err)
	}
	insp, err := Inspect(asMembers(ms[0], ms[1], ms[2], ms[3]), InspectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	paths := map[Member]string{}
	st, err := stateFromInspection(insp, paths)
	if err != nil {
		t.Fatal(err)
	}
	if got := memberKey(st.statuses()); !strings.Contains(got, "[0 ") || !strings.Contains(got, "[2 ") || strings.Contains(got, "[1 ") || strings.Contains(got, "[3 ") {
		t.Fatalf("members %s: want dev 0 in sync and dev 2 a spare, the removed ones out", got)
	}
	if len(st.Rejected) != 2 {
		t.Fatalf("rejected %v, want the removed member and the removed spare", st.Rejected)
	}
	t.Logf("not used: %v", st.Rejected)
}

func TestNamesAndCandidate(t *testing.T) {
	u := [16]byte{0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	if got := LockspaceName(u); got != "deadbeef-0102-0304-0506-0708090a0b0c" {
		t.Fatalf("lockspace name %s", got)
	}
	ns := journalNamespace(u)
	if err := ns.Validate(); err != nil || len(ns) != 32 {
		t.Fatalf("journal namespace %q: %v", ns, err)
	}
	if c := candidateUUID(u); c == u || candidateUUID(c) != u {
		t.Fatal("candidate UUID must differ from the array's and map back")
	}
}
