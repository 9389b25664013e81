package dlm

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"testing"
)

// The randomized model test drives a Core with random operations from many
// owners on a few resources and checks, after every callback, against an
// independent model of what the DLM promises:
//
//   - all granted modes on a resource are pairwise compatible;
//   - nothing is granted out of order (6-3/6-4, with NOORDER, EXPEDITE,
//     HEADQUE and QUECVT as their only exceptions);
//   - every accepted request completes exactly once;
//   - a grantee reading the LVB sees the last value written by a PW/EX
//     holder, and VALNOTVALID exactly when it was invalidated;
//   - nothing grantable is left waiting.
//
// DLM_MODEL_SEEDS sets how many seeds run (default 300); DLM_MODEL_SEED
// replays one; DLM_MODEL_TRACE=1 prints every operation and completion.

type mlock struct {
	id         LockID
	name       int
	owner      OwnerID
	res        string
	state      lkbState
	gr         Mode
	rq         Mode
	flags      Flags // of the pending operation
	op         string
	pending    bool
	persistent bool
	orphan     bool
	lvb        []byte
	lastBast   Mode // mode of a blocking callback since the last completion, or ModeIV
}

type mres struct {
	wait, conv []*mlock
	val        []byte
	invalid    bool
}

type model struct {
	t     *testing.T
	seed  uint64
	rng   *rand.Rand
	c     *Core
	locks map[LockID]*mlock
	res   map[string]*mres
	names int
	step  int
	// the operation issued in the current step
	cur *mlock
}

const modelLVB = 16

func (m *model) fail(format string, args ...any) {
	m.t.Helper()
	m.t.Fatalf("seed %d step %d: %s\nreplay: DLM_MODEL_SEED=%d go test -run TestModelRandom ./dlm/",
		m.seed, m.step, fmt.Sprintf(format, args...), m.seed)
}

func (m *model) resource(name string) *mres {
	r := m.res[name]
	if r == nil {
		r = &mres{val: make([]byte, modelLVB), invalid: true} // never written
		m.res[name] = r
	}
	return r
}

func remove(q []*mlock, l *mlock) []*mlock {
	i := slices.Index(q, l)
	if i < 0 {
		return q
	}
	return slices.Delete(q, i, i+1)
}

func (m *model) pickMode() Mode { return Mode(m.rng.IntN(6)) }

func (m *model) fillLVB(l *mlock) {
	copy(l.lvb, fmt.Sprintf("v%d.%d", m.step, l.name))
}

// run performs one random operation.
func (m *model) run() {
	m.cur = nil
	var live []*mlock
	for _, l := range m.locks {
		if !l.orphan {
			live = append(live, l)
		}
	}
	slices.SortFunc(live, func(a, b *mlock) int { return int(a.name - b.name) })
	var pick *mlock
	if len(live) > 0 {
		pick = live[m.rng.IntN(len(live))]
	}
	k := m.rng.IntN(100)
	if os.Getenv("DLM_MODEL_TRACE") != "" {
		fmt.Printf("step %d: op %d\n", m.step, k)
	}
	switch {
	case k < 35 || pick == nil:
		m.newLock()
	case k < 60:
		m.convert(pick)
	case k < 80:
		m.unlock(pick)
	case k < 90:
		m.cancel(pick)
	case k < 93:
		m.purge(OwnerID(1 + m.rng.IntN(4)))
	default:
		m.adopt()
	}
	m.check()
}

func (m *model) newLock() {
	l := &mlock{name: m.names, owner: OwnerID(1 + m.rng.IntN(4)), res: fmt.Sprintf("r%d", m.rng.IntN(4)),
		gr: ModeIV, rq: m.pickMode(), lvb: make([]byte, modelLVB), lastBast: ModeIV}
	m.names++
	var f Flags
	for _, c := range []struct {
		f Flags
		p int
	}{{NoQueue, 20}, {HeadQue, 10}, {NoOrder, 8}, {AltPR, 8}, {AltCW, 8}, {ValBlk, 50}, {Persistent, 15}} {
		if m.rng.IntN(100) < c.p {
			f |= c.f
		}
	}
	if f&NoQueue != 0 && m.rng.IntN(2) == 0 {
		f |= NoQueueBast
	}
	if l.rq == NL && f&NoQueue == 0 && m.rng.IntN(3) == 0 {
		f |= Expedite
	}
	id, err := m.c.Lock(Request{Resource: l.res, Mode: l.rq, Flags: f, LVB: l.lvb, Owner: l.owner, Blocking: true, Tag: l})
	if err != nil {
		m.fail("lock %s %v %v refused: %v", l.res, l.rq, f, err)
	}
	l.id, l.flags, l.op, l.pending, l.persistent = id, f, "lock", true, f&Persistent != 0
	m.locks[id] = l
	m.cur = l
	m.drain()
	if l.pending {
		r := m.resource(l.res)
		l.state = stWaiting
		if f&HeadQue != 0 {
			r.wait = append([]*mlock{l}, r.wait...)
		} else {
			r.wait = append(r.wait, l)
		}
	}
}

