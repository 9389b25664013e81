package array

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
	"github.com/mdcluster/mdcluster/mdcluster/superblock/mdtest"
)

const mib = 1 << 20

// fixtureMembers restores fixtures and opens them read-only.
func fixtureMembers(t *testing.T, names ...string) []Member {
	t.Helper()
	dir := t.TempDir()
	var ms []Member
	for _, n := range names {
		m, err := OpenFile(mdtest.Image(t, dir, n), false)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close() })
		ms = append(ms, m)
	}
	return ms
}

// statuses renders the member statuses for messages.
func statuses(in *Inspection) string {
	var b strings.Builder
	for _, r := range in.Members {
		fmt.Fprintf(&b, "  %d %s: %s slot %d role %#x: %s\n", r.Index, r.Name, r.Status, r.Slot, r.Role, r.Reason)
	}
	return b.String()
}

func wantStatus(t *testing.T, in *Inspection, want ...Status) {
	t.Helper()
	for i, w := range want {
		if in.Members[i].Status != w {
			t.Errorf("member %d: %s, want %s\n%s", i, in.Members[i].Status, w, statuses(in))
			return
		}
	}
}

// TestInspectFixtureCharlie: real md failed member 1 (its superblock
// stopped at events 17 and still claims slot 1) and rebuilt the spare into
// slot 1 (events 36). Inspect must use the freshest view: member 1 faulty,
// the old spare in sync in slot 1.
func TestInspectFixtureCharlie(t *testing.T) {
	ms := fixtureMembers(t, "raid1-charlie-0", "raid1-charlie-1-faulty", "raid1-charlie-2-spare")
	in, err := Inspect(ms, InspectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, in, StatusInSync, StatusFaulty, StatusInSync)
	if in.Freshest != 0 || in.Info.Events != 36 || !in.Startable || in.Degraded || in.Slots[0] != 0 || in.Slots[1] != 2 {
		t.Errorf("freshest %d events %d startable %v degraded %v slots %v\n%s", in.Freshest, in.Info.Events, in.Startable, in.Degraded, in.Slots, statuses(in))
	}
	if r := in.Members[1].Reason; !strings.Contains(r, "marked faulty by the newer superblock") || !strings.Contains(r, "events 36, its own 17") {
		t.Errorf("reason %q", r)
	}
	if in.Info.Bitmap != BitmapNone || in.Info.Name != "(none):charlie" || in.Info.ArraySectors != 129024 || !in.Info.Clean {
		t.Errorf("info %+v", in.Info)
	}
	// Without the rebuilt spare, the array is degraded but startable.
	in, _ = Inspect(ms[:2], InspectOptions{})
	if !in.Startable || !in.Degraded || in.InSync != 1 || len(in.Missing) != 1 || in.Missing[0] != (MissingDevice{DevNumber: 2, Slot: 1}) {
		t.Errorf("without spare: %+v\n%s", in, statuses(in))
	}
	// Only the failed member: its own superblock is the freshest it
	// knows, so it looks in sync - which is why the manager must inspect
	// all members together.
	in, _ = Inspect(ms[1:2], InspectOptions{})
	wantStatus(t, in, StatusInSync)
}

