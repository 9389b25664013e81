package sim

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
)

// lateOpenConfig is randomConfig with most restarted nodes opening their
// lockspace only after they are up (Faults.LateOpen).
func lateOpenConfig(seed uint64) Config {
	cfg := randomConfig(seed)
	cfg.Faults.LateOpen = 0.5
	return cfg
}

// TestLateOpenRandom runs the random cluster with restarted nodes that open
// their lockspace late, as a restarted daemon attaches its array after the
// node is up: readmitted with no lockspace open, the node later opens it
// and the lockspace joins the recovery of the view installed last, while
// the others wait for its part (the bug this catches: the others' recovery
// never ended, and the cluster never converged). SIM_LATE_SEEDS=n runs n
// seeds (default defaultSeeds/4), SIM_LATE_SEED=s replays one, SIM_TRACE=1
// prints its trace.
func TestLateOpenRandom(t *testing.T) {
	run := func(seed uint64, trace bool) (*Sim, string) {
		cfg := lateOpenConfig(seed)
		if trace {
			cfg.Trace = traceWriter()
		}
		return runConfig(cfg, randomSteps)
	}
	replayLate := func(seed uint64) string {
		return fmt.Sprintf("SIM_LATE_SEED=%d go test -run 'TestLateOpenRandom$' ./internal/sim/", seed)
	}
	if v := os.Getenv("SIM_LATE_SEED"); v != "" {
		seed, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			t.Fatalf("SIM_LATE_SEED=%q: %v", v, err)
		}
		s, msg := run(seed, true)
		if s != nil {
			t.Logf("seed %d: %+v", seed, s.Stats())
		}
		if msg != "" {
			t.Fatalf("seed %d step %d: %s\nreplay: %s", seed, stepOf(s), msg, replayLate(seed))
		}
		return
	}
	seeds := defaultSeeds / 4
	if testing.Short() {
		seeds /= 10
	}
	if v := os.Getenv("SIM_LATE_SEEDS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil {
			t.Fatalf("SIM_LATE_SEEDS=%q: %v", v, err)
		}
		seeds = n
	}
	var total Stats
	var failures []string
	for seed := uint64(1); seed <= uint64(seeds); seed++ {
		s, msg := run(seed, false)
		if msg != "" {
			failures = append(failures, fmt.Sprintf("seed %d step %d: %s\n  replay: %s", seed, stepOf(s), firstLine(msg), replayLate(seed)))
			if len(failures) >= 5 {
				break
			}
			continue
		}
		add(&total, s.Stats())
		total.LateOpens += s.Stats().LateOpens
		total.LateJoins += s.Stats().LateJoins
	}
	t.Logf("%d seeds: %d restarts, %d late opens, %d of them joining a view's recovery", seeds, total.Restarts, total.LateOpens, total.LateJoins)
	if len(failures) > 0 {
		t.Fatalf("%d failing seeds (first ones):\n%s", len(failures), strings.Join(failures, "\n"))
	}
	if seeds >= 20 && total.LateJoins == 0 {
		t.Fatalf("%d seeds and no lockspace opened late joined a view's recovery", seeds)
	}
}