func (m *model) convert(l *mlock) {
	rq := m.pickMode()
	var f Flags
	for _, c := range []struct {
		f Flags
		p int
	}{{NoQueue, 15}, {NoDlckWt, 10}, {ConvDeadlk, 10}, {HeadQue, 10}, {NoOrder, 8}, {AltPR, 5},
		{AltCW, 5}, {ValBlk, 50}, {IVValBlk, 8}, {Persistent, 15}} {
		if m.rng.IntN(100) < c.p {
			f |= c.f
		}
	}
	if f&NoQueue != 0 {
		f &^= ConvDeadlk
		if m.rng.IntN(2) == 0 {
			f |= NoQueueBast
		}
	}
	if l.state == stGranted && quecvtOK[l.gr][rq] && m.rng.IntN(4) == 0 {
		f |= QueCvt
	}
	m.fillLVB(l)
	err := m.c.Convert(l.id, rq, f, nil)
	if l.state != stGranted {
		if err == nil {
			m.fail("convert of %s lock %d accepted", l.state, l.name)
		}
		return
	}
	if err != nil {
		m.fail("convert %d %v->%v %v refused: %v", l.name, l.gr, rq, f, err)
	}
	l.rq, l.flags, l.op, l.pending, l.persistent = rq, f|Convert, "convert", true, f&Persistent != 0
	m.cur = l
	m.drain()
	if l.pending {
		r := m.resource(l.res)
		l.state = stConverting
		if f&HeadQue != 0 {
			r.conv = append([]*mlock{l}, r.conv...)
		} else {
			r.conv = append(r.conv, l)
		}
	}
}

func (m *model) unlock(l *mlock) {
	var f Flags
	if m.rng.IntN(2) == 0 {
		f |= ValBlk
	}
	if m.rng.IntN(10) == 0 {
		f |= IVValBlk
	}
	if l.pending && m.rng.IntN(2) == 0 {
		f |= ForceUnlock
	}
	m.fillLVB(l)
	info, _ := m.c.LockInfo(l.id)
	err := m.c.Unlock(l.id, f, nil)
	if l.pending && f&ForceUnlock == 0 {
		if err == nil {
			m.fail("unlock of pending lock %d accepted", l.name)
		}
		return
	}
	if err != nil {
		m.fail("unlock %d %v: %v", l.name, f, err)
	}
	// The LVB rule of an unlock, applied to the model at once: the unlock
	// completes within this call.
	r := m.resource(l.res)
	if info.Granted >= PW {
		if f&IVValBlk != 0 {
			r.invalid = true
		} else if f&ValBlk != 0 {
			copy(r.val, l.lvb)
			r.invalid = false
		}
	}
	l.op, l.pending = "unlock", true
	m.cur = l
	m.drain()
	if l.pending {
		m.fail("unlock of lock %d did not complete at once", l.name)
	}
}

func (m *model) cancel(l *mlock) {
	st := StatusCancel
	if m.rng.IntN(2) == 0 {
		st = StatusTimeout
	}
	if err := m.c.CancelStatus(l.id, st); err != nil {
		m.fail("cancel %d: %v", l.name, err)
	}
	if !l.pending && m.c.HasCallbacks() {
		m.fail("cancel of lock %d with nothing pending produced callbacks", l.name)
	}
	m.drain()
	if l.pending {
		m.fail("cancelled lock %d still pending", l.name)
	}
}

