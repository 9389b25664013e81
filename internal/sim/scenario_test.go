package sim

import (
	"testing"

	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/dlm"
)

// calm is a fault profile without random faults: scenarios inject their own.
func calm() Faults {
	return Faults{MsgMaxDelay: 2, DLMMaxDelay: 1, FDLag: 2, FenceLag: 2}
}

func scenario(t *testing.T, nodes []NodeID, m int, f Faults) *Sim {
	t.Helper()
	cfg := Config{Seed: 1, Quorum: ddraid.Config{DataNodes: nodes, Quorum: m}, LVBLen: 16, TossLimit: 2, Faults: f}
	cfg.Trace = traceWriter()
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !s.RunUntil(500, func() bool { return s.ConvergedOn(nodes...) }) {
		fatal(t, s, "the cluster did not form")
	}
	return s
}

func fatal(t *testing.T, s *Sim, msg string) {
	t.Helper()
	if f := s.Failed(); f != "" {
		msg += ": " + f
	}
	t.Fatalf("%s\n%s(SIM_TRACE=1 prints the trace)", msg, s.Describe())
}

func finish(t *testing.T, s *Sim) {
	t.Helper()
	s.Finish()
	if s.Failed() != "" {
		fatal(t, s, "finish")
	}
}

func granted(l *Lock, mode dlm.Mode) bool {
	return l != nil && !l.Pending && l.Gr == mode && l.done == 1
}

// TestRequestRacesMasterDeparture: a request is on its way to (or looking
// up) the master when the master crashes. After recovery it is granted by
// the new master, exactly once.
func TestRequestRacesMasterDeparture(t *testing.T) {
	s := scenario(t, []NodeID{1, 2, 3}, 2, calm())
	a := s.NewLock(2, "rA", dlm.EX, dlm.ValBlk)
	s.QuiesceDLM(100)
	s.Unlock(a, dlm.ValBlk) // node 2 stays master (the resource is cached there)
	s.QuiesceDLM(100)
	b := s.NewLock(1, "rA", dlm.PR, dlm.ValBlk)
	s.DeliverDLM() // one hop at most: the request is still in flight
	s.Crash(2)
	if !s.RunUntil(500, func() bool { return s.ConvergedOn(1, 3) && !b.Pending }) {
		fatal(t, s, "no recovery after the master's crash")
	}
	if !granted(b, dlm.PR) {
		t.Fatalf("request: granted %v, pending %v, %d completions; want PR once", b.Gr, b.Pending, b.done)
	}
	finish(t, s)
}

// TestPartitionAndHeal: a minority is cut off; it grants nothing once its
// detectors notice (checked at every step), the majority fences it and takes
// over its locks, and after the heal everyone rejoins clean.
func TestPartitionAndHeal(t *testing.T) {
	s := scenario(t, []NodeID{1, 2, 3, 4, 5}, 3, calm())
	held := s.NewLock(4, "r0", dlm.EX, dlm.ValBlk)
	s.QuiesceDLM(100)
	if !granted(held, dlm.EX) {
		t.Fatalf("setup: node 4 did not get EX")
	}
	s.Partition(map[NodeID]int{4: 1, 5: 1})
	w := s.NewLock(1, "r0", dlm.EX, dlm.ValBlk)
	if !s.RunUntil(500, func() bool { return s.ConvergedOn(1, 2, 3) && !w.Pending }) {
		fatal(t, s, "the majority did not move on")
	}
	if !granted(w, dlm.EX) {
		t.Fatalf("majority request: %v pending %v", w.Gr, w.Pending)
	}
	if n := s.Node(5); n.Up && !n.Sp.Stopped() {
		t.Fatalf("node 5, cut off in a minority, still runs its lockspace")
	}
	s.Heal()
	finish(t, s)
}

