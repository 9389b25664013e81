package fence

import (
	"errors"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
)

func nodes(xs ...ddraid.NodeID) []ddraid.NodeID { return xs }

func TestPlanFencing(t *testing.T) {
	// Data nodes 1..5 (3 of 5), non-data nodes 10 and 11.
	cfg := ddraid.Config{DataNodes: nodes(1, 2, 3, 4, 5), Quorum: 3, NonDataNodes: nodes(10, 11)}
	f1, f2 := t0, t0.Add(time.Second)
	tests := []struct {
		name      string
		vc        ViewChange
		actor     ddraid.NodeID
		quorate   bool
		victims   []ddraid.NodeID
		failTimes []time.Time
	}{
		{
			name:  "one data node fails, lowest survivor fences",
			vc:    ViewChange{Generation: 8, Old: nodes(1, 2, 3, 4, 5), New: nodes(2, 3, 4, 5), Departed: []Departure{{Node: 1, FailedAt: f1}}},
			actor: 2, quorate: true, victims: nodes(1), failTimes: []time.Time{f1},
		},
		{
			name:  "two fail, requests sorted",
			vc:    ViewChange{Generation: 8, Old: nodes(5, 4, 3, 2, 1), New: nodes(5, 3, 1), Departed: []Departure{{Node: 4, FailedAt: f2}, {Node: 2, FailedAt: f1}}},
			actor: 1, quorate: true, victims: nodes(2, 4), failTimes: []time.Time{f1, f2},
		},
		{
			name:  "a non-data node can be the actor",
			vc:    ViewChange{Generation: 8, Old: nodes(1, 2, 3, 4, 10), New: nodes(2, 3, 4, 10), Departed: []Departure{{Node: 1, FailedAt: f1}}},
			actor: 2, quorate: true, victims: nodes(1),
		},
		{
			name:  "a failed non-data node is fenced too",
			vc:    ViewChange{Generation: 8, Old: nodes(1, 2, 3, 11), New: nodes(1, 2, 3), Departed: []Departure{{Node: 11, FailedAt: f1}}},
			actor: 1, quorate: true, victims: nodes(11),
		},
		{
			name:    "minority partition must not fence",
			vc:      ViewChange{Generation: 8, Old: nodes(1, 2, 3, 4, 5), New: nodes(1, 2, 10), Departed: []Departure{{Node: 3, FailedAt: f1}, {Node: 4, FailedAt: f1}, {Node: 5, FailedAt: f1}}},
			actor:   ddraid.NoNode,
			quorate: false, victims: nodes(3, 4, 5),
		},
		{
			name:  "non-data nodes do not make a minority quorate",
			vc:    ViewChange{Generation: 8, Old: nodes(1, 2, 3, 4, 5, 10, 11), New: nodes(4, 5, 10, 11), Departed: []Departure{{Node: 1, FailedAt: f1}, {Node: 2, FailedAt: f1}, {Node: 3, FailedAt: f1}}},
			actor: ddraid.NoNode, quorate: false, victims: nodes(1, 2, 3),
		},
		{
			name:  "clean leave is not fenced",
			vc:    ViewChange{Generation: 8, Old: nodes(1, 2, 3, 4, 5), New: nodes(2, 3, 4, 5), Departed: []Departure{{Node: 1, Clean: true}}},
			actor: ddraid.NoNode, quorate: true,
		},
		{
			name:  "join only",
			vc:    ViewChange{Generation: 8, Old: nodes(1, 2, 3), New: nodes(1, 2, 3, 4)},
			actor: ddraid.NoNode, quorate: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, err := PlanFencing(cfg, tt.vc)
			if err != nil {
				t.Fatalf("PlanFencing: %v", err)
			}
			if p.Actor != tt.actor || p.Quorate() != tt.quorate {
				t.Errorf("actor %d quorate %v, want actor %d quorate %v (%s)", p.Actor, p.Quorate(), tt.actor, tt.quorate, p.Quorum)
			}
			var victims []ddraid.NodeID
			for i, r := range p.Requests {
				victims = append(victims, r.Node)
				if r.Generation != tt.vc.Generation {
					t.Errorf("request %d generation %d, want %d", i, r.Generation, tt.vc.Generation)
				}
				if tt.failTimes != nil && !r.FailedAt.Equal(tt.failTimes[i]) {
					t.Errorf("request %d FailedAt %v, want %v", i, r.FailedAt, tt.failTimes[i])
				}
			}
			if !reflect.DeepEqual(victims, tt.victims) {
				t.Errorf("victims %v, want %v", victims, tt.victims)
			}
			for _, id := range append(tt.vc.New, 99) {
				if p.ShouldFence(id) != (id == tt.actor && tt.actor != ddraid.NoNode) {
					t.Errorf("ShouldFence(%d) = %v with actor %d", id, p.ShouldFence(id), tt.actor)
				}
			}
		})
	}
}