func (m *model) purge(owner OwnerID) {
	for _, l := range m.locks {
		if l.owner != owner || l.orphan {
			continue
		}
		r := m.resource(l.res)
		r.wait, r.conv = remove(r.wait, l), remove(r.conv, l)
		if l.persistent && l.state != stWaiting {
			info, _ := m.c.LockInfo(l.id)
			l.gr = info.Granted // a ConvDeadlk demotion the owner never heard of
			l.orphan, l.owner, l.pending, l.state = true, 0, false, stGranted
			continue
		}
		if os.Getenv("DLM_MODEL_TRACE") != "" {
			fmt.Printf("step %d: purge lock %d state %v persistent %v\n", m.step, l.name, l.state, l.persistent)
		}
		delete(m.locks, l.id)
	}
	m.c.PurgeOwner(owner)
	m.drain()
}

func (m *model) adopt() {
	for _, o := range m.sorted() {
		if !o.orphan {
			continue
		}
		owner := OwnerID(1 + m.rng.IntN(4))
		buf := make([]byte, modelLVB)
		id, err := m.c.Lock(Request{Resource: o.res, Mode: o.gr, Flags: Orphan | ValBlk, LVB: buf, Owner: owner, Blocking: true})
		if err != nil {
			m.fail("adopting an orphan (%v on %s): %v", o.gr, o.res, err)
		}
		// Any orphan of the resource in that mode may be the one adopted.
		l := m.locks[id]
		if l == nil || !l.orphan || l.res != o.res || l.gr != o.gr {
			m.fail("adoption of %v on %s returned lock %x, not a matching orphan", o.gr, o.res, id)
		}
		m.c.retag(id, l)
		l.orphan, l.owner, l.lvb, l.pending, l.op, l.flags, l.persistent = false, owner, buf, true, "adopt", ValBlk, false
		l.lastBast = ModeIV
		m.cur = l
		m.drain()
		return
	}
}

// drain applies the core's callbacks to the model, checking each.
func (m *model) drain() {
	for _, cb := range m.c.Callbacks() {
		l := cb.Tag.(*mlock)
		if m.locks[cb.Lock] != l {
			m.fail("callback %+v for unknown lock %d (op %s pending %v state %v)", cb, l.name, l.op, l.pending, l.state)
		}
		if cb.Kind == Blocking {
			if l.gr == ModeIV && !(l.state == stConverting) {
				m.fail("blocking callback to lock %d that holds nothing", l.name)
			}
			if l.lastBast == cb.Mode {
				m.fail("repeated blocking callback %v to lock %d", cb.Mode, l.name)
			}
			l.lastBast = cb.Mode
			continue
		}
		m.completion(l, cb)
	}
}

