package sim

import (
	"crypto/sha256"
	"strings"
	"testing"
)

// runConfig runs cfg for steps random steps and finishes it.
func runConfig(cfg Config, steps int) (*Sim, string) {
	s, err := New(cfg)
	if err != nil {
		return nil, err.Error()
	}
	for range steps {
		if s.Failed() != "" {
			break
		}
		s.Step()
	}
	if s.Failed() == "" {
		s.Finish()
	}
	s.Close()
	return s, s.Failed()
}

// bcastSeeds returns the first n random seeds that run the broadcast.
func bcastSeeds(n int) []uint64 {
	var out []uint64
	for seed := uint64(1); len(out) < n; seed++ {
		if randomConfig(seed).Broadcast != nil {
			out = append(out, seed)
		}
	}
	return out
}

// TestBroadcastDeterministic: a seed that runs the broadcast, with sends
// that reached receivers, replays to the same trace.
func TestBroadcastDeterministic(t *testing.T) {
	run := func(seed uint64) ([32]byte, BcastStats, int) {
		h := sha256.New()
		s, msg := runRandom(seed, randomSteps, h)
		if msg != "" {
			t.Fatalf("seed %d: %s\nreplay: %s", seed, msg, replay("TestRandom", seed))
		}
		return [32]byte(h.Sum(nil)), s.BcastStats(), s.StepNo()
	}
	for _, seed := range bcastSeeds(50) {
		h1, st1, n1 := run(seed)
		if st1.Acted < 5 || st1.Failed == 0 || st1.Departed+st1.NotJoined == 0 {
			continue // find a run worth replaying
		}
		h2, st2, n2 := run(seed)
		if h1 != h2 || st1 != st2 || n1 != n2 {
			t.Fatalf("seed %d does not replay: trace %x vs %x, stats %+v vs %+v", seed, h1[:8], h2[:8], st1, st2)
		}
		t.Logf("seed %d replays exactly (trace %x): %+v", seed, h1[:8], st1)
		return
	}
	t.Fatal("no seed among the first 50 broadcast seeds had acts, failures and departed or unjoined nodes")
}

// TestBroadcastMutationsCaught plants a bug in the simulation's receiver
// (or its driving) and checks that random runs report it as the invariant
// it breaks, within the first seeds.
func TestBroadcastMutationsCaught(t *testing.T) {
	for _, tc := range []struct {
		name string
		mut  BcastMutation
		want string
	}{
		{"drop an action, still ack", BcastDropAction, "broadcast (d)"},
		{"act twice", BcastActTwice, "broadcast (b)"},
		{"report a failure that did not happen", BcastNoFail, "broadcast (d)"},
		{"receive loop never stepped", BcastStall, "broadcast (c)"},
		{"a receiver left out of the result", BcastSkipReceiver, "broadcast (a)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, seed := range bcastSeeds(40) {
				cfg := randomConfig(seed)
				cfg.Broadcast.Mutation = tc.mut
				if tc.mut == BcastNoFail {
					cfg.Broadcast.FailProb = 0.3
				}
				s, msg := runConfig(cfg, randomSteps)
				if msg == "" {
					continue
				}
				if !strings.HasPrefix(msg, tc.want) {
					t.Fatalf("seed %d step %d: want %q, got: %s", seed, stepOf(s), tc.want, firstLine(msg))
				}
				t.Logf("seed %d step %d: %s", seed, stepOf(s), firstLine(msg))
				return
			}
			t.Fatalf("no seed among the first 40 caught the mutation")
		})
	}
}
