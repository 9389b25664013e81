package gossip

import (
	"testing"

	"github.com/mdcluster/mdcluster/internal/fuzzcap"
)

// TestMain bounds fuzz minimisation (see package fuzzcap): without it
// FuzzDecodeMeta spends most of a short run minimising instead of fuzzing.
func TestMain(m *testing.M) { fuzzcap.Main(m) }