// TestInspectFixtureClustered: the clustered fixture with its spare; every
// bitmap slot is read.
func TestInspectFixtureClustered(t *testing.T) {
	ms := fixtureMembers(t, "raid1-clustered-0", "raid1-clustered-1", "raid1-clustered-2-spare")
	in, err := Inspect(ms, InspectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	wantStatus(t, in, StatusInSync, StatusInSync, StatusSpare)
	inf := in.Info
	if inf.Bitmap != BitmapClustered || inf.Nodes != 4 || inf.ClusterName != "anchor" || inf.BitmapChunk != 64<<20 || inf.Events != 21 || inf.Clean {
		t.Errorf("info %+v", inf)
	}
	if n := len(in.Members[0].Bitmap); n != 4 {
		t.Fatalf("%d bitmap slots read", n)
	}
	if ev := in.Members[0].Bitmap[1].Super.EventsCleared; ev != 21 {
		t.Errorf("slot 1 events cleared %d", ev)
	}
	// The spare's bitmap as mdadm 4.2 --add wrote it: one slot, nodes 0.
	if b := in.Members[2].Bitmap; len(b) != 1 || b[0].Super.Nodes != 0 || b[0].Dirty() != 8 {
		t.Errorf("spare bitmap %v %v", b, in.Members[2].BitmapErr)
	}
	// Selecting another array makes them all foreign.
	in, _ = Inspect(ms, InspectOptions{UUID: [16]byte{1}})
	wantStatus(t, in, StatusForeign, StatusForeign, StatusForeign)
	if in.Info != nil || in.Startable || !strings.Contains(in.Reason, "no member holds a valid superblock of array 01000000") {
		t.Errorf("%+v", in)
	}
}

// newArray creates an array on fresh in-memory members and returns them.
func newArray(t *testing.T, spec CreateSpec, n int, size int64) (*Created, []*memMember) {
	t.Helper()
	if spec.Rand == nil {
		spec.Rand = &counterRand{}
	}
	if spec.Now == nil {
		spec.Now = fixedNow(1_800_000_000)
	}
	if spec.Name == "" {
		spec.Name = "t"
	}
	var ms []Member
	var mems []*memMember
	for i := 0; i < n; i++ {
		m := newMem(fmt.Sprintf("m%d", i), size)
		ms, mems = append(ms, m), append(mems, m)
	}
	c, err := Create(spec, ms)
	if err != nil {
		t.Fatal(err)
	}
	return c, mems
}

// commit bumps the events of shared and writes it to the given devices.
func commit(t *testing.T, shared *superblock.Superblock, devs ...Device) (*superblock.Superblock, []*superblock.Superblock) {
	t.Helper()
	s := BumpEvents(shared, time.Unix(1_800_000_100, 0))
	out, err := WriteAll(s, devs)
	if err != nil {
		t.Fatal(err)
	}
	return s, out
}

func TestInspectSynthetic(t *testing.T) {
	spec := CreateSpec{Level: 1, RaidDevices: 3, Bitmap: BitmapInternal, AssumeClean: true}
	t.Run("stale and one-behind", func(t *testing.T) {
		c, ms := newArray(t, spec, 3, 8*mib)
		d := c.Devices
		s, _ := commit(t, c.Shared, d[0], d[1], d[2]) // events 1 everywhere
		s, _ = commit(t, s, d[0], d[1])               // member 2 at 1, others at 2: one behind is current
		in, _ := Inspect(asMembers(ms...), InspectOptions{})
		wantStatus(t, in, StatusInSync, StatusInSync, StatusInSync)
		commit(t, s, d[0], d[1]) // now two behind
		in, _ = Inspect(asMembers(ms...), InspectOptions{})
		wantStatus(t, in, StatusInSync, StatusInSync, StatusStale)
		if r := in.Members[2].Reason; !strings.Contains(r, "m2 has an out-of-date superblock (events 1, freshest 3 on m0)") {
			t.Errorf("reason %q", r)
		}
		if !in.Degraded || !in.Startable || in.InSync != 2 || len(in.Missing) != 0 {
			t.Errorf("%+v", in)
		}
	})
	t.Run("unsupported level", func(t *testing.T) {
		c, ms := newArray(t, CreateSpec{Level: 1, RaidDevices: 2}, 2, 8*mib)
		s := clone(c.Shared)
		s.Level = superblock.LevelRAID5
		commit(t, s, c.Devices...)
		in, _ := Inspect(asMembers(ms...), InspectOptions{})
		if in.Startable || in.Reason != "raid level raid5 is not supported by mdcluster" {
			t.Errorf("startable %v, %q", in.Startable, in.Reason)
		}
	})
	t.Run("foreign corrupt blank missing", func(t *testing.T) {
		_, ms := newArray(t, spec, 3, 8*mib)
		_, other := newArray(t, CreateSpec{Level: 1, RaidDevices: 2, Rand: &counterRand{n: 77}}, 2, 8*mib)
		ms[1].b[4096+100] ^= 0xff // corrupt member 1's superblock (checksum)
		blank := newMem("blank", 8*mib)
		in, _ := Inspect([]Member{ms[0], ms[1], nil, other[0], blank}, InspectOptions{})
		wantStatus(t, in, StatusInSync, StatusCorrupt, StatusMissing, StatusForeign, StatusNoSuperblock)
		if !errors.Is(in.Members[1].Err, superblock.ErrChecksum) || !strings.Contains(in.Members[3].Reason, "m0 has wrong uuid") ||
			!strings.Contains(in.Members[4].Reason, "blank has no superblock") {
			t.Errorf("\n%s", statuses(in))
		}
		if len(in.Missing) != 2 || in.InSync != 1 || !in.Startable || !in.Degraded {
			t.Errorf("missing %v insync %d\n%s", in.Missing, in.InSync, statuses(in))
		}
	})
	t.Run("spare faulty recovering", func(t *testing.T) {
		c, ms := newArray(t, CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapInternal}, 4, 8*mib)
		d := c.Devices
		s, _ := Fail(c.Shared, 1)
		s, _ = commit(t, s, d[0], d[2], d[3])
		s, err := Activate(s, 2, 1)
		if err != nil {
			t.Fatal(err)
		}
		d[2].Super = Recovering(d[2].Super, 4096, false)
		commit(t, s, d[0], d[2], d[3])
		in, _ := Inspect(asMembers(ms...), InspectOptions{})
		wantStatus(t, in, StatusInSync, StatusFaulty, StatusRecovering, StatusSpare)
		if in.Members[2].Slot != 1 || in.Slots[1] != -1 || !in.Degraded || in.InSync != 1 {
			t.Errorf("slots %v\n%s", in.Slots, statuses(in))
		}
		if !strings.Contains(in.Members[2].Reason, "recovered up to sector 4096") {
			t.Errorf("reason %q", in.Members[2].Reason)
		}
	})
	t.Run("mismatch and duplicate", func(t *testing.T) {
		c, ms := newArray(t, spec, 3, 8*mib)
		// Same UUID, created at another time: not the same array.
		spec2 := spec
		spec2.UUID, spec2.Now = c.Info.UUID, fixedNow(1_900_000_000)
		_, other := newArray(t, spec2, 3, 8*mib)
		// A copy of member 1's metadata on another device.
		dup := newMem("dup", 8*mib)
		copy(dup.b, ms[1].b[:2*mib])
		in, _ := Inspect([]Member{ms[0], ms[1], ms[2], other[0], dup}, InspectOptions{})
		wantStatus(t, in, StatusInSync, StatusInSync, StatusInSync, StatusMismatch, StatusMismatch)
		if !strings.Contains(in.Members[3].Reason, "doesn't match others: creation time differs") ||
			!strings.Contains(in.Members[4].Reason, "dup claims device number 1, which m1 already holds") {
			t.Errorf("\n%s", statuses(in))
		}
	})
	t.Run("split brain", func(t *testing.T) {
		c, ms := newArray(t, CreateSpec{Level: 1, RaidDevices: 2}, 2, 8*mib)
		d := c.Devices
		// m1, cut off, failed m0 (events 1); m0 went on to events 2
		// still listing m1 as active.
		s1, _ := Fail(c.Shared, 0)
		commit(t, s1, d[1])
		s0, _ := commit(t, c.Shared, d[0])
		commit(t, s0, d[0])
		in, _ := Inspect(asMembers(ms...), InspectOptions{})
		wantStatus(t, in, StatusInSync, StatusMismatch)
		if r := in.Members[1].Reason; r != "ignoring m1 as it reports m0 as failed" {
			t.Errorf("reason %q", r)
		}
	})
	t.Run("bitmap damaged on one member", func(t *testing.T) {
		_, ms := newArray(t, spec, 3, 8*mib)
		ms[1].b[8192] = 'X'
		in, _ := Inspect(asMembers(ms...), InspectOptions{})
		wantStatus(t, in, StatusInSync, StatusInSync, StatusInSync)
		if in.Members[1].BitmapErr == nil || in.Members[0].BitmapErr != nil || len(in.Members[0].Bitmap) != 1 || in.Info.BitmapChunk != 64<<20 {
			t.Errorf("bitmap errors %v %v", in.Members[0].BitmapErr, in.Members[1].BitmapErr)
		}
	})
	t.Run("raid10 copies", func(t *testing.T) {
		_, ms := newArray(t, CreateSpec{Level: 10, RaidDevices: 4, ChunkSize: 64 << 10}, 4, 8*mib)
		in, _ := Inspect([]Member{nil, ms[1], nil, ms[3]}, InspectOptions{})
		if !in.Startable || !in.Degraded || in.InSync != 2 {
			t.Errorf("one copy of each pair: %+v", in)
		}
		in, _ = Inspect([]Member{nil, nil, ms[2], ms[3]}, InspectOptions{})
		if in.Startable || !strings.Contains(in.Reason, "some raid10 chunk has no in-sync copy") {
			t.Errorf("both copies of a pair missing: startable %v, %q", in.Startable, in.Reason)
		}
	})
	if _, err := Inspect(nil, InspectOptions{}); err == nil {
		t.Error("empty member list accepted")
	}
}

