package array

import (
	"errors"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// TestConvertBitmapClusteredToInternal switches a clustered bitmap to an
// internal one on stopped members: the superblocks lose the clustered
// feature, the bitmap becomes one slot, and chunks dirty in any old slot
// are dirty in it, so md resyncs them after it assembles the array.
func TestConvertBitmapClusteredToInternal(t *testing.T) {
	dir := t.TempDir()
	a, _ := imageFile(t, dir, "a.img", imgSize)
	b, _ := imageFile(t, dir, "b.img", imgSize)
	ms := asMembers(a, b)
	spec := CreateSpec{Level: 1, RaidDevices: 2, Bitmap: BitmapClustered, BitmapChunk: testBitmapChunk, Nodes: 4,
		ClusterName: "test", Name: "md0", AssumeClean: true, Now: fixedNow(1000)}
	c, err := Create(spec, ms)
	if err != nil {
		t.Fatal(err)
	}
	// Every slot clean but chunk 3 in slot 0 (on a only) and chunk 9 in
	// slot 2 (on b only): whichever member carries a bit, it must survive.
	for _, m := range ms {
		for slot := 0; slot < c.BitmapLayout.Slots; slot++ {
			s, err := bitmap.ReadSlot(m, c.BitmapLayout, slot)
			if err != nil {
				t.Fatal(err)
			}
			for _, ch := range s.DirtyChunks() {
				s.Clear(ch)
			}
			if err := bitmap.WriteSlot(m, c.BitmapLayout, slot, s); err != nil {
				t.Fatal(err)
			}
		}
	}
	dirty := func(m Member, slot int, chunk uint64) {
		s, err := bitmap.ReadSlot(m, c.BitmapLayout, slot)
		if err != nil {
			t.Fatal(err)
		}
		s.Set(chunk)
		if err := bitmap.WriteSlot(m, c.BitmapLayout, slot, s); err != nil {
			t.Fatal(err)
		}
	}
	dirty(a, 0, 3)
	dirty(b, 2, 9)

	if err := ConvertBitmap(ms, BitmapSpec{Mode: BitmapInternal, Nodes: 3}, time.Unix(2000, 0), nil); !errors.Is(err, ErrRefusedChange) {
		t.Fatalf("internal bitmap with --nodes: %v, want ErrRefusedChange", err)
	}
	if err := ConvertBitmap(ms, BitmapSpec{Mode: BitmapInternal}, time.Unix(2000, 0), nil); err != nil {
		t.Fatal(err)
	}
	insp, err := Inspect(ms, InspectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if insp.Info.Bitmap != BitmapInternal || insp.Info.Nodes != 0 || insp.Info.Events != c.Info.Events+1 || !insp.Startable {
		t.Fatalf("after the switch: %+v (startable %v %s)", insp.Info, insp.Startable, insp.Reason)
	}
	for _, m := range ms {
		sb := readSuperOf(m)
		if sb.FeatureMap&superblock.FeatureClustered != 0 {
			t.Fatalf("%s: feature map %#x still has the clustered bit", m.Name(), sb.FeatureMap)
		}
		slots, err := readBitmap(m, sb)
		if err != nil {
			t.Fatalf("%s: %v", m.Name(), err)
		}
		if len(slots) != 1 || slots[0].Super.Version != bitmap.VersionLE || slots[0].Super.Nodes != 0 {
			t.Fatalf("%s: %d slots, version %d, %d nodes; want one internal slot", m.Name(), len(slots), slots[0].Super.Version, slots[0].Super.Nodes)
		}
		if got := slots[0].DirtyChunks(); len(got) != 2 || got[0] != 3 || got[1] != 9 {
			t.Fatalf("%s: dirty chunks %v, want [3 9]", m.Name(), got)
		}
	}
}
