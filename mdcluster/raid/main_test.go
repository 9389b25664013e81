package raid

import (
	"os"
	"strconv"
	"testing"
	"time"
)

// seedFromEnv returns the seed named by env when set (to replay a failure),
// else a fresh one; either way it is logged, and the failure messages
// repeat it with the command that replays the run.
func seedFromEnv(t testing.TB, env string) uint64 {
	t.Helper()
	if s := os.Getenv(env); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s=%q: %v", env, s, err)
		}
		t.Logf("%s=%d (from the environment)", env, v)
		return v
	}
	v := uint64(time.Now().UnixNano())
	t.Logf("%s=%d", env, v)
	return v
}
