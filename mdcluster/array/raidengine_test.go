package array

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// engineMembers makes n in-sync in-memory members of devSectors data
// sectors after a 1 MiB data offset.
func engineMembers(n int, devSectors uint64) ([]*memMember, []EngineMember) {
	var mems []*memMember
	var ems []EngineMember
	for i := range n {
		m := newMem(fmt.Sprintf("m%d", i), 1<<20+int64(devSectors)*512)
		mems = append(mems, m)
		ems = append(ems, EngineMember{Dev: uint32(i), Slot: i, State: MemberInSync, Member: m, DataOffset: 2048})
	}
	return mems, ems
}

// dataOf returns member m's data area.
func dataOf(m *memMember) []byte { return m.snapshot()[1<<20:] }

// TestRAIDEngineWindowsAndSync: a resync levels the members, a remote
// window holds writes into it (and returns only once those in flight are
// done), a failed member gets no more writes, and Stop fails later I/O.
func TestRAIDEngineWindowsAndSync(t *testing.T) {
	mems, ems := engineMembers(2, 2048)
	e := NewRAIDEngine(RAIDEngineConfig{ResyncIOSize: 64 << 10})
	ctx := context.Background()
	if err := e.Start(ctx, EngineSetup{Level: superblock.LevelRAID1, RaidDisks: 2, DevSectors: 2048, Members: ems}); err != nil {
		t.Fatal(err)
	}
	defer e.Stop()
	a, b := mems[0], mems[1]
	if _, err := b.WriteAt(bytes.Repeat([]byte{7}, 1<<20), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := e.Sync(ctx, SyncRequest{Kind: SyncResync, Lo: 0, Hi: 2048, Targets: []uint32{1}}); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dataOf(a), dataOf(b)) {
		t.Fatal("members differ after a resync")
	}
	if err := e.SetRemoteWindow(ctx, Window{Lo: 0, Hi: 128}); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteAt(bytes.Repeat([]byte{1}, 4096), 128*512, 0); err != nil {
		t.Fatalf("a write outside the window: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- e.WriteAt(bytes.Repeat([]byte{2}, 512), 512, 0) }()
	select {
	case err := <-done:
		t.Fatalf("a write into the remote window went through: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	if err := e.SetRemoteWindow(ctx, Window{}); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("a write waiting for the window to move: %v", err)
	}
	if err := e.FailMember(1); err != nil {
		t.Fatal(err)
	}
	before := b.snapshot()
	if err := e.WriteAt(bytes.Repeat([]byte{3}, 4096), 0, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(before, b.snapshot()) {
		t.Fatal("a write reached a failed member")
	}
	buf := make([]byte, 4096)
	if _, err := e.ReadAt(buf, 0); err != nil || buf[0] != 3 {
		t.Fatalf("read %v, %d", err, buf[0])
	}
	if err := e.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := e.WriteAt(buf, 0, 0); !errors.Is(err, ErrEngineStopped) || !errors.Is(err, nbd.ErrShutdown) {
		t.Fatalf("write after stop: %v", err)
	}
}

// fakeIntent records StartWrite/EndWrite and checks that no data reaches a
// member before its StartWrite.
type fakeIntent struct {
	mu      sync.Mutex
	started int
	ended   int
}

func (f *fakeIntent) StartWrite(off, n int64) error {
	f.mu.Lock()
	f.started++
	f.mu.Unlock()
	return nil
}
func (f *fakeIntent) EndWrite(off, n int64, now time.Duration) { f.mu.Lock(); f.ended++; f.mu.Unlock() }
func (f *fakeIntent) Tick(now time.Duration) (int, error)      { return 0, nil }

// TestRAIDEngineRAID10SpareRecovery runs raid10 (n2, f2, o2 over four
// members): writes with a write-intent bitmap, one member fails, writes go
// on degraded, the member is removed and a blank spare is activated into
// its slot and rebuilt through Sync (recovery), then marked in sync; with
// its partner failed the array must still read back every byte written,
// which holds only if the recovery wrote the spare's copies where raid10
// keeps them.
func TestRAIDEngineRAID10SpareRecovery(t *testing.T) {
	for _, tc := range []struct {
		name   string
		layout uint32
	}{{"n2", 0x102}, {"f2", 0x201}, {"o2", 0x10201}} {
		t.Run(tc.name, func(t *testing.T) {
			seed := uint64(time.Now().UnixNano())
			if v := os.Getenv("RAID_ENGINE_SEED"); v != "" {
				seed, _ = strconv.ParseUint(v, 10, 64)
			}
			t.Logf("seed %d (replay: RAID_ENGINE_SEED=%d)", seed, seed)
			rng := rand.New(rand.NewPCG(seed, 1))
			const devSectors = 4096 // 2 MiB per member
			mems, ems := engineMembers(4, devSectors)
			in := &fakeIntent{}
			e := NewRAIDEngine(RAIDEngineConfig{ResyncIOSize: 64 << 10})
			ctx := context.Background()
			setup := EngineSetup{Level: superblock.LevelRAID10, Layout: tc.layout, ChunkSectors: 128, RaidDisks: 4,
				DevSectors: devSectors, Members: ems, Intent: in, BitmapChunkBytes: 64 << 10}
			if err := e.Start(ctx, setup); err != nil {
				t.Fatal(err)
			}
			defer e.Stop()
			size := e.Size()
			if want := int64(arraySectors(superblock.LevelRAID10, tc.layout, 128, 4, devSectors)) * 512; size != want {
				t.Fatalf("array size %d, want %d", size, want)
			}
			model := make([]byte, size)
			var rmu sync.Mutex
			write := func(n int) error {
				for range n {
					rmu.Lock()
					off := rng.Int64N(size/4096) * 4096
					l := min(int64(1+rng.IntN(16))*4096, size-off)
					p := make([]byte, l)
					for i := range p {
						p[i] = byte(rng.Uint32())
					}
					rmu.Unlock()
					if err := e.WriteAt(p, off, 0); err != nil {
						return err
					}
					copy(model[off:], p) // one writer at a time
				}
				return nil
			}
			if err := write(40); err != nil {
				t.Fatal(err)
			}
			if err := e.FailMember(1); err != nil {
				t.Fatal(err)
			}
			if err := write(40); err != nil {
				t.Fatal(err)
			}
			if err := e.RemoveMember(1); err != nil {
				t.Fatal(err)
			}
			spare := newMem("spare", 1<<20+devSectors*512)
			sp := EngineMember{Dev: 9, Slot: -1, State: MemberSpare, Member: spare, DataOffset: 2048}
			if err := e.SetMember(sp); err != nil {
				t.Fatal(err)
			}
			sp.Slot, sp.State = 1, MemberRecovering
			if err := e.SetMember(sp); err != nil {
				t.Fatal(err)
			}
			// Writes during the recovery reach the spare too.
			werr := make(chan error, 1)
			go func() { werr <- write(30) }()
			arr := uint64(size / 512)
			for lo := uint64(0); lo < arr; lo += 1024 {
				if err := e.Sync(ctx, SyncRequest{Kind: SyncRecovery, Lo: lo, Hi: min(lo+1024, arr), Targets: []uint32{9}}); err != nil {
					t.Fatal(err)
				}
			}
			if err := <-werr; err != nil {
				t.Fatal(err)
			}
			sp.State = MemberInSync
			if err := e.SetMember(sp); err != nil {
				t.Fatal(err)
			}
			if in.started == 0 || in.started != in.ended {
				t.Fatalf("write intent: %d started, %d ended", in.started, in.ended)
			}
			// Fail the members whose copies pair with slot 1 (raid10
			// survives while each block keeps one copy): with n2 slot 0;
			// for f2/o2 the far copies of slot 1's blocks sit on slot 2
			// and slot 1 holds slot 0's far copies, so fail 0 and 2 in
			// turn, checking the data each time.
			for _, victim := range []uint32{0, 2} {
				if err := e.FailMember(victim); err != nil {
					t.Logf("fail %d refused (%v): it holds the last copy of something", victim, err)
					continue
				}
				got := make([]byte, size)
				if _, err := e.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, model) {
					t.Fatalf("with device %d failed the array does not read back what was written: the recovery missed copies", victim)
				}
				break
			}
			_ = mems
		})
	}
}

// TestRAIDEngineMemberErrorGoesThroughManager: a write error fails the
// member in the engine at once (later writes skip it), reports it through
// OnMemberError, and the write that saw it is acknowledged only once the
// manager has applied the fail (FailMember).
func TestRAIDEngineMemberErrorGoesThroughManager(t *testing.T) {
	mems, ems := engineMembers(2, 2048)
	reported := make(chan uint32, 4)
	e := NewRAIDEngine(RAIDEngineConfig{})
	ctx := context.Background()
	if err := e.Start(ctx, EngineSetup{Level: superblock.LevelRAID1, RaidDisks: 2, DevSectors: 2048, Members: ems,
		OnMemberError: func(dev uint32, err error) { reported <- dev }}); err != nil {
		t.Fatal(err)
	}
	defer e.Stop()
	mems[1].mu.Lock()
	mems[1].failWriteAt = 1 << 20 // every data write
	mems[1].mu.Unlock()
	done := make(chan error, 1)
	go func() { done <- e.WriteAt(bytes.Repeat([]byte{5}, 4096), 0, 0) }()
	select {
	case dev := <-reported:
		if dev != 1 {
			t.Fatalf("reported device %d, want 1", dev)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the member error was not reported")
	}
	select {
	case err := <-done:
		t.Fatalf("the write that failed a member was acknowledged before the manager recorded the failure: %v", err)
	case <-time.After(100 * time.Millisecond):
	}
	if err := e.FailMember(1); err != nil { // the manager's cluster-wide fail, applied here
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("the write: %v", err)
	}
	mems[1].mu.Lock()
	w := mems[1].writes
	mems[1].mu.Unlock()
	if err := e.WriteAt(bytes.Repeat([]byte{6}, 4096), 8192, 0); err != nil {
		t.Fatal(err)
	}
	mems[1].mu.Lock()
	defer mems[1].mu.Unlock()
	if mems[1].writes != w {
		t.Fatal("a write went to the failed member")
	}
	if got := e.Members(); got[1].State != MemberFaulty {
		t.Fatalf("members %+v", got)
	}
}