func TestEnough(t *testing.T) {
	set := func(s string) func(int) bool { return func(i int) bool { return s[i] == 'U' } }
	cases := []struct {
		level  int32
		layout uint32
		state  string
		want   bool
	}{
		{1, 0, "U_", true}, {1, 0, "__", false}, {1, 0, "__U", true},
		{10, 0x102, "UUUU", true}, {10, 0x102, "_U_U", true}, {10, 0x102, "__UU", false}, {10, 0x102, "UU__", false},
		{10, 0x102, "U_U", true}, {10, 0x102, "U__", false}, // 3 devices near=2: windows 0-1, 2-0, 1-2
		{10, 0x201, "U_U", true}, {10, 0x201, "UU_", true}, {10, 0x201, "U__", false}, // far=2 over 3: every adjacent pair
		{10, 0x10201, "_U", true}, {10, 0x103, "__U", true}, {10, 0x103, "___", false},
		{5, 0, "UUU", false}, {10, 0, "UU", false},
	}
	for _, c := range cases {
		if got := Enough(c.level, c.layout, len(c.state), set(c.state)); got != c.want {
			t.Errorf("Enough(%d, %#x, %s) = %v", c.level, c.layout, c.state, got)
		}
	}
	if Enough(1, 0, 0, nil) {
		t.Error("no raid disks")
	}
}

