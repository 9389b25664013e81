package apply

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/mdcluster/mdcluster/mdcluster/membership"
)

// recorder is a fake driver: it records every effect as one line, in order.
type recorder struct {
	trace      []string
	recoveries []Recovery
	stops      []Stop
	whys       []string // the "why" of every log line that has one
	persistErr error
	recoverErr error
	// duringRecover runs inside RecoverLockManager (a lockspace reporting
	// its recovery before the call returns, as in the runtime).
	duringRecover func()
}

func (r *recorder) add(format string, args ...any) {
	r.trace = append(r.trace, fmt.Sprintf(format, args...))
}

func (r *recorder) Persist(hs membership.HardState) error {
	r.add("persist %d", hs.Installed.Gen)
	return r.persistErr
}

func (r *recorder) StopLockManager(s Stop) {
	r.stops = append(r.stops, s)
	var why []string
	if s.NotQuorate {
		why = append(why, "no-quorum")
	}
	if s.Change != nil {
		why = append(why, fmt.Sprintf("change=%d", s.Change.Gen))
	}
	if s.AfterInstall {
		why = append(why, "after-install")
	}
	r.add("stop %s", strings.Join(why, ","))
}

func (r *recorder) Send(m membership.Outgoing) { r.add("send %d", m.To) }

func (r *recorder) RecoverLockManager(rc Recovery) error {
	r.recoveries = append(r.recoveries, rc)
	r.add("recover gen=%d members=%v purge=%v reset=%v", rc.Gen, rc.Members, rc.Purge, rc.Reset)
	if r.duringRecover != nil {
		r.duringRecover()
	}
	return r.recoverErr
}

func (r *recorder) RequestFence(f membership.FenceRequest) { r.add("fence %d for %d", f.Node, f.Gen) }
func (r *recorder) QuorumChanged(q bool)                   { r.add("quorate %v", q) }
func (r *recorder) RecoveryDone(gen uint64)                { r.add("done %d", gen) }
func (r *recorder) Exited()                                { r.add("exited") }
func (r *recorder) Log(e membership.Event) {
	r.add("log %s", e.Msg)
	for _, a := range e.Attrs {
		if a.Key == "why" {
			r.whys = append(r.whys, a.Value.String())
		}
	}
}

// effects drops the log lines (the tests below look at actions; the order
// test keeps them).
func (r *recorder) effects() []string {
	return slices.DeleteFunc(slices.Clone(r.trace), func(s string) bool { return strings.HasPrefix(s, "log ") })
}

func newApplier(t *testing.T, self NodeID, r *recorder) *Applier {
	t.Helper()
	a, err := New(Config{Self: self, Effects: r})
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func bptr(b bool) *bool { return &b }

func view(gen uint64, ids ...NodeID) membership.View { return membership.View{Gen: gen, Members: ids} }

func install(gen uint64, ids ...NodeID) membership.Install {
	return membership.Install{View: view(gen, ids...), Prev: view(gen-1, ids...)}
}

func msgs(to ...NodeID) []membership.Outgoing {
	var out []membership.Outgoing
	for _, id := range to {
		out = append(out, membership.Outgoing{To: id, Payload: []byte{1}})
	}
	return out
}

// TestApplyOrder: every kind of decision in one Ready comes out in the
// documented order, and a Ready that only loses quorum and stops for a
// change stops once, before it sends.
func TestApplyOrder(t *testing.T) {
	hs := &membership.HardState{Installed: membership.Proposal{Gen: 5, Members: []NodeID{1, 2}}}
	cases := []struct {
		name string
		rd   membership.Ready
		want []string
	}{{
		name: "every decision",
		rd: membership.Ready{
			Log:      []membership.Event{{Msg: "agreement said so"}},
			State:    hs,
			Stop:     &membership.View{Gen: 5, Members: []NodeID{1, 2}},
			Messages: msgs(2, 3),
			Install:  []membership.Install{install(5, 1, 2)},
			Fence:    []membership.FenceRequest{{Node: 3, Gen: 5}},
			Quorate:  bptr(true),
			Exited:   true,
		},
		want: []string{"log agreement said so", "persist 5", "stop change=5", "send 2", "send 3",
			"recover gen=5 members=[1 2] purge=[] reset=false", "done 5", "fence 3 for 5", "quorate true", "exited"},
	}, {
		name: "quorum lost and a change, before the messages",
		rd:   membership.Ready{State: hs, Quorate: bptr(false), Stop: &membership.View{Gen: 9, Members: []NodeID{1}}, Messages: msgs(2)},
		want: []string{"persist 5", "stop no-quorum,change=9", "quorate false", "send 2"},
	}, {
		name: "two installs in order, one RecoveryDone for the last",
		rd:   membership.Ready{Install: []membership.Install{install(3, 1, 2), install(4, 1, 2)}, Quorate: bptr(true)},
		want: []string{"recover gen=3 members=[1 2] purge=[] reset=false", "recover gen=4 members=[1 2] purge=[] reset=false",
			"done 4", "quorate true"},
	}, {
		name: "messages only",
		rd:   membership.Ready{Messages: msgs(3, 2)},
		want: []string{"send 3", "send 2"},
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := &recorder{}
			if err := newApplier(t, 1, r).Apply(c.rd); err != nil {
				t.Fatal(err)
			}
			got := r.trace
			if len(c.rd.Log) == 0 {
				got = r.effects()
			}
			if !slices.Equal(got, c.want) {
				t.Fatalf("effects\n  %q\nwant\n  %q", got, c.want)
			}
		})
	}
}