func (m *model) completion(l *mlock, cb Callback) {
	if os.Getenv("DLM_MODEL_TRACE") != "" {
		fmt.Printf("step %d: lock %d %s -> %v %v %v\n", m.step, l.name, l.op, cb.Status, cb.Mode, cb.Flags)
	}
	if !l.pending {
		m.fail("completion %v for lock %d with no operation pending", cb.Status, l.name)
	}
	l.pending = false
	l.lastBast = ModeIV
	r := m.resource(l.res)
	immediate := m.cur == l && l.state != stWaiting && l.state != stConverting
	if cb.Flags&Demoted != 0 && l.gr != ModeIV {
		l.gr = NL
	}
	switch cb.Status {
	case StatusOK:
		if l.op == "adopt" {
			if cb.Mode != l.gr {
				m.fail("adopted lock %d in %v, held %v", l.name, cb.Mode, l.gr)
			}
		} else {
			m.checkOrder(l, r, immediate)
		}
		switch {
		case l.op == "adopt":
		case cb.Mode == l.rq:
		case cb.Flags&AltMode != 0 && ((cb.Mode == PR && l.flags&AltPR != 0) || (cb.Mode == CW && l.flags&AltCW != 0)):
		default:
			m.fail("lock %d granted %v, asked %v (flags %v)", l.name, cb.Mode, l.rq, cb.Flags)
		}
		prev := l.gr
		r.wait, r.conv = remove(r.wait, l), remove(r.conv, l)
		l.state, l.gr, l.rq = stGranted, cb.Mode, ModeIV
		if l.op != "adopt" {
			switch lvbOperation(prev, cb.Mode) {
			case lvbRead:
				if l.flags&ValBlk != 0 && cb.Flags&ValNotValid == 0 && !bytes.Equal(l.lvb, r.val) {
					m.fail("lock %d read LVB %q, last written %q", l.name, l.lvb, r.val)
				}
			case lvbWrite:
				if l.flags&IVValBlk != 0 {
					r.invalid = true
				} else if l.flags&ValBlk != 0 {
					copy(r.val, l.lvb)
					r.invalid = false
				}
			}
		} else if l.flags&ValBlk != 0 && cb.Flags&ValNotValid == 0 && !bytes.Equal(l.lvb, r.val) {
			m.fail("adopter of lock %d read LVB %q, last written %q", l.name, l.lvb, r.val)
		}
		op := lvbOperation(prev, cb.Mode)
		told := op == lvbRead || (op == lvbWrite && l.flags&IVValBlk == 0) // the invalidator is not told
		if l.flags&ValBlk != 0 && told && (cb.Flags&ValNotValid != 0) != r.invalid {
			m.fail("lock %d granted with flags %v, LVB invalid=%v", l.name, cb.Flags, r.invalid)
		}
	case StatusAgain, StatusDeadlock, StatusCancel, StatusTimeout:
		if cb.Status == StatusAgain && l.flags&NoQueue == 0 {
			m.fail("EAGAIN for lock %d without NOQUEUE", l.name)
		}
		if cb.Status == StatusDeadlock && (l.op != "convert" || l.flags&(NoDlckWt|ConvDeadlk) != 0) {
			m.fail("EDEADLK for lock %d op %s flags %v", l.name, l.op, l.flags)
		}
		r.wait, r.conv = remove(r.wait, l), remove(r.conv, l)
		if l.gr == ModeIV {
			if cb.Mode != ModeIV {
				m.fail("failed request %d left mode %v", l.name, cb.Mode)
			}
			delete(m.locks, l.id)
			return
		}
		if cb.Mode != l.gr {
			m.fail("failed conversion of %d left mode %v, held %v", l.name, cb.Mode, l.gr)
		}
		l.state, l.rq = stGranted, ModeIV
	case StatusUnlock:
		r.wait, r.conv = remove(r.wait, l), remove(r.conv, l)
		if cb.Mode != ModeIV {
			m.fail("unlocked lock %d reports mode %v", l.name, cb.Mode)
		}
		delete(m.locks, l.id)
	default:
		m.fail("unexpected status %v for lock %d", cb.Status, l.name)
	}
}

// checkOrder checks the grant-order rules for a grant of l.
func (m *model) checkOrder(l *mlock, r *mres, immediate bool) {
	if l.flags&(NoOrder|Expedite) != 0 {
		return
	}
	conv := l.gr != ModeIV
	switch {
	case immediate && !conv && l.flags&HeadQue != 0:
		if len(r.conv) > 0 {
			m.fail("HEADQUE request %d granted at once past %d converting", l.name, len(r.conv))
		}
	case immediate && !conv:
		if len(r.wait) > 0 || len(r.conv) > 0 {
			m.fail("new request %d granted at once past %d waiting, %d converting", l.name, len(r.wait), len(r.conv))
		}
	case immediate && conv:
		if l.flags&QueCvt != 0 && l.flags&HeadQue == 0 && len(r.conv) > 0 {
			m.fail("QUECVT conversion %d granted past %d queued conversions", l.name, len(r.conv))
		}
	case !conv:
		if len(r.conv) > 0 || r.wait[0] != l {
			m.fail("waiting request %d granted out of order", l.name)
		}
	default:
		if r.conv[0] != l {
			m.fail("queued conversion %d granted out of order", l.name)
		}
	}
}