// TestUpdatesSeenByRealMdadm drives a raid1 with an internal bitmap and a
// spare through fail, remove, add, rebuild and re-add, writing every
// change with WriteAll, and checks after each step that real mdadm -E (and
// -X) read the members and show the change, and that our examine prints
// the same.
func TestUpdatesSeenByRealMdadm(t *testing.T) {
	needMdadm(t)
	host, _ := os.Hostname()
	dir := t.TempDir()
	var files []*FileMember
	var paths []string
	for i := 0; i < 4; i++ {
		m, p := imageFile(t, dir, fmt.Sprintf("u%d.img", i), 64*mib)
		files, paths = append(files, m), append(paths, p)
	}
	c, err := Create(CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapInternal, Name: "upd", Homehost: "h"}, asMembers(files[0], files[1], files[2]))
	if err != nil {
		t.Fatal(err)
	}
	devs := c.Devices
	shared := c.Shared
	step := 0
	write := func(s *superblock.Superblock, idx ...int) {
		t.Helper()
		step++
		s = BumpEvents(s, time.Unix(int64(1_800_000_000+step), 0))
		var ds []Device
		for _, i := range idx {
			ds = append(ds, devs[i])
		}
		out, err := WriteAll(s, ds)
		if err != nil {
			t.Fatal(err)
		}
		for k, i := range idx {
			if out[k] != nil {
				devs[i].Super = out[k]
			}
		}
		shared = s
	}
	check := func(i int, want map[string]string) {
		t.Helper()
		out, errOut, x := realMdadm(t, "-E", paths[i])
		if x != 0 {
			t.Fatalf("step %d: mdadm -E %s: %s", step, paths[i], errOut)
		}
		if ours := examineOurs(t, paths[i], host); ours != out {
			t.Errorf("step %d member %d: examine differs\nours:\n%s\nmdadm:\n%s", step, i, ours, out)
		}
		f := mdadmFields(out)
		for k, v := range want {
			if f[k] != v {
				t.Errorf("step %d member %d: %s = %q, want %q", step, i, k, f[k], v)
			}
		}
	}

	// 1. Fail member 1: written to 0 and the spare, not to 1.
	s, err := Fail(shared, 1)
	if err != nil {
		t.Fatal(err)
	}
	write(s, 0, 1, 2)
	check(0, map[string]string{"Events": "1", "Array State": "A. ('A' == active, '.' == missing, 'R' == replacing)", "Device Role": "Active device 0"})
	check(1, map[string]string{"Events": "0", "Array State": "AA ('A' == active, '.' == missing, 'R' == replacing)"})
	check(2, map[string]string{"Events": "1", "Device Role": "spare", "Array State": "A. ('A' == active, '.' == missing, 'R' == replacing)"})
	loop := attachLoop(t, paths[0], false)
	xo, _, _ := realMdadm(t, "-X", loop)
	if f := mdadmFields(xo); f["Events"] != "1" {
		t.Errorf("bitmap events after fail: %q", f["Events"])
	}
	if _, err := Fail(shared, 1); err == nil {
		t.Error("failing a faulty device twice accepted")
	}
	if _, err := Remove(shared, 0); err == nil || !strings.Contains(err.Error(), "Device or resource busy") {
		t.Errorf("removing an active device: %v", err)
	}

	// 2. Remove it, rebuild onto the spare (recovery offset), finish.
	s, _ = Remove(shared, 1)
	write(s, 0, 2)
	s, err = Activate(shared, 2, 1)
	if err != nil {
		t.Fatal(err)
	}
	devs[2].Super = Recovering(devs[2].Super, 0, false)
	write(s, 0, 2)
	check(2, map[string]string{"Feature Map": "0x3", "Recovery Offset": "0 sectors", "Device Role": "Active device 1",
		"Array State": "AA ('A' == active, '.' == missing, 'R' == replacing)", "Events": "3"})
	devs[2].Super = InSync(devs[2].Super)
	write(shared, 0, 2)
	check(2, map[string]string{"Feature Map": "0x1", "Recovery Offset": "", "Device Role": "Active device 1"})

	// 3. Add a new member as a spare.
	s, dev, err := AddSpare(shared, []uint32{0, 2})
	if err != nil || dev != 2+1 && dev != 3 {
		t.Fatalf("add spare: dev %d, %v", dev, err)
	}
	nd, err := NewDevice(s, devs[0].Super, dev, files[3], &counterRand{n: 200})
	if err != nil {
		t.Fatal(err)
	}
	if err := CopyBitmap(s, files[0], files[3]); err != nil {
		t.Fatal(err)
	}
	devs = append(devs, Device{Member: files[3], Super: nd})
	write(s, 0, 2, 3)
	check(3, map[string]string{"Device Role": "spare", "Array UUID": bitmap.FormatUUID(c.Info.UUID), "Events": "5", "Feature Map": "0x1",
		"Bad Block Log": "512 entries available at offset 16 sectors", "Data Offset": "2048 sectors"})
	small := newMem("small", 32*mib)
	if _, err := NewDevice(s, devs[0].Super, dev, small, nil); err == nil || !strings.Contains(err.Error(), "small not large enough to join array") {
		t.Errorf("small new member: %v", err)
	}

	// 4. Fail the rebuilt member and re-add the original member 1 from
	// its old superblock: back into slot 1 with a bitmap-based recovery.
	s, _ = Fail(shared, 2)
	write(s, 0, 3)
	s, _ = Remove(shared, 2)
	write(s, 0, 3)
	s, err = ReAdd(shared, devs[1].Super)
	if err != nil {
		t.Fatal(err)
	}
	devs[1].Super = Recovering(devs[1].Super, 0, true)
	write(s, 0, 1, 3)
	check(1, map[string]string{"Feature Map": "0x83", "Device Role": "Active device 1", "Events": "8"})
	check(0, map[string]string{"Array State": "AA ('A' == active, '.' == missing, 'R' == replacing)"})

	// Inspect agrees: 0 in sync, 1 recovering, 2 stale-faulty, 3 spare.
	in, _ := Inspect(asMembers(files...), InspectOptions{})
	wantStatus(t, in, StatusInSync, StatusRecovering, StatusStale, StatusSpare)
	if in.Info.Events != 8 {
		t.Errorf("events %d", in.Info.Events)
	}
}