// TestApplyPersistFailure: when the state cannot be made durable, nothing
// else happens: no stop, and above all no message (it could carry a
// promise the node would forget).
func TestApplyPersistFailure(t *testing.T) {
	r := &recorder{persistErr: errors.New("disk gone")}
	a := newApplier(t, 1, r)
	err := a.Apply(membership.Ready{
		State: &membership.HardState{}, Stop: &membership.View{Gen: 4}, Messages: msgs(2),
		Install: []membership.Install{install(3, 1, 2)}, Fence: []membership.FenceRequest{{Node: 2, Gen: 3}},
	})
	if err == nil || !strings.Contains(err.Error(), "disk gone") {
		t.Fatalf("Apply returned %v, want the persist error", err)
	}
	if want := []string{"persist 0"}; !slices.Equal(r.effects(), want) {
		t.Fatalf("effects %q, want %q", r.effects(), want)
	}
}

// TestApplyStopAgainAfterInstall: a Ready whose StopAfterInstall is set
// (the Agreement stopped for a newer change after the install, or the node
// is not quorate after it) leaves the lock manager stopped: the stop is
// applied again after the install, which would otherwise resume it. The
// Applier derives nothing itself: a Stop that the Agreement ordered before
// the install (no StopAfterInstall) is undone by the install's recovery, as
// the Agreement's own record says.
func TestApplyStopAgainAfterInstall(t *testing.T) {
	v8 := &membership.View{Gen: 8, Members: []NodeID{1, 2}}
	cases := []struct {
		name    string
		rd      membership.Ready
		want    []string
		wantWhy string
	}{{
		name: "stop for a newer proposal after the install",
		rd: membership.Ready{Stop: v8, Messages: msgs(2), Install: []membership.Install{install(7, 1, 2)},
			StopAfterInstall: &membership.StopAfterInstall{Change: v8}},
		want: []string{"stop change=8", "send 2", "recover gen=7 members=[1 2] purge=[] reset=false",
			"stop change=8,after-install", "done 7"},
		wantWhy: "after the install, a change towards a newer view began in the same decision",
	}, {
		name: "a stop the Agreement ordered before the install: the install resumes",
		rd:   membership.Ready{Stop: v8, Install: []membership.Install{install(7, 1, 2)}},
		want: []string{"stop change=8", "recover gen=7 members=[1 2] purge=[] reset=false", "done 7"},
	}, {
		name: "installed a view this node is not quorate in",
		rd: membership.Ready{Install: []membership.Install{install(7, 1, 2, 3)},
			StopAfterInstall: &membership.StopAfterInstall{NotQuorate: true}},
		want:    []string{"recover gen=7 members=[1 2 3] purge=[] reset=false", "stop no-quorum,after-install", "done 7"},
		wantWhy: "this node has no quorum after the install",
	}, {
		name: "quorum lost in the same Ready as the install",
		rd: membership.Ready{Quorate: bptr(false), Install: []membership.Install{install(7, 1, 2, 3)},
			StopAfterInstall: &membership.StopAfterInstall{NotQuorate: true}},
		want: []string{"stop no-quorum", "quorate false", "recover gen=7 members=[1 2 3] purge=[] reset=false",
			"stop no-quorum,after-install", "done 7"},
	}, {
		name: "newer proposal and no quorum: one stop with both reasons",
		rd: membership.Ready{Stop: &membership.View{Gen: 9}, Install: []membership.Install{install(7, 1, 2)},
			StopAfterInstall: &membership.StopAfterInstall{Change: &membership.View{Gen: 9}, NotQuorate: true}},
		want: []string{"stop change=9", "recover gen=7 members=[1 2] purge=[] reset=false",
			"stop no-quorum,change=9,after-install", "done 7"},
		wantWhy: "after the install, a change towards a newer view began, and this node has no quorum",
	}, {
		name: "quorate, no stop: nothing more",
		rd:   membership.Ready{Install: []membership.Install{install(7, 1, 2)}, Quorate: bptr(true)},
		want: []string{"recover gen=7 members=[1 2] purge=[] reset=false", "done 7", "quorate true"},
	}, {
		name: "no install: a stop is not repeated",
		rd:   membership.Ready{Stop: &membership.View{Gen: 9}},
		want: []string{"stop change=9"},
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := &recorder{}
			if err := newApplier(t, 1, r).Apply(c.rd); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(r.effects(), c.want) {
				t.Fatalf("effects\n  %q\nwant\n  %q", r.effects(), c.want)
			}
			if c.wantWhy != "" && !slices.ContainsFunc(r.whys, func(w string) bool { return w == c.wantWhy }) {
				t.Fatalf("logged reasons %q, want %q", r.whys, c.wantWhy)
			}
		})
	}
}