// check verifies the invariants that hold between steps.
func (m *model) check() {
	if m.c.HasCallbacks() {
		m.fail("callbacks left undrained")
	}
	for _, ri := range m.c.Resources() {
		var held []LockInfo
		held = append(held, ri.Granted...)
		held = append(held, ri.Converting...)
		for i := range held {
			for j := i + 1; j < len(held); j++ {
				if !refCompatible(held[i].Granted, held[j].Granted) {
					m.fail("%s: %v and %v granted together", ri.Name, held[i].Granted, held[j].Granted)
				}
			}
		}
		// Liveness: nothing grantable left queued.
		if len(ri.Converting) > 0 {
			head := ri.Converting[0]
			ok := true
			for _, o := range held {
				if o.ID != head.ID && !refCompatible(o.Granted, head.Requested) {
					ok = false
				}
			}
			if ok {
				m.fail("%s: conversion %v>%v at the head is grantable but waits", ri.Name, head.Granted, head.Requested)
			}
		} else if len(ri.Waiting) > 0 {
			head := ri.Waiting[0]
			ok := true
			for _, o := range held {
				if !refCompatible(o.Granted, head.Requested) {
					ok = false
				}
			}
			if ok {
				m.fail("%s: request %v at the head of the wait queue is grantable but waits: %+v", ri.Name, head.Requested, ri)
			}
		}
	}
	// The model's own view agrees on queue order.
	for name, r := range m.res {
		ri, _ := m.c.Resource(name)
		if got, want := idsOf(ri.Waiting), mids(r.wait); !slices.Equal(got, want) {
			m.fail("%s wait queue %v, model %v", name, got, want)
		}
		if got, want := idsOf(ri.Converting), mids(r.conv); !slices.Equal(got, want) {
			m.fail("%s convert queue %v, model %v", name, got, want)
		}
	}
}

func idsOf(ls []LockInfo) []LockID {
	var out []LockID
	for _, l := range ls {
		out = append(out, l.ID)
	}
	return out
}

func mids(ls []*mlock) []LockID {
	var out []LockID
	for _, l := range ls {
		out = append(out, l.id)
	}
	return out
}

// finish cancels and releases everything and checks every operation ended.
func (m *model) finish() {
	m.step = -1
	for _, l := range m.sorted() {
		if l.pending {
			if err := m.c.CancelStatus(l.id, StatusCancel); err != nil {
				m.fail("final cancel %d: %v", l.name, err)
			}
			m.drain()
		}
	}
	for len(m.locks) > 0 {
		l := m.sorted()[0]
		if l.orphan {
			m.cur = nil
			buf := make([]byte, modelLVB)
			id, err := m.c.Lock(Request{Resource: l.res, Mode: l.gr, Flags: Orphan, LVB: buf, Owner: 1})
			if err != nil {
				m.fail("final adopt %d: %v", l.name, err)
			}
			l = m.locks[id]
			m.c.retag(id, l)
			l.orphan, l.pending, l.op, l.owner, l.lvb, l.flags = false, true, "adopt", 1, buf, 0
			m.drain()
		}
		if l.pending {
			m.fail("lock %d still pending after cancel", l.name)
		}
		l.op, l.pending = "unlock", true
		if err := m.c.Unlock(l.id, 0, nil); err != nil {
			m.fail("final unlock %d: %v", l.name, err)
		}
		m.drain()
	}
	if len(m.locks) != 0 {
		m.fail("%d locks left in the model", len(m.locks))
	}
	if rs := m.c.Resources(); len(rs) != 0 {
		m.fail("resources left with locks: %+v", rs)
	}
}

func (m *model) sorted() []*mlock {
	var out []*mlock
	for _, l := range m.locks {
		out = append(out, l)
	}
	slices.SortFunc(out, func(a, b *mlock) int { return a.name - b.name })
	return out
}

func runModel(t *testing.T, seed uint64, steps int) {
	c, err := NewCore(CoreConfig{LVBLen: modelLVB})
	if err != nil {
		t.Fatal(err)
	}
	m := &model{t: t, seed: seed, rng: rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)), c: c,
		locks: map[LockID]*mlock{}, res: map[string]*mres{}}
	for m.step = 0; m.step < steps; m.step++ {
		m.run()
	}
	m.finish()
}

func TestModelRandom(t *testing.T) {
	forSeeds(t, "DLM_MODEL_SEED", "DLM_MODEL_SEEDS", 300, func(seed uint64) { runModel(t, seed, 400) })
}

// forSeeds runs a seeded test: the one seed named by the environment
// variable one, or seeds 1..N (N from many, default n), stopping at the first
// failure (whose message prints the replay command).
func forSeeds(t *testing.T, one, many string, n int, run func(seed uint64)) {
	t.Helper()
	if s := os.Getenv(one); s != "" {
		seed, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("%s: %v", one, err)
		}
		run(seed)
		return
	}
	if s := os.Getenv(many); s != "" {
		v, err := strconv.Atoi(s)
		if err != nil {
			t.Fatalf("%s: %v", many, err)
		}
		n = v
	}
	for seed := uint64(1); seed <= uint64(n); seed++ {
		run(seed)
		if t.Failed() {
			return
		}
	}
}