// TestUpdateHelpersArePure: the helpers never modify their argument, and
// refuse what md refuses.
func TestUpdateHelpersArePure(t *testing.T) {
	c, _ := newArray(t, CreateSpec{Level: 1, RaidDevices: 2}, 3, 8*mib)
	orig := clone(c.Shared)
	same := func(what string) {
		t.Helper()
		if fmt.Sprint(*orig) != fmt.Sprint(*c.Shared) {
			t.Errorf("%s modified its argument", what)
		}
	}
	Fail(c.Shared, 0)
	same("Fail")
	Remove(c.Shared, 2)
	same("Remove")
	AddSpare(c.Shared, []uint32{0, 1, 2})
	same("AddSpare")
	BumpEvents(c.Shared, time.Now())
	same("BumpEvents")
	Recovering(c.Devices[0].Super, 5, true)
	InSync(c.Devices[0].Super)
	Compose(c.Shared, c.Devices[1].Super)
	same("Compose")

	if _, err := Activate(c.Shared, 2, 0); err == nil || !strings.Contains(err.Error(), "slot 0 is held by device 0") {
		t.Errorf("activate into a held slot: %v", err)
	}
	if _, err := Activate(c.Shared, 2, 5); err == nil {
		t.Error("activate into slot 5 of 2")
	}
	if _, err := Activate(c.Shared, 0, 1); err == nil {
		t.Error("activate an active device")
	}
	if _, err := Fail(c.Shared, 500); err == nil {
		t.Error("fail device 500")
	}
	// AddSpare skips numbers in use and faulty entries, and grows max_dev.
	s, _ := Fail(c.Shared, 1)
	s.DevRoles[3] = superblock.RoleFaulty
	if _, dev, _ := AddSpare(s, []uint32{0, 1, 2}); dev != 4 {
		t.Errorf("AddSpare chose %d, want 4", dev)
	}
	small := clone(c.Shared)
	small.DevRoles, small.MaxDev = small.DevRoles[:3], 3
	s, dev, err := AddSpare(small, []uint32{0, 1, 2})
	if err != nil || dev != 3 || s.MaxDev != 4 || len(s.DevRoles) != 4 || s.DevRoles[3] != superblock.RoleSpare {
		t.Errorf("grow: dev %d maxdev %d %v", dev, s.MaxDev, err)
	}
	// ReAdd needs a device that held a slot, of this array.
	if _, err := ReAdd(c.Shared, c.Devices[2].Super); err == nil || !strings.Contains(err.Error(), "held no slot") {
		t.Errorf("re-add of a spare: %v", err)
	}
	// Compose keeps per-device fields and takes everything else.
	d := Recovering(c.Devices[1].Super, 77, true)
	d.DevFlags, d.Events, d.DevRoles[0] = superblock.DevFlagWriteMostly, 999, 1234
	got := Compose(BumpEvents(c.Shared, time.Unix(1_900_000_000, 0)), d)
	if got.DevNumber != 1 || got.DeviceUUID != d.DeviceUUID || got.RecoveryOffset != 77 || got.DevFlags != superblock.DevFlagWriteMostly ||
		got.FeatureMap != superblock.FeatureRecoveryOffset|superblock.FeatureRecoveryBitmap || got.Events != 1 || got.DevRoles[0] != 0 ||
		got.UTime != 1_900_000_000 || !got.ChecksumOK() {
		t.Errorf("compose: %+v", got)
	}
}