// TestApplyPurge: the departed, the leavers and the rejoined are purged,
// never this node, sorted and without duplicates.
func TestApplyPurge(t *testing.T) {
	cases := []struct {
		name                     string
		departed, left, rejoined []NodeID
		want                     []NodeID
	}{
		{name: "nothing", want: nil},
		{name: "departed only", departed: []NodeID{3}, want: []NodeID{3}},
		{name: "all three kinds, unsorted", departed: []NodeID{5, 3}, left: []NodeID{2}, rejoined: []NodeID{4}, want: []NodeID{2, 3, 4, 5}},
		{name: "self rejoined is not purged", departed: []NodeID{3}, rejoined: []NodeID{1, 4}, want: []NodeID{3, 4}},
		{name: "self only", rejoined: []NodeID{1}, want: nil},
		{name: "duplicates across kinds", departed: []NodeID{3, 2}, left: []NodeID{3}, rejoined: []NodeID{2, 3}, want: []NodeID{2, 3}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := install(6, 1, 2, 4)
			in.Departed, in.Left, in.Rejoined = c.departed, c.left, c.rejoined
			r := &recorder{}
			if err := newApplier(t, 1, r).Apply(membership.Ready{Install: []membership.Install{in}}); err != nil {
				t.Fatal(err)
			}
			if len(r.recoveries) != 1 {
				t.Fatalf("recoveries %+v", r.recoveries)
			}
			if got := r.recoveries[0].Purge; !slices.Equal(got, c.want) {
				t.Fatalf("purge %v, want %v", got, c.want)
			}
			if got := Purge(in, 1); !slices.Equal(got, c.want) {
				t.Fatalf("Purge %v, want %v", got, c.want)
			}
		})
	}
}

