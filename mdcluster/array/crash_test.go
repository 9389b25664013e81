package array

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/mdcluster/mdcluster/mdcluster/store"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// journalPending returns the manager's pending journal entries.
func (m *Manager) journalPending(t *testing.T) []JournalEntry {
	t.Helper()
	var out []JournalEntry
	err := m.cfg.Store.View(func(tx store.Txn) error {
		pend, err := m.jr.Pending(tx)
		for _, p := range pend {
			e, err := decodeEntry(p.Data)
			if err != nil {
				return err
			}
			out = append(out, e)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// crashCluster is a cluster whose node 1 dies at a chosen step.
type crashCluster struct {
	*tcluster
	step atomic.Value // the step node 1 dies at ("" none)
}

func newCrashCluster(t *testing.T, raidDevices int, images ...string) *crashCluster {
	cc := &crashCluster{tcluster: newTCluster(t, 3)}
	cc.step.Store("")
	cc.manager(1, func(cfg *Config) {
		cfg.crashAt = func(s string) bool {
			return cc.step.CompareAndSwap(s, "")
		}
	})
	cc.createAndAssemble(true, raidDevices, images...)
	return cc
}

// crashAt runs op on node 1 so that it dies at step, then checks that the
// survivors agree with the disk, restarts node 1, checks that every node
// agrees with the disk and node 1's journal is empty, and returns the
// members everywhere.
func (cc *crashCluster) crashAt(step string, op func(m *Manager) error) string {
	t := cc.t
	t.Helper()
	cc.step.Store(step)
	err := op(cc.nodes[1].m)
	if !errors.Is(err, errCrashed) {
		t.Fatalf("step %s: the operation returned %v, want the test crash", step, err)
	}
	cc.crash(1)
	cc.waitDeparted(1)
	survivors := cc.agree("")
	m1 := cc.restart(1)
	if err := m1.Assemble(cc.ctx()); err != nil {
		t.Fatalf("step %s: node 1 restarting: %v", step, err)
	}
	after := cc.agree("")
	if p := m1.journalPending(t); len(p) != 0 {
		t.Fatalf("step %s: node 1's journal still holds %+v", step, p)
	}
	t.Logf("crash at %-18s survivors %s, after restart %s", step, survivors, after)
	return after
}

// hasMember reports whether a member with the device on image name is in
// the (rendered) member list, by its device UUID.
func (cc *crashCluster) deviceState(name string) (set string, member bool) {
	f := mustOpen(cc.t, filepath.Join(cc.dir, name))
	sb := readSuperOf(f)
	if sb == nil {
		return "none", false
	}
	uuid := cc.nodes[2].m.UUID()
	switch sb.SetUUID {
	case uuid:
		set = "array"
	case candidateUUID(uuid):
		set = "candidate"
	default:
		set = "other"
	}
	for _, s := range cc.nodes[2].m.Members() {
		if s.DeviceUUID == sb.DeviceUUID {
			member = true
		}
	}
	return set, member
}

// TestCrashAddAtEveryJournalStep kills the adding node at each step of an
// add (journalled, candidate written, NEWDISK answered, confirmed,
// committing, superblocks written, METADATA_UPDATED answered). Before the
// commit the add is rolled back everywhere (the survivors wipe a candidate
// they confirmed; the restarted node wipes one nobody heard of); from the
// commit on it is completed everywhere. No member list ever differs from
// the disk's.
func TestCrashAddAtEveryJournalStep(t *testing.T) {
	cc := newCrashCluster(t, 2, "a.img", "b.img")
	steps := []string{"add:journalled", "add:candidate", "add:newdisk", "add:confirmed", "add:committing", "add:written", "add:announced"}
	for i, step := range steps {
		img := fmt.Sprintf("c%d.img", i)
		p := cc.image(img)
		cc.crashAt(step, func(m *Manager) error {
			_, err := m.AddSpare(cc.ctx(), p)
			return err
		})
		set, member := cc.deviceState(img)
		committed := step == "add:written" || step == "add:announced"
		switch {
		case committed && (set != "array" || !member):
			t.Fatalf("crash at %s: the device is %s/member %v, want the add completed", step, set, member)
		case !committed && (set != "none" || member):
			t.Fatalf("crash at %s: the device is %s/member %v, want the add rolled back and its superblock wiped", step, set, member)
		}
	}
}

// TestCrashFailAtEveryJournalStep kills the failing node at each step of
// --fail: before the superblocks are written the member stays in sync
// everywhere, from then on it is faulty everywhere. (Between steps the
// member is re-added and rebuilt.)
func TestCrashFailAtEveryJournalStep(t *testing.T) {
	cc := newCrashCluster(t, 3, "a.img", "b.img", "x.img")
	ctx := cc.ctx()
	for _, step := range []string{"fail:journalled", "fail:committing", "fail:written", "fail:announced"} {
		cc.crashAt(step, func(m *Manager) error { return m.Fail(cc.ctx(), 2) })
		committed := step == "fail:written" || step == "fail:announced"
		st := memberState(cc.nodes[2].m, 2)
		if committed != (st == MemberFaulty) {
			t.Fatalf("crash at %s: dev 2 is %s", step, st)
		}
		if committed {
			if _, err := cc.nodes[2].m.ReAdd(ctx, filepath.Join(cc.dir, "x.img")); err != nil {
				t.Fatal(err)
			}
			cc.waitSynced()
			cc.agree("")
		}
	}
	cc.sameData("a.img", "x.img")
}

func memberState(m *Manager, dev uint32) MemberState {
	for _, s := range m.Members() {
		if s.Dev == dev {
			return s.State
		}
	}
	return -1
}

// TestCrashRemoveAtEveryJournalStep kills the removing node at each step
// of --remove of a faulty member: removed everywhere from the superblock
// write on, still faulty everywhere before.
func TestCrashRemoveAtEveryJournalStep(t *testing.T) {
	cc := newCrashCluster(t, 3, "a.img", "b.img", "x.img")
	ctx := cc.ctx()
	for _, step := range []string{"remove:journalled", "remove:committing", "remove:written", "remove:announced"} {
		if memberState(cc.nodes[2].m, 2) != MemberFaulty {
			if err := cc.nodes[2].m.Fail(ctx, 2); err != nil {
				t.Fatal(err)
			}
			cc.agree("")
		}
		cc.crashAt(step, func(m *Manager) error { return m.Remove(cc.ctx(), 2) })
		committed := step == "remove:written" || step == "remove:announced"
		st := memberState(cc.nodes[2].m, 2)
		if committed != (st == -1) || (!committed && st != MemberFaulty) {
			t.Fatalf("crash at %s: dev 2 is %v", step, st)
		}
		if committed {
			if _, err := cc.nodes[3].m.ReAdd(ctx, filepath.Join(cc.dir, "x.img")); err != nil {
				t.Fatal(err)
			}
			cc.waitSynced()
			cc.agree("")
		}
	}
}

// TestCrashReAddAtEveryJournalStep kills the re-adding node at each step
// of --re-add: the member comes back (recovering, then rebuilt by a
// survivor) from the superblock write on, and stays out before.
func TestCrashReAddAtEveryJournalStep(t *testing.T) {
	cc := newCrashCluster(t, 3, "a.img", "b.img", "x.img")
	ctx := cc.ctx()
	for _, step := range []string{"re-add:journalled", "re-add:confirmed", "re-add:committing", "re-add:written", "re-add:announced"} {
		if st := memberState(cc.nodes[2].m, 2); st != -1 {
			if st != MemberFaulty {
				if err := cc.nodes[2].m.Fail(ctx, 2); err != nil {
					t.Fatal(err)
				}
			}
			if err := cc.nodes[2].m.Remove(ctx, 2); err != nil {
				t.Fatal(err)
			}
			cc.agree("")
		}
		cc.writeSome(3, byte(len(step)), 1<<20)
		cc.crashAt(step, func(m *Manager) error {
			_, err := m.ReAdd(cc.ctx(), filepath.Join(cc.dir, "x.img"))
			return err
		})
		committed := step == "re-add:written" || step == "re-add:announced"
		cc.waitSynced()
		st := memberState(cc.nodes[2].m, 2)
		if committed != (st == MemberInSync) || (!committed && st != -1) {
			t.Fatalf("crash at %s: dev 2 is %v", step, st)
		}
		if committed {
			cc.sameData("a.img", "x.img")
		}
	}
}

// TestDecideRecovery checks the pure decision for every change kind
// against the disk facts that mean "committed" and "not committed".
func TestDecideRecovery(t *testing.T) {
	arr := [16]byte{1, 2, 3}
	shared := &superblock.Superblock{SetUUID: arr, Events: 5, RaidDisks: 2, Size: 100,
		DevRoles: []uint16{0, superblock.RoleFaulty, superblock.RoleSpare, 1}}
	dev := func(set [16]byte, n uint32, own uint16, feat uint32) *superblock.Superblock {
		roles := slices.Clone(shared.DevRoles)
		if int(n) < len(roles) {
			roles[n] = own
		}
		return &superblock.Superblock{SetUUID: set, DevNumber: n, DevRoles: roles, FeatureMap: feat}
	}
	clean := *shared
	clean.ResyncOffset = superblock.MaxSector
	cases := []struct {
		name string
		e    JournalEntry
		f    DiskFacts
		want Outcome
		zero bool
	}{
		{"add, nothing written", JournalEntry{Kind: ChangeAdd, Array: arr, Dev: 2}, DiskFacts{Shared: shared}, OutcomeRolledBack, false},
		{"add, candidate", JournalEntry{Kind: ChangeAdd, Array: arr, Dev: 2}, DiskFacts{Shared: shared, Device: dev(candidateUUID(arr), 2, superblock.RoleSpare, 0)}, OutcomeRolledBack, true},
		{"add, committed", JournalEntry{Kind: ChangeAdd, Array: arr, Dev: 2}, DiskFacts{Shared: shared, Device: dev(arr, 2, superblock.RoleSpare, 0)}, OutcomeCompleted, false},
		{"add, then failed", JournalEntry{Kind: ChangeAdd, Array: arr, Dev: 1}, DiskFacts{Shared: shared, Device: dev(arr, 1, superblock.RoleSpare, 0)}, OutcomeRolledBack, false},
		{"fail, written", JournalEntry{Kind: ChangeFail, Dev: 1}, DiskFacts{Shared: shared}, OutcomeCompleted, false},
		{"fail, not written", JournalEntry{Kind: ChangeFail, Dev: 0}, DiskFacts{Shared: shared}, OutcomeRolledBack, false},
		{"re-add, written", JournalEntry{Kind: ChangeReAdd, Dev: 3, Slot: 1}, DiskFacts{Shared: shared}, OutcomeCompleted, false},
		{"re-add, not written", JournalEntry{Kind: ChangeReAdd, Dev: 2, Slot: 1}, DiskFacts{Shared: shared}, OutcomeRolledBack, false},
		{"remove faulty, written", JournalEntry{Kind: ChangeRemove, Array: arr, Dev: 2}, DiskFacts{Shared: shared, Device: dev(arr, 2, 1, 0)}, OutcomeCompleted, false},
		{"remove faulty, not written", JournalEntry{Kind: ChangeRemove, Array: arr, Dev: 1}, DiskFacts{Shared: shared, Device: dev(arr, 1, 1, 0)}, OutcomeRolledBack, false},
		{"remove spare, marked", JournalEntry{Kind: ChangeRemove, Array: arr, Dev: 2}, DiskFacts{Shared: shared, Device: dev(arr, 2, superblock.RoleFaulty, 0)}, OutcomeCompleted, false},
		{"remove spare, not marked", JournalEntry{Kind: ChangeRemove, Array: arr, Dev: 2}, DiskFacts{Shared: shared, Device: dev(arr, 2, superblock.RoleSpare, 0)}, OutcomeRolledBack, false},
		{"in-sync, written", JournalEntry{Kind: ChangeInSync, Array: arr, Dev: 3}, DiskFacts{Shared: shared, Device: dev(arr, 3, 1, 0)}, OutcomeCompleted, false},
		{"in-sync, not written", JournalEntry{Kind: ChangeInSync, Array: arr, Dev: 3}, DiskFacts{Shared: shared, Device: dev(arr, 3, 1, superblock.FeatureRecoveryOffset)}, OutcomeRolledBack, false},
		{"resynced, written", JournalEntry{Kind: ChangeResynced}, DiskFacts{Shared: &clean}, OutcomeCompleted, false},
		{"resynced, not written", JournalEntry{Kind: ChangeResynced}, DiskFacts{Shared: shared}, OutcomeRolledBack, false},
		{"bitmap none, written", JournalEntry{Kind: ChangeBitmap, Bitmap: BitmapInternal}, DiskFacts{Shared: shared}, OutcomeCompleted, false},
	}
	for _, tc := range cases {
		d := DecideRecovery(tc.e, tc.f)
		if d.Outcome != tc.want || d.ZeroCandidate != tc.zero {
			t.Errorf("%s: %+v, want %s (zero %v)", tc.name, d, tc.want, tc.zero)
		}
	}
}