// TestWriteAllChecksFirst: a device of another array makes WriteAll write
// nothing at all; a failing device is reported while the others are
// written.
func TestWriteAllChecksFirst(t *testing.T) {
	c, ms := newArray(t, CreateSpec{Level: 1, RaidDevices: 2}, 2, 8*mib)
	o, _ := newArray(t, CreateSpec{Level: 1, RaidDevices: 2, Rand: &counterRand{n: 50}}, 2, 8*mib)
	before := ms[0].writes
	s := BumpEvents(c.Shared, time.Now())
	if _, err := WriteAll(s, []Device{c.Devices[0], o.Devices[1]}); err == nil {
		t.Fatal("foreign device accepted")
	}
	if ms[0].writes != before {
		t.Fatal("wrote before checking every device")
	}
	ms[1].failWriteAt = 1
	out, err := WriteAll(s, c.Devices)
	var we *WriteError
	if !errors.As(err, &we) || len(we.Failed) != 1 || we.Failed[0] != "m1" || out[0] == nil || out[1] != nil {
		t.Fatalf("%v %v", err, out)
	}
	sb, _ := superblock.ReadAt(ms[0], superblock.V12Offset)
	if sb.Events != 1 || !sb.ChecksumOK() {
		t.Errorf("m0 not written: events %d", sb.Events)
	}
}

