package lease

import (
	"strings"
	"testing"

	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

func TestCheckRegion(t *testing.T) {
	ok := func() *superblock.Superblock {
		return &superblock.Superblock{SuperOffset: 8, DataOffset: 2048, FeatureMap: superblock.FeatureBitmapOffset,
			BitmapOffset: 8, BBLogOffset: 16, BBLogSize: 8}
	}
	if err := CheckRegion(ok()); err != nil {
		t.Fatalf("mdadm's v1.2 layout: %v", err)
	}
	cases := map[string]func(*superblock.Superblock){
		"v1.1":            func(s *superblock.Superblock) { s.SuperOffset = 0 },
		"bitmap":          func(s *superblock.Superblock) { s.BitmapOffset = -4 },
		"bad-block log":   func(s *superblock.Superblock) { s.BBLogOffset = -8 },
		"data":            func(s *superblock.Superblock) { s.DataOffset = 4 },
		"new data offset": func(s *superblock.Superblock) { s.FeatureMap |= superblock.FeatureNewOffset; s.NewOffset = -2046 },
	}
	for name, mut := range cases {
		sb := ok()
		mut(sb)
		if err := CheckRegion(sb); err == nil || !strings.Contains(err.Error(), "stamp region") {
			t.Errorf("%s: %v", name, err)
		}
	}
}
