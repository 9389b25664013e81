package bitmap_test

import (
	"testing"

	"github.com/mdcluster/mdcluster/internal/fuzzcap"
)

// TestMain bounds fuzz minimisation (see package fuzzcap).
func TestMain(m *testing.M) { fuzzcap.Main(m) }