// TestReplayCharlie rebuilds the charlie fixture's history with the update
// helpers (create with a spare, member 1 fails, the spare is rebuilt into
// slot 1) and compares the result with what real mdadm and md wrote, every
// metadata byte except events, update time and checksum. The failed
// member, which md stopped writing, must equal our freshly created member.
func TestReplayCharlie(t *testing.T) {
	spec := CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapNone, AssumeClean: true, Name: "charlie", Homehost: "(none)"}
	c, ours, theirs := fixtureCreate(t, spec, []string{"raid1-charlie-0", "raid1-charlie-1-faulty", "raid1-charlie-2-spare"})
	s, err := Fail(c.Shared, 1)
	if err != nil {
		t.Fatal(err)
	}
	s = BumpEvents(s, time.Now())
	if _, err := WriteAll(s, c.Devices); err != nil {
		t.Fatal(err)
	}
	s, err = Activate(s, 2, 1)
	if err != nil {
		t.Fatal(err)
	}
	s = BumpEvents(s, time.Now())
	if _, err := WriteAll(s, c.Devices); err != nil {
		t.Fatal(err)
	}
	for i := range ours {
		compareWithFixture(t, ours[i], theirs[i], kernelMask{})
	}
	m, _ := OpenFile(ours[1], false)
	defer m.Close()
	if sb, _ := superblock.ReadAt(m, superblock.V12Offset); sb.Events != 0 {
		t.Errorf("the failed member was written: events %d", sb.Events)
	}
}

// FuzzInspect feeds damaged metadata to Inspect: a patch of fuzz bytes is
// written over the superblock, role table or bitmap of one member of a
// clustered raid1 with a spare. Inspect must not panic, must not allocate
// beyond reason, and its result must be self-consistent.
func FuzzInspect(f *testing.F) {
	base := make([][]byte, 3)
	{
		var ms []Member
		var mems []*memMember
		for i := range base {
			m := newMem(fmt.Sprintf("f%d", i), mib+128<<10)
			ms, mems = append(ms, m), append(mems, m)
		}
		if _, err := Create(CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapClustered, ClusterName: "fz", Name: "fz",
			Rand: &counterRand{}, Now: fixedNow(1_800_000_000)}, ms); err != nil {
			f.Fatal(err)
		}
		for i, m := range mems {
			base[i] = m.b
		}
	}
	f.Add(uint8(0), uint16(0), []byte{0})
	f.Add(uint8(1), uint16(200), []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff})     // events
	f.Add(uint8(2), uint16(220), []byte{0x80, 0x07, 0, 0})                                   // max_dev
	f.Add(uint8(0), uint16(4096+68), []byte{0x40, 0, 0, 0})                                  // bitmap nodes
	f.Add(uint8(1), uint16(4096+40), []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f}) // sync size
	f.Add(uint8(2), uint16(256), []byte{0, 0, 1, 0, 1, 0})                                   // roles
	f.Fuzz(func(t *testing.T, which uint8, off uint16, patch []byte) {
		if len(patch) > 512 {
			patch = patch[:512]
		}
		var ms []Member
		for i := range base {
			m := &memMember{name: fmt.Sprintf("f%d", i), b: append([]byte(nil), base[i][:]...)}
			if i == int(which)%len(base) {
				at := 4096 + int(off)%(3*4096)
				copy(m.b[at:], patch)
			}
			ms = append(ms, m)
		}
		in, err := Inspect(ms, InspectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if len(in.Members) != 3 {
			t.Fatal("member count")
		}
		insync := 0
		for s, mi := range in.Slots {
			if mi < 0 {
				continue
			}
			insync++
			r := in.Members[mi]
			if r.Status != StatusInSync || r.Slot != s || r.Super == nil {
				t.Fatalf("slot %d -> member %d %+v", s, mi, r)
			}
		}
		if insync != in.InSync || (in.Startable && in.InSync == 0) || (in.Info == nil) != (in.Freshest < 0) {
			t.Fatalf("inconsistent: %+v", in)
		}
		for _, r := range in.Members {
			if r.Status.Used() && r.Super == nil {
				t.Fatalf("used member without superblock: %+v", r)
			}
			if r.Status != StatusInSync && r.Status != StatusSpare && r.Reason == "" {
				t.Fatalf("status %s without a reason", r.Status)
			}
		}
	})
}

