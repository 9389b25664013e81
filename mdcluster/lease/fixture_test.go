package lease

import (
	"bytes"
	"context"
	"os"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/superblock"
	"github.com/mdcluster/mdcluster/mdcluster/superblock/mdtest"
)

type fileDev struct{ *os.File }

func (f fileDev) Sync() error { return f.File.Sync() }

// TestFixturesStampRegion, on every member mdadm 4.2 and Linux 6.1 md
// wrote (the shared fixtures): sectors 0-7 are all zero (neither wrote
// there), the superblock leaves the region free (CheckRegion), and after
// a stamp the superblock still probes as v1.2 (not as a v1.1 one at sector
// 0) and `mdadm -E` renders exactly as mdadm printed it.
func TestFixturesStampRegion(t *testing.T) {
	dir := t.TempDir()
	for _, name := range mdtest.Names(t) {
		t.Run(name, func(t *testing.T) {
			want, _ := mdtest.Expected(t, name, "E")
			f, err := os.OpenFile(mdtest.Image(t, dir, name), os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			st, _ := f.Stat()
			sectors := uint64(st.Size()) / 512
			head := make([]byte, RegionSize)
			if _, err := f.ReadAt(head, 0); err != nil {
				t.Fatal(err)
			}
			if !allZero(head) {
				t.Errorf("mdadm or md wrote into sectors 0-7")
			}
			sb, err := superblock.Probe(f, sectors)
			if err != nil {
				t.Fatal(err)
			}
			if err := CheckRegion(sb); err != nil {
				t.Fatal(err)
			}
			s := &Stamper{Array: sb.SetUUID, Node: 1, Members: func() []Device { return []Device{fileDev{f}} }}
			if err := s.Stamp(context.Background(), 12); err != nil {
				t.Fatal(err)
			}
			if r, err := s.Highest(); err != nil || r.Generation != 12 {
				t.Fatalf("read back: %+v %v", r, err)
			}
			sb2, err := superblock.Probe(f, sectors)
			if err != nil || sb2.SuperOffset != superblock.V12Offset {
				t.Fatalf("probe after stamping: %v", err)
			}
			var out bytes.Buffer
			out.WriteString(name + ".img:\n")
			if err := sb2.Examine(&out, superblock.ExamineOptions{DevSectors: sectors, Bitmap: superblock.LoadBitmapSuper(f, sb2), Location: time.UTC}); err != nil {
				t.Fatal(err)
			}
			if out.String() != want {
				t.Errorf("examine after stamping differs from mdadm's:\n%s\nwant:\n%s", out.String(), want)
			}
		})
	}
}