// TestApplyReset: a reset asked of a lock manager that never recovered
// into a view is carried out as a plain recovery (and says so); once the
// lock manager has recovered into one view, a reset is carried out. A
// recovery that failed to start does not count.
func TestApplyReset(t *testing.T) {
	type step struct {
		reset          bool
		recoverErr     error
		wantReset      bool
		wantSuppressed bool
	}
	cases := []struct {
		name  string
		steps []step
	}{
		{name: "fresh: suppressed", steps: []step{{reset: true, wantReset: false, wantSuppressed: true}}},
		{name: "fresh, no reset asked", steps: []step{{reset: false}}},
		{name: "honoured after one recovery", steps: []step{{reset: false}, {reset: true, wantReset: true}}},
		{name: "honoured after a suppressed one", steps: []step{{reset: true, wantSuppressed: true}, {reset: true, wantReset: true}}},
		{name: "a failed recovery does not count", steps: []step{
			{reset: true, wantSuppressed: true, recoverErr: errors.New("no")}, {reset: true, wantSuppressed: true}, {reset: true, wantReset: true}}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			r := &recorder{}
			a := newApplier(t, 1, r)
			for i, s := range c.steps {
				in := install(uint64(i+1), 1, 2)
				in.Reset = s.reset
				r.recoverErr = s.recoverErr
				if err := a.Apply(membership.Ready{Install: []membership.Install{in}}); err != nil {
					t.Fatal(err)
				}
				rc := r.recoveries[len(r.recoveries)-1]
				if rc.Reset != s.wantReset || rc.ResetSuppressed != s.wantSuppressed || rc.Install.Reset != s.reset {
					t.Fatalf("step %d: recovery reset=%v suppressed=%v (asked %v), want reset=%v suppressed=%v",
						i, rc.Reset, rc.ResetSuppressed, rc.Install.Reset, s.wantReset, s.wantSuppressed)
				}
				logged := slices.ContainsFunc(r.trace, func(l string) bool { return strings.Contains(l, "recovering without reset") })
				if s.wantSuppressed && !logged {
					t.Fatalf("step %d: suppressed reset not logged: %q", i, r.trace)
				}
				r.trace = nil
			}
		})
	}
}

// TestApplyGeneration: the lock manager recovers into the view's own
// generation, the first view included.
func TestApplyGeneration(t *testing.T) {
	for _, gen := range []uint64{1, 2, 17, 1 << 40} {
		r := &recorder{}
		if err := newApplier(t, 2, r).Apply(membership.Ready{Install: []membership.Install{install(gen, 3, 2, 1)}}); err != nil {
			t.Fatal(err)
		}
		rc := r.recoveries[0]
		if rc.Gen != gen || rc.Install.View.Gen != gen || !slices.Equal(rc.Members, []NodeID{1, 2, 3}) {
			t.Fatalf("view %d: recovery gen %d members %v", gen, rc.Gen, rc.Members)
		}
		if want := fmt.Sprintf("done %d", gen); !slices.Contains(r.trace, want) {
			t.Fatalf("view %d: %q lacks %q", gen, r.trace, want)
		}
	}
}