// TestFileMemberBlockDevice: on loop devices, OpenFile sizes the device
// with BLKGETSIZE64, claims it exclusively for writing, and Create writes
// an array real mdadm reads from the block device.
func TestFileMemberBlockDevice(t *testing.T) {
	dir := t.TempDir()
	var loops []string
	for i := 0; i < 2; i++ {
		_, p := imageFile(t, dir, fmt.Sprintf("b%d.img", i), 48*mib)
		loops = append(loops, attachLoop(t, p, true))
	}
	var ms []Member
	for _, l := range loops {
		m, err := OpenFile(l, true)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Close()
		if n, err := m.Size(); err != nil || n != 48*mib || !m.BlockDevice() {
			t.Fatalf("%s: size %d, %v, block %v", l, n, err, m.BlockDevice())
		}
		ms = append(ms, m)
	}
	// A second writable open of a claimed block device is refused.
	if m, err := OpenFile(loops[0], true); err == nil {
		m.Close()
		t.Error("second exclusive open of a block device succeeded")
	}
	c, err := Create(CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapInternal, Name: "blk"}, ms)
	if err != nil {
		t.Fatal(err)
	}
	out, errOut, x := realMdadm(t, "-E", loops[1])
	if f := mdadmFields(out); x != 0 || f["Array UUID"] != bitmap.FormatUUID(c.Info.UUID) || f["Device Role"] != "Active device 1" {
		t.Errorf("mdadm -E %s: exit %d %s\n%s", loops[1], x, errOut, out)
	}
	in, _ := Inspect(ms, InspectOptions{})
	wantStatus(t, in, StatusInSync, StatusInSync)
}

func TestOpenFileRefusesNonDevices(t *testing.T) {
	dir := t.TempDir()
	if _, err := OpenFile(dir, false); err == nil || !strings.Contains(err.Error(), "not a regular file or block device") {
		t.Errorf("directory: %v", err)
	}
	if _, err := OpenFile("/dev/null", true); err == nil || !strings.Contains(err.Error(), "not a regular file or block device") {
		t.Errorf("character device: %v", err)
	}
	if _, err := OpenFile(dir+"/nope", false); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	m, p := imageFile(t, dir, "f.img", 4*mib)
	if n, err := m.Size(); err != nil || n != 4*mib || m.BlockDevice() || m.Name() != p {
		t.Errorf("file member: %d %v", n, err)
	}
	ro, err := OpenFile(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if _, err := ro.WriteAt([]byte{1}, 0); err == nil {
		t.Error("read-only member accepted a write")
	}
}

// TestDirectIOUnaligned drives directIO (a block device member's O_DIRECT
// path) with reads and writes at any offset and length against a model:
// seeded, replay with the seed printed. A regular file on a disk file
// system takes O_DIRECT too, so no block device is needed; the test skips
// where the temporary directory refuses O_DIRECT (tmpfs).
func TestDirectIOUnaligned(t *testing.T) {
	seed := time.Now().UnixNano()
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewSource(seed))
	const size = 64 << 10
	for _, bs := range []int64{512, 4096} {
		path := filepath.Join(t.TempDir(), "dev")
		if err := os.WriteFile(path, make([]byte, size), 0o644); err != nil {
			t.Fatal(err)
		}
		f, err := os.OpenFile(path, os.O_RDWR|unix.O_DIRECT, 0)
		if err != nil {
			t.Skipf("O_DIRECT refused here: %v", err)
		}
		d := &directIO{f: f, bs: bs}
		model := make([]byte, size)
		for i := 0; i < 400; i++ {
			off := rng.Int63n(size)
			n := 1 + rng.Intn(int(min(size-off, 3*bs)))
			if rng.Intn(2) == 0 {
				p := make([]byte, n)
				rng.Read(p)
				if k, err := d.WriteAt(p, off); err != nil || k != n {
					t.Fatalf("bs %d: write %d at %d: %d, %v", bs, n, off, k, err)
				}
				copy(model[off:], p)
				continue
			}
			p := make([]byte, n)
			if k, err := d.ReadAt(p, off); err != nil || k != n {
				t.Fatalf("bs %d: read %d at %d: %d, %v", bs, n, off, k, err)
			}
			if !bytes.Equal(p, model[off:off+int64(n)]) {
				t.Fatalf("bs %d: read %d at %d differs from what was written (seed %d)", bs, n, off, seed)
			}
		}
		// Past the end: short, io.EOF.
		p := make([]byte, 100)
		if k, err := d.ReadAt(p, size-40); k != 40 || err != io.EOF {
			t.Fatalf("bs %d: read across the end: %d, %v; want 40, EOF", bs, k, err)
		}
		if !bytes.Equal(p[:40], model[size-40:]) {
			t.Fatalf("bs %d: the last 40 bytes differ", bs)
		}
		// What the buffered file sees is the model (the writes reached the file).
		f.Close()
		got, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("bs %d: the file differs from the model", bs)
		}
	}
}
