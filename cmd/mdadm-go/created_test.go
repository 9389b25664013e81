package main

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/mdcluster/mdcluster/mdcluster/array"
)

// TestRealMdadmReadsArrayCreate: members written by array.Create (raid1
// with an internal bitmap and a spare, clustered raid1, raid10 near=2) are
// examined by real mdadm and by mdadm-go; -E must be identical, and -X on a
// read-only loop device too.
func TestRealMdadmReadsArrayCreate(t *testing.T) {
	mdadm := needMdadm(t)
	host, _ := os.Hostname()
	specs := map[string]array.CreateSpec{
		"raid1-internal-spare": {Level: 1, RaidDevices: 2, Bitmap: array.BitmapInternal, Name: "r1", Homehost: host},
		"raid1-clustered":      {Level: 1, RaidDevices: 2, Bitmap: array.BitmapClustered, Nodes: 5, ClusterName: "anchor", Name: "c", Homehost: "n1"},
		"raid10-near2":         {Level: 10, RaidDevices: 4, ChunkSize: 64 << 10, Bitmap: array.BitmapInternal, AssumeClean: true, Name: "r10"},
	}
	for name, spec := range specs {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			n := spec.RaidDevices + 1
			var ms []array.Member
			var paths []string
			for i := 0; i < n; i++ {
				p := filepath.Join(dir, name+"-"+string(rune('a'+i))+".img")
				f, err := os.Create(p)
				if err != nil {
					t.Fatal(err)
				}
				f.Truncate(96 << 20)
				f.Close()
				m, err := array.OpenFile(p, true)
				if err != nil {
					t.Fatal(err)
				}
				defer m.Close()
				ms, paths = append(ms, m), append(paths, p)
			}
			if _, err := array.Create(spec, ms); err != nil {
				t.Fatal(err)
			}
			for _, p := range paths {
				wo, we, wx := realMdadm(t, mdadm, "-E", p)
				if wx != 0 {
					t.Fatalf("mdadm -E %s failed: %s", p, we)
				}
				o, e, x := runCLI("mdadm-go", host, "-E", p)
				compare(t, "-E "+filepath.Base(p), wo, we, wx, o, e, x)
				if os.Geteuid() != 0 {
					continue
				}
				needRoot(t)
				loop := attachLoop(t, p)
				wo, we, wx = realMdadm(t, mdadm, "-X", loop)
				o, e, x = runCLI("mdadm-go", host, "-X", loop)
				compare(t, "-X "+filepath.Base(p), wo, we, wx, o, e, x)
			}
		})
	}
}