// TestPlanFencingOneActor checks, for every split of a 4-node tie-breaker
// cluster, that at most one side gets an actor: two sides fencing each other
// is the split brain fencing must prevent.
func TestPlanFencingOneActor(t *testing.T) {
	cfg := ddraid.Config{DataNodes: nodes(1, 2, 3, 4), Quorum: 2, TieBreaker: 4, NonDataNodes: nodes(9)}
	all := nodes(1, 2, 3, 4, 9)
	for mask := 0; mask < 1<<len(all); mask++ {
		var a, b []ddraid.NodeID
		for i, id := range all {
			if mask&(1<<i) != 0 {
				a = append(a, id)
			} else {
				b = append(b, id)
			}
		}
		actors := 0
		for _, pair := range [][2][]ddraid.NodeID{{a, b}, {b, a}} {
			side, other := pair[0], pair[1]
			var dep []Departure
			for _, id := range other {
				dep = append(dep, Departure{Node: id, FailedAt: t0})
			}
			p, err := PlanFencing(cfg, ViewChange{Generation: 2, Old: all, New: side, Departed: dep})
			if err != nil {
				t.Fatalf("split %v | %v: %v", a, b, err)
			}
			if p.Actor != ddraid.NoNode {
				actors++
			}
		}
		if actors > 1 {
			t.Fatalf("split %v | %v: both sides would fence", a, b)
		}
	}
}

func TestPlanFencingRefusesInconsistentChanges(t *testing.T) {
	cfg := ddraid.Config{DataNodes: nodes(1, 2, 3), Quorum: 2}
	tests := []struct {
		name string
		cfg  ddraid.Config
		vc   ViewChange
		msg  string
	}{
		{"invalid config", ddraid.Config{DataNodes: nodes(1, 2), Quorum: 1}, ViewChange{Old: nodes(1, 2), New: nodes(1, 2)}, "split brain"},
		{"departed still present", cfg, ViewChange{Old: nodes(1, 2, 3), New: nodes(1, 2, 3), Departed: []Departure{{Node: 3, FailedAt: t0}}}, "node 3 departed but is in the new view"},
		{"departed never there", cfg, ViewChange{Old: nodes(1, 2), New: nodes(1, 2), Departed: []Departure{{Node: 3, FailedAt: t0}}}, "node 3 departed but was not in the old view"},
		{"missing departure", cfg, ViewChange{Old: nodes(1, 2, 3), New: nodes(1, 2)}, "node 3 left the view without a departure record"},
		{"no failure time", cfg, ViewChange{Old: nodes(1, 2, 3), New: nodes(1, 2), Departed: []Departure{{Node: 3}}}, "node 3 failed without a failure time"},
		{"departed twice", cfg, ViewChange{Old: nodes(1, 2, 3), New: nodes(1, 2), Departed: []Departure{{Node: 3, FailedAt: t0}, {Node: 3, FailedAt: t0}}}, "node 3 departed twice"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := PlanFencing(tt.cfg, tt.vc)
			if err == nil || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want one mentioning %q", err, tt.msg)
			}
		})
	}
	_, err := PlanFencing(ddraid.Config{DataNodes: nodes(1, 2), Quorum: 1}, ViewChange{})
	if !errors.Is(err, ddraid.ErrSplitBrain) {
		t.Errorf("invalid config err = %v, want it to wrap ddraid.ErrSplitBrain", err)
	}
}

