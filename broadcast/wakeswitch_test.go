package broadcast

import (
	"os"

	"github.com/mdcluster/mdcluster/internal/wake"
)

// MDCLUSTER_WAKE_CHANNELS=1 runs this package's tests and benchmarks with
// channel-backed waiters (the design before internal/wake), so the two can
// be alternated with one test binary.
func init() {
	if os.Getenv("MDCLUSTER_WAKE_CHANNELS") != "" {
		wake.UseChannels()
	}
}