// TestRecoveryDone: RecoveryDone comes once, when every known lockspace has
// recovered into the pending view, and not for a recovery that did not
// start.
func TestRecoveryDone(t *testing.T) {
	in5 := membership.Ready{Install: []membership.Install{install(5, 1, 2)}}
	in6 := membership.Ready{Install: []membership.Install{install(6, 1, 2)}}
	dones := func(r *recorder) []string {
		return slices.DeleteFunc(slices.Clone(r.trace), func(s string) bool { return !strings.HasPrefix(s, "done") })
	}
	t.Run("waits for every lockspace", func(t *testing.T) {
		r := &recorder{}
		a := newApplier(t, 1, r)
		a.LockspaceOpened("a", 0)
		a.LockspaceOpened("b", 0)
		a.Apply(in5)
		a.LockspaceRecovered("a", 5)
		a.LockspaceRecovered("b", 4) // an older report changes nothing
		if d := dones(r); len(d) != 0 {
			t.Fatalf("reported %q before lockspace b recovered", d)
		}
		a.LockspaceRecovered("b", 5)
		a.LockspaceRecovered("b", 5) // duplicate
		a.LockspaceRecovered("a", 5)
		if d := dones(r); !slices.Equal(d, []string{"done 5"}) {
			t.Fatalf("reported %q, want done 5 once", d)
		}
	})
	t.Run("a lockspace opened running does not delay", func(t *testing.T) {
		r := &recorder{}
		a := newApplier(t, 1, r)
		a.LockspaceOpened("a", 0)
		a.Apply(in5)
		a.LockspaceOpened("late", 5) // created after the recovery started, at its generation
		a.LockspaceOpened("a", 5)    // a second handle says nothing about recovery
		if d := dones(r); len(d) != 0 {
			t.Fatalf("reported %q before lockspace a recovered", d)
		}
		a.LockspaceRecovered("a", 5)
		if d := dones(r); !slices.Equal(d, []string{"done 5"}) {
			t.Fatalf("reported %q", d)
		}
	})
	t.Run("a lockspace opened stopped delays", func(t *testing.T) {
		r := &recorder{}
		a := newApplier(t, 1, r)
		a.LockspaceOpened("a", 0)
		a.LockspaceOpened("b", 0)
		a.Apply(in5)
		a.LockspaceRecovered("a", 5)
		a.LockspaceRecovered("b", 5)
		a.LockspaceOpened("c", 0) // opened while stopped: the next recovery takes it along
		a.Apply(in6)
		a.LockspaceRecovered("a", 6)
		a.LockspaceRecovered("b", 6)
		if d := dones(r); !slices.Equal(d, []string{"done 5"}) {
			t.Fatalf("reported %q before lockspace c recovered", d)
		}
		a.LockspaceRecovered("c", 6)
		if d := dones(r); !slices.Equal(d, []string{"done 5", "done 6"}) {
			t.Fatalf("reported %q", d)
		}
	})
	t.Run("no lockspace: done at once", func(t *testing.T) {
		r := &recorder{}
		newApplier(t, 1, r).Apply(in5)
		if d := dones(r); !slices.Equal(d, []string{"done 5"}) {
			t.Fatalf("reported %q", d)
		}
	})
	t.Run("reported during the recover call: once", func(t *testing.T) {
		r := &recorder{}
		a := newApplier(t, 1, r)
		a.LockspaceOpened("a", 0)
		r.duringRecover = func() { a.LockspaceRecovered("a", 5) }
		a.Apply(in5)
		if d := dones(r); !slices.Equal(d, []string{"done 5"}) {
			t.Fatalf("reported %q", d)
		}
	})
	t.Run("an older view's report does not complete a newer one", func(t *testing.T) {
		r := &recorder{}
		a := newApplier(t, 1, r)
		a.LockspaceOpened("a", 0)
		a.Apply(in5)
		a.Apply(in6)
		a.LockspaceRecovered("a", 5)
		if d := dones(r); len(d) != 0 {
			t.Fatalf("reported %q", d)
		}
		a.LockspaceRecovered("a", 6)
		if d := dones(r); !slices.Equal(d, []string{"done 6"}) {
			t.Fatalf("reported %q", d)
		}
	})
	t.Run("recovery that did not start is not reported", func(t *testing.T) {
		r := &recorder{recoverErr: errors.New("refused")}
		a := newApplier(t, 1, r)
		a.Apply(in5)
		if d := dones(r); len(d) != 0 {
			t.Fatalf("reported %q", d)
		}
		if a.EverRecovered() {
			t.Fatal("a failed recovery counts as recovered")
		}
		if !slices.ContainsFunc(r.trace, func(s string) bool { return strings.Contains(s, "could not start") }) {
			t.Fatalf("failure not logged: %q", r.trace)
		}
	})
}

func TestNewValidates(t *testing.T) {
	if _, err := New(Config{Self: 1}); err == nil {
		t.Fatal("New without Effects succeeded")
	}
	if _, err := New(Config{Effects: &recorder{}}); err == nil {
		t.Fatal("New without Self succeeded")
	}
}