func TestLedger(t *testing.T) {
	var l Ledger
	dep := []Departure{
		{Node: 3, FailedAt: t0.Add(10 * time.Second)},
		{Node: 1, FailedAt: t0.Add(10 * time.Second)},
		{Node: 2, Clean: true},
	}
	if got := l.Pending(dep); !reflect.DeepEqual(got, nodes(1, 3)) {
		t.Fatalf("empty ledger Pending = %v, want [1 3] (clean departures never pending)", got)
	}
	// A fence from before the failure (node 1 was fenced once, rejoined,
	// failed again) does not count.
	l.Record(Result{Node: 1, FencedAt: t0})
	if got := l.Pending(dep); !reflect.DeepEqual(got, nodes(1, 3)) {
		t.Fatalf("Pending = %v after a stale fence of node 1, want [1 3]", got)
	}
	// Exactly at the failure time counts (fence time ≥ fail time).
	l.Record(Result{Node: 1, FencedAt: t0.Add(10 * time.Second), Method: "agent fence_ipmilan"})
	if got := l.Pending(dep); !reflect.DeepEqual(got, nodes(3)) {
		t.Fatalf("Pending = %v, want [3]", got)
	}
	if l.Complete(dep) {
		t.Fatal("Complete with node 3 pending")
	}
	// A late, older confirmation must not replace the newer one.
	l.Record(Result{Node: 1, FencedAt: t0.Add(time.Second), Method: "late"})
	if r, ok := l.Last(1); !ok || r.Method != "agent fence_ipmilan" {
		t.Fatalf("Last(1) = %+v, %v; the older confirmation replaced the newer", r, ok)
	}
	l.Record(Result{Node: 3, FencedAt: t0.Add(time.Minute), Method: "manual"})
	if !l.Complete(dep) || len(l.Pending(dep)) != 0 {
		t.Fatalf("not complete after fencing 1 and 3: pending %v", l.Pending(dep))
	}
	if l.FencedSince(3, t0.Add(2*time.Minute)) {
		t.Error("FencedSince a time after the last fence = true")
	}
	if _, ok := l.Last(2); ok {
		t.Error("Last(2) found a fence that was never recorded")
	}
	var empty Ledger
	if !empty.Complete(nil) || empty.FencedSince(1, time.Time{}) {
		t.Error("zero Ledger: want Complete(nil) and nothing fenced")
	}
}

// TestPlanThenLedger walks the whole pure flow: plan, fence with the test
// fencer, record, and ask whether recovery may start.
func TestPlanThenLedger(t *testing.T) {
	cfg := ddraid.Config{DataNodes: nodes(1, 2, 3, 4, 5), Quorum: 3}
	vc := ViewChange{Generation: 5, Old: nodes(1, 2, 3, 4, 5), New: nodes(1, 2, 3),
		Departed: []Departure{{Node: 4, FailedAt: t0}, {Node: 5, FailedAt: t0.Add(time.Second)}}}
	p, err := PlanFencing(cfg, vc)
	if err != nil || !p.ShouldFence(1) {
		t.Fatalf("plan = %+v, %v", p, err)
	}
	f := &TestFencer{Now: func() time.Time { return t0.Add(time.Minute) }}
	f.FailNext(1, nil)
	var l Ledger
	for _, req := range p.Requests {
		if res, err := f.Fence(t.Context(), req); err == nil {
			l.Record(res)
		}
	}
	if got := l.Pending(vc.Departed); !reflect.DeepEqual(got, nodes(4)) {
		t.Fatalf("Pending = %v, want [4] (its fence failed)", got)
	}
	res, err := f.Fence(t.Context(), p.Requests[0])
	if err != nil {
		t.Fatal(err)
	}
	l.Record(res)
	if !l.Complete(vc.Departed) {
		t.Fatalf("still pending: %v", l.Pending(vc.Departed))
	}
}
