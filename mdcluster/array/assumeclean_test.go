package array

import (
	"context"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/store"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// syncCounter is a RAIDEngine that counts the Sync requests it gets.
type syncCounter struct {
	*RAIDEngine
	syncs atomic.Int64
}

func (s *syncCounter) Sync(ctx context.Context, req SyncRequest) error {
	s.syncs.Add(1)
	return s.RAIDEngine.Sync(ctx, req)
}

// standaloneImages makes empty member images of imgSize bytes in a new
// directory.
func standaloneImages(t *testing.T, names ...string) (dir string, paths []string) {
	t.Helper()
	dir = t.TempDir()
	for _, n := range names {
		p := filepath.Join(dir, n)
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, imgSize); err != nil {
			t.Fatal(err)
		}
		paths = append(paths, p)
	}
	return dir, paths
}

// standaloneManager is a manager without a cluster (node-local arrays) over
// the devices glob matches.
func standaloneManager(t *testing.T, kv store.Store, eng Engine, glob string) *Manager {
	t.Helper()
	m, err := New(Config{Store: kv, Devices: []string{glob}, Engine: eng, Logger: testLog(t),
		ResyncRetry: 50 * time.Millisecond, ResyncWindow: testWindow, DaemonSleep: 100 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestAssumeCleanInternalNoResync: an array created here with an internal
// bitmap and --assume-clean starts without any resync, and its bitmap is
// clean on disk; without --assume-clean it resyncs in full. (Create writes
// slot 0 all dirty, as mdadm does; an engine that took those bits at face
// value would resync the --assume-clean array in full, too.)
func TestAssumeCleanInternalNoResync(t *testing.T) {
	for _, clean := range []bool{true, false} {
		name := map[bool]string{true: "assume-clean", false: "resync"}[clean]
		t.Run(name, func(t *testing.T) {
			dir, paths := standaloneImages(t, "a.img", "b.img")
			eng := &syncCounter{RAIDEngine: NewRAIDEngine(RAIDEngineConfig{TickInterval: 50 * time.Millisecond, ResyncIOSize: copyStep, Logger: testLog(t)})}
			m := standaloneManager(t, store.NewMem(), eng, filepath.Join(dir, "*.img"))
			ctx, cancel := context.WithTimeout(context.Background(), guard)
			defer cancel()
			c, err := m.Create(ctx, CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapInternal, BitmapChunk: testBitmapChunk,
				Name: "md0", AssumeClean: clean}, paths)
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = m.Stop(context.Background()) }()
			if !clean {
				eventually(t, guard, func() bool { return m.Status().Clean }, "the initial resync to finish")
				if eng.syncs.Load() == 0 {
					t.Fatal("an array created without --assume-clean was not resynced")
				}
				return
			}
			// Give a wrongly started resync time to show.
			time.Sleep(500 * time.Millisecond)
			if n := eng.syncs.Load(); n != 0 {
				t.Fatalf("%d resync requests for an array created with --assume-clean", n)
			}
			for _, d := range c.Devices {
				sl, err := bitmap.ReadSlot(d.Member, c.BitmapLayout, 0)
				if err != nil {
					t.Fatal(err)
				}
				if dirty := sl.DirtyChunks(); len(dirty) != 0 {
					t.Fatalf("%s: %d chunks dirty in the bitmap of a new --assume-clean array", d.Member.Name(), len(dirty))
				}
			}
		})
	}
}

// TestStandaloneAssembleFailsMissingMember: a node-local array assembled
// without one of its working members runs degraded and records that
// member as faulty, as md does, so that when the member shows up again
// (with the data it had before, missing every write since) it is not
// taken as a current mirror.
func TestStandaloneAssembleFailsMissingMember(t *testing.T) {
	dir, paths := standaloneImages(t, "a.img", "b.img")
	kv := store.NewMem()
	newManager := func(glob string) *Manager {
		eng := NewRAIDEngine(RAIDEngineConfig{TickInterval: 50 * time.Millisecond, ResyncIOSize: copyStep, Logger: testLog(t)})
		return standaloneManager(t, kv, eng, filepath.Join(dir, glob))
	}
	ctx, cancel := context.WithTimeout(context.Background(), guard)
	defer cancel()
	m := newManager("*.img")
	if _, err := m.Create(ctx, CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapInternal, BitmapChunk: testBitmapChunk,
		Name: "md0", AssumeClean: true}, paths); err != nil {
		t.Fatal(err)
	}
	if err := m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	// b.img is not there at the next start.
	m = newManager("a.img")
	if err := m.Assemble(ctx); err != nil {
		t.Fatalf("degraded assemble: %v", err)
	}
	if ms := m.Members(); len(ms) != 1 || ms[0].Dev != 0 {
		t.Fatalf("running with %v, want device 0 alone", ms)
	}
	sb := readSuperOf(mustOpen(t, paths[0]))
	if sb.DevRoles[1] != superblock.RoleFaulty {
		t.Fatalf("a.img gives the missing device role %#x, want faulty", sb.DevRoles[1])
	}
	if err := m.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	// b.img is back: it is not used as a mirror.
	m = newManager("*.img")
	if err := m.Assemble(ctx); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = m.Stop(context.Background()) }()
	for _, ms := range m.Members() {
		if ms.Dev == 1 && (ms.State == MemberInSync || ms.State == MemberRecovering) {
			t.Fatalf("the member missed at the last start is used again as %s", ms.State)
		}
	}
}
