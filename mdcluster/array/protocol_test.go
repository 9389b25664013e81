package array

import (
	"errors"
	"slices"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// TestChangePlans checks the pure change protocol on in-memory members: the
// refusals, the commit point first, the steps' order, what is announced,
// the receivers' verdicts and the reconcile after a half-done write.
func TestChangePlans(t *testing.T) {
	ms := []*memMember{newMem("a", 4<<20), newMem("b", 4<<20), newMem("s", 4<<20), newMem("n", 4<<20)}
	c, err := Create(CreateSpec{Level: 1, RaidDevices: 2, Name: "t", AssumeClean: true, Bitmap: BitmapNone, Rand: &counterRand{}, Now: fixedNow(1)},
		asMembers(ms[0], ms[1], ms[2]))
	if err != nil {
		t.Fatal(err)
	}
	uuid := c.Shared.SetUUID
	read := func() *State {
		t.Helper()
		st, err := ReadState(asMembers(ms[0], ms[1], ms[2]), uuid, nil)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	now := time.Unix(5, 0)
	st := read()
	// Remove of an in-sync member is refused; of the spare it marks the
	// spare removed and writes the others.
	if _, err := PlanRemove(st, 0, now); !errors.Is(err, ErrRefusedChange) {
		t.Fatalf("remove of an in-sync member: %v", err)
	}
	p, err := PlanRemove(st, 2, now)
	if err != nil {
		t.Fatal(err)
	}
	if p.Mark == nil || p.Mark.Super.Role() != superblock.RoleFaulty || len(p.Writes) != 2 || p.Announce != broadcast.Remove ||
		!slices.Equal(p.Steps(), []Step{StepJournal, StepCommit, StepMark, StepWrite, StepReload, StepAnnounce}) {
		t.Fatalf("remove of the spare: %+v steps %v", p, p.Steps())
	}
	// Fail: the failed member is not written; the events move by one.
	p, err = PlanFail(st, 1, now)
	if err != nil {
		t.Fatal(err)
	}
	if p.Next.Events != st.Events()+1 || p.Next.DevRoles[1] != superblock.RoleFaulty || p.Entry.Kind != ChangeFail {
		t.Fatalf("fail plan %+v", p)
	}
	// Half the write (a sender that died after the first member): the
	// state still reads, Reconcile names the member behind, and a
	// receiver's verdict on the announcement needs the events written.
	if _, err := WriteAll(p.Next, p.Writes[:1]); err != nil {
		t.Fatal(err)
	}
	half := read()
	if half.Events() != p.Next.Events {
		t.Fatalf("freshest events %d, want %d", half.Events(), p.Next.Events)
	}
	behind, next, devs := Reconcile(half, now)
	if !slices.Equal(behind, []uint32{2}) || next.Events != p.Next.Events+1 || len(devs) != 2 {
		t.Fatalf("reconcile: behind %v next %d devs %d", behind, next.Events, len(devs))
	}
	msg := Announcement(broadcast.MetadataUpdated, 1, half)
	if msg.Low != half.Events() || msg.RaidSlot != 0 {
		t.Fatalf("announcement %v", msg)
	}
	if err := CheckApplied(msg, st); err == nil {
		t.Fatal("a receiver that reads the old superblocks applied the change")
	}
	if err := CheckApplied(msg, half); err != nil {
		t.Fatal(err)
	}
	if err := CheckApplied(broadcast.Message{Type: broadcast.Remove, RaidSlot: 0, Low: half.Events()}, half); err == nil {
		t.Fatal("REMOVE of a member still there applied")
	}
	// Add: the new device first, NEWDISK for its device UUID, the
	// candidate under the candidate UUID; a receiver that does not find
	// the device answers not found.
	p, err = PlanAdd(half, ms[3], "n", nil, &counterRand{n: 100}, now)
	if err != nil {
		t.Fatal(err)
	}
	if p.Writes[0].Member != Member(ms[3]) || p.Candidate.Super.SetUUID != CandidateUUID(uuid) || p.Confirm.UUID != p.Real.Super.DeviceUUID ||
		p.Steps()[1] != StepCandidate {
		t.Fatalf("add plan %+v", p)
	}
	if err := NewDiskAnswer(*p.Confirm, nil, "nowhere"); !errors.Is(err, ErrDeviceNotFound) {
		t.Fatalf("missing device: %v", err)
	}
	if err := NewDiskAnswer(*p.Confirm, p.Candidate.Super, "n"); err != nil || !MatchesNewDisk(p.Candidate.Super, uuid, p.Confirm.UUID) {
		t.Fatalf("found device: %v", err)
	}
	if _, err := PlanAdd(half, ms[0], "a", nil, &counterRand{}, now); !errors.Is(err, ErrRefusedChange) {
		t.Fatalf("adding a member: %v", err)
	}
}
