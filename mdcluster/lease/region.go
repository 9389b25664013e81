package lease

import (
	"fmt"

	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// regionSectors is the stamp region in md's 512-byte sectors.
const regionSectors = RegionSize / superblock.SectorSize

// CheckRegion verifies, from a member's superblock, that md keeps nothing
// in the stamp region (sectors 0-7): the superblock is v1.2 (at sector 8),
// and the data, the bitmap, the bad-block log, a pending reshape's new
// data offset and the PPL all start at or after sector 8. mdadm never
// creates anything else for v1.2, but an array made by other tools could,
// so the node refuses to stamp such a member rather than overwrite md's
// metadata.
func CheckRegion(sb *superblock.Superblock) error {
	if sb.SuperOffset != superblock.V12Offset {
		return fmt.Errorf("stamp region: superblock at sector %d, not v1.2's %d: the stamp region is only known to be free on v1.2 members", sb.SuperOffset, superblock.V12Offset)
	}
	check := func(what string, start int64) error {
		if start < regionSectors {
			return fmt.Errorf("stamp region: %s starts at sector %d, inside sectors 0-%d", what, start, regionSectors-1)
		}
		return nil
	}
	so := int64(sb.SuperOffset)
	if err := check("data", int64(sb.DataOffset)); err != nil {
		return err
	}
	if sb.FeatureMap&superblock.FeatureNewOffset != 0 {
		if err := check("the reshape's new data offset", int64(sb.DataOffset)+int64(sb.NewOffset)); err != nil {
			return err
		}
	}
	switch {
	case sb.FeatureMap&superblock.FeaturePPL != 0:
		off, _ := sb.PPL()
		if err := check("the partial parity log", so+int64(off)); err != nil {
			return err
		}
	case sb.FeatureMap&superblock.FeatureBitmapOffset != 0:
		if err := check("the bitmap", so+int64(sb.BitmapOffset)); err != nil {
			return err
		}
	}
	if sb.BBLogOffset != 0 && sb.BBLogSize != 0 {
		if err := check("the bad-block log", so+int64(sb.BBLogOffset)); err != nil {
			return err
		}
	}
	return nil
}