// TestMasterDiesWithWaiters: the master holds EX with two remote waiters
// queued; it dies. After fencing and recovery the waiters are granted one
// after the other, each exactly once.
func TestMasterDiesWithWaiters(t *testing.T) {
	s := scenario(t, []NodeID{1, 2, 3, 4, 5}, 3, calm())
	h := s.NewLock(3, "r0", dlm.EX, dlm.ValBlk)
	s.QuiesceDLM(100)
	w1 := s.NewLock(1, "r0", dlm.EX, dlm.ValBlk)
	w2 := s.NewLock(2, "r0", dlm.PR, dlm.ValBlk)
	s.QuiesceDLM(100)
	if !granted(h, dlm.EX) || !w1.Pending || !w2.Pending {
		t.Fatalf("setup: holder %v, waiters pending %v %v", h.Gr, w1.Pending, w2.Pending)
	}
	s.Crash(3)
	if !s.RunUntil(500, func() bool { return s.ConvergedOn(1, 2, 4, 5) && (!w1.Pending || !w2.Pending) }) {
		fatal(t, s, "no waiter granted after the master died")
	}
	first, second := w1, w2
	if w1.Pending {
		first, second = w2, w1
	}
	if first.done != 1 || !second.Pending {
		t.Fatalf("want one waiter granted once and the other waiting: %+v %+v", *first, *second)
	}
	s.Unlock(first, 0)
	if !s.RunUntil(200, func() bool { return !second.Pending }) || second.done != 1 || second.Gr != second.Rq {
		fatal(t, s, "the second waiter was not granted after the first released")
	}
	finish(t, s)
}

// TestFenceKeepsFailing: the fencer fails again and again. Nothing is
// installed and the dead node's lock is granted to no one until a fence
// succeeds; then recovery proceeds.
func TestFenceKeepsFailing(t *testing.T) {
	f := calm()
	f.FailFences = 5
	s := scenario(t, []NodeID{1, 2, 3}, 2, f)
	h := s.NewLock(3, "r0", dlm.EX, dlm.ValBlk)
	s.QuiesceDLM(100)
	w := s.NewLock(1, "r0", dlm.EX, dlm.ValBlk)
	s.QuiesceDLM(100)
	if !granted(h, dlm.EX) || !w.Pending {
		t.Fatalf("setup")
	}
	gen := s.Node(1).Ag.View().Gen
	s.Crash(3)
	for s.Stats().FenceFailures < 5 {
		if !s.RunUntil(1, func() bool { return false }) && s.Failed() != "" {
			fatal(t, s, "while fences fail")
		}
		if s.Now() > 2000 {
			fatal(t, s, "fences were not retried")
		}
		for _, id := range []NodeID{1, 2} {
			if g := s.Node(id).Ag.View().Gen; g != gen {
				t.Fatalf("node %s installed gen %d while no fence had succeeded", id, g)
			}
		}
		if !w.Pending {
			t.Fatalf("the dead node's lock was granted before it was fenced")
		}
	}
	if !s.RunUntil(500, func() bool { return s.ConvergedOn(1, 2) && !w.Pending }) || !granted(w, dlm.EX) {
		fatal(t, s, "no recovery once the fence succeeded")
	}
	finish(t, s)
}

// TestSecondFailureDuringRecovery: a node dies while the survivors recover
// from an earlier failure; recovery starts again in the next view and
// completes.
func TestSecondFailureDuringRecovery(t *testing.T) {
	s := scenario(t, []NodeID{1, 2, 3, 4, 5}, 3, calm())
	var ls []*Lock
	for i, id := range []NodeID{1, 2, 3, 4, 5} {
		ls = append(ls, s.NewLock(id, "r"+string(rune('0'+i%3)), dlm.PR, dlm.ValBlk))
	}
	w := s.NewLock(1, "r1", dlm.EX, dlm.ValBlk)
	s.QuiesceDLM(200)
	s.Crash(5)
	if !s.RunUntil(500, func() bool { return s.Installed(1, 2, 3, 4) && s.Node(1).Sp.Stopped() }) {
		fatal(t, s, "no view without node 5")
	}
	s.Crash(4) // while recovery for the first failure is under way
	if !s.RunUntil(500, func() bool { return s.ConvergedOn(1, 2, 3) }) {
		fatal(t, s, "no recovery after the second failure")
	}
	if !w.Pending && w.done != 1 {
		t.Fatalf("waiter completed %d times", w.done)
	}
	_ = ls
	finish(t, s)
}
