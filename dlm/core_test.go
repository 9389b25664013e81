package dlm

import (
	"bytes"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// harness drives a Core with named locks and renders its callbacks as a log
// such as "a: OK PR" or "b: bast EX", so tests can state exactly what the
// owners must see.
type harness struct {
	t    *testing.T
	c    *Core
	ids  map[string]LockID
	name map[LockID]string
	lvb  map[string][]byte
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	c, err := NewCore(CoreConfig{LVBLen: 16})
	if err != nil {
		t.Fatal(err)
	}
	return &harness{t: t, c: c, ids: map[string]LockID{}, name: map[LockID]string{}, lvb: map[string][]byte{}}
}

// lock requests resource r in mode m for lock n (owner 1, blocking callbacks
// on) and returns the error of the call.
func (h *harness) lock(n, r string, m Mode, f Flags) error {
	return h.lockOwner(n, r, m, f, 1)
}

func (h *harness) lockOwner(n, r string, m Mode, f Flags, owner OwnerID) error {
	h.t.Helper()
	buf := make([]byte, 16)
	id, err := h.c.Lock(Request{Resource: r, Mode: m, Flags: f, LVB: buf, Owner: owner, Blocking: true, Tag: n})
	if err == nil {
		h.ids[n] = id
		h.name[id] = n
		h.lvb[n] = buf
	}
	return err
}

func (h *harness) convert(n string, m Mode, f Flags) error {
	h.t.Helper()
	return h.c.Convert(h.ids[n], m, f, nil)
}

func (h *harness) unlock(n string, f Flags) error {
	h.t.Helper()
	return h.c.Unlock(h.ids[n], f, nil)
}

// log returns and clears the callbacks produced so far.
func (h *harness) log() string {
	var parts []string
	for _, cb := range h.c.Callbacks() {
		n := cb.Tag.(string)
		switch cb.Kind {
		case Completion:
			s := fmt.Sprintf("%s: %s %v", n, statusWord(cb.Status), cb.Mode)
			if cb.Flags != 0 {
				s += " " + cb.Flags.String()
			}
			parts = append(parts, s)
		case Blocking:
			parts = append(parts, fmt.Sprintf("%s: bast %v", n, cb.Mode))
		}
	}
	return strings.Join(parts, "; ")
}

func statusWord(s Status) string {
	return [...]string{"OK", "EAGAIN", "EDEADLK", "ECANCEL", "EUNLOCK", "ETIMEDOUT", "EBUSY", "EINVAL", "ENOENT", "RELEASED"}[s]
}

// expect checks the callback log since the last call.
func (h *harness) expect(want string) {
	h.t.Helper()
	if got := h.log(); got != want {
		h.t.Fatalf("callbacks:\n got: %s\nwant: %s", got, want)
	}
}

func (h *harness) must(err error) {
	h.t.Helper()
	if err != nil {
		h.t.Fatal(err)
	}
}

// queues renders a resource's queues, e.g. "G[a:PR b:PR] C[c:PR>EX] W[d:EX]".
func (h *harness) queues(r string) string {
	ri, _ := h.c.Resource(r)
	f := func(tag string, ls []LockInfo) string {
		var p []string
		for _, l := range ls {
			s := h.name[l.ID] + ":"
			switch l.State {
			case "granted":
				s += l.Granted.String()
			case "converting":
				s += l.Granted.String() + ">" + l.Requested.String()
			default:
				s += l.Requested.String()
			}
			p = append(p, s)
		}
		return tag + "[" + strings.Join(p, " ") + "]"
	}
	return f("G", ri.Granted) + " " + f("C", ri.Converting) + " " + f("W", ri.Waiting)
}

func (h *harness) expectQueues(r, want string) {
	h.t.Helper()
	if got := h.queues(r); got != want {
		h.t.Fatalf("queues of %s:\n got: %s\nwant: %s", r, got, want)
	}
}

var allModes = []Mode{NL, CR, CW, PR, PW, EX}

func TestCompatibilityMatrix(t *testing.T) {
	// The pairs that conflict, written out independently of the table.
	conflict := map[[2]Mode]bool{}
	for _, p := range [][2]Mode{
		{CR, EX}, {CW, PR}, {CW, PW}, {CW, EX}, {PR, PW}, {PR, EX}, {PW, PW}, {PW, EX}, {EX, EX},
	} {
		conflict[p] = true
		conflict[[2]Mode{p[1], p[0]}] = true
	}
	for _, a := range allModes {
		for _, b := range allModes {
			want := !conflict[[2]Mode{a, b}]
			if refCompatible(a, b) != want {
				t.Fatalf("the tests' reference matrix disagrees with the conflict list at %v,%v", a, b)
			}
			if Compatible(a, b) != want {
				t.Errorf("Compatible(%v,%v) = %v, want %v", a, b, !want, want)
			}
			// And the engine enforces it.
			h := newHarness(t)
			h.must(h.lock("a", "r", a, 0))
			h.must(h.lock("b", "r", b, NoQueue))
			got := h.log()
			w := fmt.Sprintf("a: OK %v; b: OK %v", a, b)
			if !want {
				w = fmt.Sprintf("a: OK %v; b: EAGAIN IV", a)
			}
			if got != w {
				t.Errorf("%v then %v: got %q want %q", a, b, got, w)
			}
		}
	}
}

func TestModeNamesAndParse(t *testing.T) {
	for _, m := range allModes {
		p, err := ParseMode(m.String())
		if err != nil || p != m {
			t.Errorf("ParseMode(%q) = %v, %v", m.String(), p, err)
		}
	}
	if _, err := ParseMode("XX"); !errors.Is(err, ErrInvalid) {
		t.Errorf("ParseMode(XX) err = %v", err)
	}
}

func TestNewRequestsWaitInOrder(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", EX, 0))
	// c is compatible with the granted PR but must not pass b (6-4).
	h.must(h.lock("c", "r", PR, 0))
	// NL is compatible with everything and still queues behind b.
	h.must(h.lock("d", "r", NL, 0))
	h.expect("a: OK PR; a: bast EX")
	h.expectQueues("r", "G[a:PR] C[] W[b:EX c:PR d:NL]")
	h.must(h.unlock("a", 0))
	h.expect("a: EUNLOCK IV; b: OK EX; b: bast PR")
	h.must(h.unlock("b", 0))
	h.expect("b: EUNLOCK IV; c: OK PR; d: OK NL")
}

func TestConversionsBeforeWaiters(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.lock("c", "r", EX, 0))
	h.must(h.convert("a", EX, 0)) // blocked by b's PR: queued
	h.expectQueues("r", "G[b:PR] C[a:PR>EX] W[c:EX]")
	h.log()
	h.must(h.unlock("b", 0))
	// The conversion goes first, although c asked earlier; a, granted
	// anew, is told that c waits.
	h.expect("b: EUNLOCK IV; a: OK EX; a: bast EX")
	h.expectQueues("r", "G[a:EX] C[] W[c:EX]")
}

func TestConversionGrantedInPlace(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", EX, 0))
	h.log()
	// Compatible with every granted lock: granted at once despite waiter b (6-3).
	h.must(h.convert("a", PW, 0))
	// Granted anew, a is told again that b waits.
	h.expect("a: OK PW; a: bast EX")
	// A down-conversion is always granted.
	h.must(h.convert("a", NL, 0))
	h.expect("a: OK NL; b: OK EX")
}

func TestQueCvt(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.lock("c", "r", NL, 0))
	h.must(h.convert("b", PW, 0)) // queued behind a's PR
	h.log()
	// c's NL->CR is compatible with everything granted, but QUECVT makes it
	// take its turn behind b.
	h.must(h.convert("c", CR, QueCvt))
	h.expectQueues("r", "G[a:PR] C[b:PR>PW c:NL>CR] W[]")
	h.expect("")
	h.must(h.unlock("a", 0))
	h.expect("a: EUNLOCK IV; b: OK PW; c: OK CR")
	// Without QUECVT the same conversion is granted in place.
	h3 := newHarness(t)
	h3.must(h3.lock("a", "r", PR, 0))
	h3.must(h3.lock("b", "r", PR, 0))
	h3.must(h3.lock("c", "r", NL, 0))
	h3.must(h3.convert("b", PW, 0))
	h3.log()
	h3.must(h3.convert("c", CR, 0))
	h3.expect("c: OK CR")

	// With the convert queue empty, QUECVT changes nothing.
	h2 := newHarness(t)
	h2.must(h2.lock("a", "r", NL, 0))
	h2.must(h2.convert("a", PR, QueCvt))
	h2.expect("a: OK NL; a: OK PR")
	// QUECVT is for up-conversions only.
	if err := h2.convert("a", NL, QueCvt); !errors.Is(err, ErrInvalid) {
		t.Fatalf("QUECVT down-conversion: %v", err)
	}
	if err := h2.lock("x", "r", PR, QueCvt); !errors.Is(err, ErrInvalid) {
		t.Fatalf("QUECVT on a new request: %v", err)
	}
}

func TestHeadQue(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", EX, 0))
	h.must(h.lock("b", "r", EX, 0))
	h.must(h.lock("c", "r", EX, HeadQue))
	h.expectQueues("r", "G[a:EX] C[] W[c:EX b:EX]")
	h.log()
	h.must(h.unlock("a", 0))
	h.expect("a: EUNLOCK IV; c: OK EX; c: bast EX")

	// A HEADQUE request that is grantable at the head is granted at once.
	h = newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", EX, 0))
	h.must(h.lock("c", "r", PR, HeadQue))
	h.expect("a: OK PR; a: bast EX; c: OK PR")
	h.expectQueues("r", "G[a:PR c:PR] C[] W[b:EX]")

	// On the convert queue too.
	h = newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.lock("c", "r", NL, 0))
	h.must(h.convert("b", EX, 0))
	h.must(h.convert("c", EX, HeadQue))
	h.expectQueues("r", "G[a:PR] C[c:NL>EX b:PR>EX] W[]")
}

func TestNoOrder(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", EX, 0))
	h.must(h.lock("c", "r", PR, NoOrder))
	h.expect("a: OK PR; a: bast EX; c: OK PR")
	// NOORDER grants out of order only when compatible with the granted locks.
	h.must(h.lock("d", "r", PW, NoOrder))
	h.expectQueues("r", "G[a:PR c:PR] C[] W[b:EX d:PW]")
	h.log()
	// When the queue is re-examined, a NOORDER waiter may pass the head.
	h.must(h.unlock("a", 0))
	h.must(h.unlock("c", 0))
	h.expect("a: EUNLOCK IV; c: bast EX; c: EUNLOCK IV; b: OK EX; b: bast PW")
}

func TestExpedite(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", EX, 0))
	h.must(h.lock("b", "r", EX, 0))
	h.must(h.lock("c", "r", NL, Expedite))
	h.expect("a: OK EX; a: bast EX; c: OK NL")
	for _, tc := range []struct {
		m Mode
		f Flags
	}{{PR, Expedite}, {NL, Expedite | NoQueue}} {
		if err := h.lock("x", "r", tc.m, tc.f); !errors.Is(err, ErrInvalid) {
			t.Errorf("%v %v: err %v, want ErrInvalid", tc.m, tc.f, err)
		}
	}
	h.must(h.convert("c", NL, 0))
	h.log()
	if err := h.convert("c", NL, Expedite); !errors.Is(err, ErrInvalid) {
		t.Errorf("EXPEDITE conversion: err %v", err)
	}
}

func TestNoQueue(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", EX, NoQueue))
	// No blocking callback for a refused NOQUEUE request, and b is gone.
	h.expect("a: OK PR; b: EAGAIN IV")
	if _, ok := h.c.LockInfo(h.ids["b"]); ok {
		t.Fatal("refused request left a lock behind")
	}
	// A refused NOQUEUE conversion keeps the lock in its mode.
	h.must(h.lock("c", "r", PR, 0))
	h.must(h.convert("c", EX, NoQueue))
	h.expect("c: OK PR; c: EAGAIN PR")
	h.expectQueues("r", "G[a:PR c:PR] C[] W[]")
}

func TestNoQueueBast(t *testing.T) {
	setup := func() *harness {
		h := newHarness(t)
		h.must(h.lock("a", "r", PR, 0))
		h.must(h.lock("c", "r", PR, 0))
		h.must(h.convert("c", PW, 0)) // c converting PR>PW, blocked by a
		h.expect("a: OK PR; c: OK PR; a: bast PW")
		return h
	}
	h := setup()
	h.must(h.lock("d", "r", EX, NoQueue|NoQueueBast))
	// Granted holders and converting locks whose granted mode blocks d are told.
	h.expect("a: bast EX; c: bast EX; d: EAGAIN IV")
	h = setup()
	h.must(h.lock("d", "r", EX, NoQueue))
	h.expect("d: EAGAIN IV")
}

func TestConversionDeadlockCancelsLaterConversion(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.convert("a", EX, 0))
	h.expect("a: OK PR; b: OK PR; b: bast EX")
	h.must(h.convert("b", EX, 0))
	h.expect("b: EDEADLK PR")
	h.expectQueues("r", "G[b:PR] C[a:PR>EX] W[]")
	h.must(h.unlock("b", 0))
	h.expect("b: EUNLOCK IV; a: OK EX")
}

func TestConversionDeadlockNLFirst(t *testing.T) {
	// The Linux example: NL->EX queued first, PR->EX second.
	h := newHarness(t)
	h.must(h.lock("a", "r", NL, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.lock("c", "r", PR, 0))
	h.must(h.convert("a", EX, 0))
	h.log()
	h.must(h.convert("b", EX, 0))
	h.expect("b: EDEADLK PR")
}

func TestConvDeadlkDemotes(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.convert("a", EX, 0))
	h.log()
	h.must(h.convert("b", EX, ConvDeadlk))
	// b is demoted to NL, which lets a through; b waits at NL>EX.
	h.expect("a: OK EX; a: bast EX")
	h.expectQueues("r", "G[a:EX] C[b:NL>EX] W[]")
	h.must(h.unlock("a", 0))
	h.expect("a: EUNLOCK IV; b: OK EX DEMOTED")
	if err := h.convert("b", NL, ConvDeadlk|NoQueue); !errors.Is(err, ErrInvalid) {
		t.Fatalf("CONVDEADLK|NOQUEUE: %v", err)
	}
}

func TestNoDlckWtSendsBlockingCallback(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.convert("a", PW, 0))
	h.expect("a: OK PR; b: OK PR; b: bast PW")
	h.must(h.convert("b", EX, NoDlckWt))
	// The deadlock stays; b is asked to resolve it.
	h.expect("b: bast EX")
	h.expectQueues("r", "G[] C[a:PR>PW b:PR>EX] W[]")
	h.must(h.c.CancelStatus(h.ids["b"], StatusCancel))
	h.expect("b: ECANCEL PR")
	h.must(h.unlock("b", 0))
	h.expect("b: EUNLOCK IV; a: OK PW")
}

func TestAltModes(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", EX, AltPR))
	h.expect("a: OK PR; b: OK PR ALTMODE")
	h = newHarness(t)
	h.must(h.lock("a", "r", CW, 0))
	h.must(h.lock("b", "r", EX, AltCW|NoQueue))
	h.expect("a: OK CW; b: OK CW ALTMODE")
	// When neither mode can be granted the request waits for its own mode.
	h.must(h.lock("c", "r", EX, AltPR))
	h.expect("a: bast EX; b: bast EX")
	h.expectQueues("r", "G[a:CW b:CW] C[] W[c:EX]")
}

func TestCancel(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", EX, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.lock("c", "r", PR, 0))
	h.log()
	// Nothing pending: nothing happens, no callback.
	h.must(h.unlock("a", Cancel))
	h.expect("")
	h.must(h.unlock("b", Cancel))
	h.expect("b: ECANCEL IV")
	// a converting is returned to its granted mode.
	h = newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.convert("a", EX, 0))
	h.log()
	h.must(h.c.CancelStatus(h.ids["a"], StatusTimeout))
	h.expect("a: ETIMEDOUT PR")
	h.expectQueues("r", "G[b:PR a:PR] C[] W[]")
	// Cancelling the head of the wait queue lets the next through.
	h = newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", EX, 0))
	h.must(h.lock("c", "r", PR, 0))
	h.log()
	h.must(h.unlock("b", Cancel))
	h.expect("b: ECANCEL IV; c: OK PR")
}

func TestUnlockAndForceUnlock(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", EX, 0))
	h.must(h.lock("b", "r", EX, 0))
	h.log()
	if err := h.unlock("b", 0); !errors.Is(err, ErrBusy) {
		t.Fatalf("unlock of a waiting lock: %v, want ErrBusy", err)
	}
	h.must(h.unlock("b", ForceUnlock))
	// One completion ends both the request and the unlock.
	h.expect("b: EUNLOCK IV")
	h.must(h.unlock("a", 0))
	h.expect("a: EUNLOCK IV")
	if err := h.unlock("a", 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second unlock: %v, want ErrNotFound", err)
	}
	if err := h.unlock("a", Cancel|ForceUnlock); !errors.Is(err, ErrInvalid) {
		t.Fatalf("CANCEL|FORCEUNLOCK: %v", err)
	}
	if err := h.unlock("a", NoQueue); !errors.Is(err, ErrInvalid) {
		t.Fatalf("NOQUEUE on unlock: %v", err)
	}
}

func TestLVBRules(t *testing.T) {
	val := func(s string) []byte { b := make([]byte, 16); copy(b, s); return b }
	h := newHarness(t)
	h.must(h.lock("w", "r", EX, ValBlk))
	copy(h.lvb["w"], val("one"))
	// EX -> NL with VALBLK writes.
	h.must(h.convert("w", NL, ValBlk))
	ri, _ := h.c.Resource("r")
	if !bytes.Equal(ri.LVB, val("one")) || ri.LVBSeq != 1 {
		t.Fatalf("after EX->NL: lvb %q seq %d", ri.LVB, ri.LVBSeq)
	}
	// A grant with VALBLK reads, and learns the sequence.
	h.must(h.lock("r1", "r", PR, ValBlk))
	if !bytes.Equal(h.lvb["r1"], val("one")) {
		t.Fatalf("reader got %q", h.lvb["r1"])
	}
	// A grant without VALBLK leaves the caller's buffer alone.
	h.must(h.lock("r2", "r", PR, 0))
	if !bytes.Equal(h.lvb["r2"], make([]byte, 16)) {
		t.Fatalf("reader without VALBLK got %q", h.lvb["r2"])
	}
	// PR -> NL with VALBLK does not write.
	copy(h.lvb["r1"], val("junk"))
	h.must(h.convert("r1", NL, ValBlk))
	// Unlock from PR does not write either.
	h.must(h.unlock("r2", ValBlk))
	ri, _ = h.c.Resource("r")
	if !bytes.Equal(ri.LVB, val("one")) || ri.LVBSeq != 1 {
		t.Fatalf("after PR releases: lvb %q seq %d", ri.LVB, ri.LVBSeq)
	}
	h.log()
	// NL -> PW reads; PW unlock with VALBLK writes.
	h.must(h.convert("w", PW, ValBlk))
	if !bytes.Equal(h.lvb["w"], val("one")) {
		t.Fatalf("NL->PW read %q", h.lvb["w"])
	}
	copy(h.lvb["w"], val("two"))
	h.must(h.unlock("w", ValBlk))
	ri, _ = h.c.Resource("r")
	if !bytes.Equal(ri.LVB, val("two")) || ri.LVBSeq != 2 {
		t.Fatalf("after PW unlock: lvb %q seq %d", ri.LVB, ri.LVBSeq)
	}
	// PW -> EX reads rather than writes.
	h.must(h.lock("p", "r", PW, ValBlk))
	copy(h.lvb["p"], val("never"))
	h.must(h.convert("p", EX, ValBlk))
	if !bytes.Equal(h.lvb["p"], val("two")) {
		t.Fatalf("PW->EX: %q", h.lvb["p"])
	}
	h.log()
	// IVVALBLK on unlock from EX invalidates; the next grant reports it.
	h.must(h.unlock("p", IVValBlk))
	h.must(h.lock("q", "r", EX, ValBlk))
	h.expect("p: EUNLOCK IV; q: OK EX VALNOTVALID")
	// A new value clears it.
	copy(h.lvb["q"], val("three"))
	h.must(h.convert("q", NL, ValBlk))
	h.must(h.convert("q", PR, ValBlk))
	h.expect("q: OK NL; q: OK PR")
	// IVVALBLK on a down-conversion from PW invalidates too.
	h.must(h.convert("q", NL, 0))
	h.must(h.convert("q", PW, 0))
	h.must(h.convert("q", CR, IVValBlk))
	h.log()
	h.must(h.convert("q", PR, ValBlk))
	h.expect("q: OK PR VALNOTVALID")
	// Unlock from PR with IVVALBLK does nothing (only PW/EX holders count);
	// a value never written is not valid either.
	h2 := newHarness(t)
	h2.must(h2.lock("a", "r", PR, 0))
	h2.must(h2.unlock("a", IVValBlk))
	h2.must(h2.lock("b", "r", PR, ValBlk))
	h2.expect("a: OK PR; a: EUNLOCK IV; b: OK PR VALNOTVALID")
	h2.must(h2.convert("b", EX, ValBlk))
	h2.must(h2.convert("b", NL, ValBlk))
	h2.must(h2.convert("b", PR, ValBlk))
	h2.expect("b: OK EX VALNOTVALID; b: OK NL; b: OK PR")
}

func TestLVBKeptWhileResourceCached(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("w", "r", EX, ValBlk))
	copy(h.lvb["w"], "cached")
	h.must(h.unlock("w", ValBlk))
	h.must(h.lock("x", "r", PR, ValBlk))
	if !bytes.HasPrefix(h.lvb["x"], []byte("cached")) {
		t.Fatalf("LVB lost: %q", h.lvb["x"])
	}
}

func TestTossLimitDropsIdleResources(t *testing.T) {
	c, _ := NewCore(CoreConfig{LVBLen: 8, TossLimit: 2})
	for _, n := range []string{"a", "b", "c"} {
		id, err := c.Lock(Request{Resource: n, Mode: EX, Owner: 1})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Unlock(id, 0, nil); err != nil {
			t.Fatal(err)
		}
	}
	if _, ok := c.Resource("a"); ok {
		t.Error("oldest idle resource still cached past the toss limit")
	}
	if _, ok := c.Resource("c"); !ok {
		t.Error("newest idle resource dropped")
	}
}

func TestBlockingCallbacks(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", PW, 0))
	h.expect("a: OK PR; a: bast PW")
	// Same mode again: suppressed (highbast).
	h.must(h.lock("c", "r", PW, 0))
	h.expect("")
	// A more restrictive mode is sent.
	h.must(h.lock("d", "r", EX, 0))
	h.expect("a: bast EX")
	// A holder whose mode does not block the request is not told.
	h = newHarness(t)
	h.must(h.lock("a", "r", CR, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.lock("c", "r", PW, 0))
	h.expect("a: OK CR; b: OK PR; b: bast PW")
	// Locks that asked for no blocking callbacks get none.
	h2 := newHarness(t)
	_, err := h2.c.Lock(Request{Resource: "r", Mode: EX, Owner: 1, Tag: "q"})
	h2.must(err)
	h2.must(h2.lock("z", "r", EX, 0))
	h2.expect("q: OK EX")
}

func TestBlockingCallbackResetOnGrant(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", EX, 0))
	h.must(h.lock("b", "r", EX, 0))
	h.expect("a: OK EX; a: bast EX")
	h.must(h.unlock("a", 0))
	h.expect("a: EUNLOCK IV; b: OK EX")
	h.must(h.lock("c", "r", EX, 0))
	// b was granted since its last blocking callback: told again.
	h.expect("b: bast EX")
}

func TestBlockingCallbackFollowsGrantedMode(t *testing.T) {
	// b drops to NL while c waits for EX: NL blocks nothing, so b is not
	// told; back at CR it blocks EX again and is told again.
	h := newHarness(t)
	h.must(h.lock("b", "r", PR, 0))
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("c", "r", EX, 0))
	h.expect("b: OK PR; a: OK PR; b: bast EX; a: bast EX")
	h.must(h.convert("b", NL, 0))
	h.expect("b: OK NL")
	h.must(h.convert("b", CR, 0))
	h.expect("b: OK CR; b: bast EX")
}

func TestBlockingCallbackSuppressionRules(t *testing.T) {
	// Linux's queue-time rules, applied to one lock directly.
	c, _ := NewCore(CoreConfig{})
	l := &lkb{blocking: true, lastCastMode: NL, lastCbMode: NL, tag: "l"}
	// Compatible with the mode the owner was last told it holds: skipped.
	c.queueBast(l, EX)
	if n := len(c.Callbacks()); n != 0 {
		t.Fatalf("bast EX to an NL holder queued (%d callbacks)", n)
	}
	l.lastCastMode, l.lastCbMode = PR, PR
	c.queueBast(l, PW)
	c.queueBast(l, PW) // same mode right after: skipped
	c.queueBast(l, CW) // less restrictive than PW (> PR): skipped
	c.queueBast(l, EX) // more restrictive: queued
	var got []Mode
	for _, cb := range c.Callbacks() {
		got = append(got, cb.Mode)
	}
	if !reflect.DeepEqual(got, []Mode{PW, EX}) {
		t.Fatalf("basts queued: %v, want [PW EX]", got)
	}
	// After a bast for PR, a CW bast still goes out (PR/CW inversion).
	l = &lkb{blocking: true, lastCastMode: EX, lastCbMode: EX, tag: "m"}
	c.queueBast(l, PR)
	c.queueBast(l, CW)
	if n := len(c.Callbacks()); n != 2 {
		t.Fatalf("PR then CW: %d basts, want 2", n)
	}
}

func TestPRCWBlockingCallbacks(t *testing.T) {
	// PR holders asked by a CW request get bast(CW); CW holders by PR get bast(PR).
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", CW, 0))
	h.expect("a: OK PR; a: bast CW")
	h = newHarness(t)
	h.must(h.lock("a", "r", CW, 0))
	h.must(h.lock("b", "r", PR, 0))
	h.expect("a: OK CW; a: bast PR")
}

func TestPersistentAndOrphans(t *testing.T) {
	h := newHarness(t)
	h.must(h.lockOwner("p", "r", PW, Persistent|ValBlk, 1))
	h.must(h.lockOwner("t", "t", EX, 0, 1))
	h.must(h.lockOwner("w", "t", EX, 0, 2))
	copy(h.lvb["p"], "kept")
	h.must(h.convert("p", PW, ValBlk|Persistent)) // PW->PW writes the LVB
	h.log()
	orph, rel := h.c.PurgeOwner(1)
	if orph != 1 || rel != 1 {
		t.Fatalf("PurgeOwner = %d orphaned, %d released; want 1, 1", orph, rel)
	}
	// The purged non-persistent lock made room; no callback for the purged owner.
	h.expect("w: OK EX")
	ri, _ := h.c.Resource("r")
	if len(ri.Granted) != 1 || !ri.Granted[0].Orphan || ri.Granted[0].Granted != PW {
		t.Fatalf("orphan not kept: %+v", ri)
	}
	// The orphan still blocks others.
	h.must(h.lockOwner("x", "r", EX, NoQueue, 2))
	h.expect("x: EAGAIN IV")
	// Wrong mode: EAGAIN; no orphans at all: ENOENT.
	if err := h.lockOwner("y", "r", EX, Orphan, 2); !errors.Is(err, ErrAgain) {
		t.Fatalf("adopt in another mode: %v", err)
	}
	if err := h.lockOwner("y", "none", PW, Orphan, 2); !errors.Is(err, ErrNotFound) {
		t.Fatalf("adopt with no orphan: %v", err)
	}
	h.must(h.lockOwner("y", "r", PW, Orphan|ValBlk, 2))
	if h.ids["y"] != h.ids["p"] {
		t.Fatalf("adoption made a new lock %x, want the orphan %x", h.ids["y"], h.ids["p"])
	}
	h.expect("y: OK PW")
	if !bytes.HasPrefix(h.lvb["y"], []byte("kept")) {
		t.Fatalf("adopted LVB %q", h.lvb["y"])
	}
	// Adopted: an ordinary lock again.
	h.must(h.unlock("y", 0))
	h.expect("y: EUNLOCK IV")
}

func TestInvalidRequestsChangeNothing(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("b", "r", EX, 0))
	h.log()
	before := h.c.Resources()
	long := strings.Repeat("x", MaxResourceName+1)
	cases := []struct {
		name string
		err  error
		do   func() error
	}{
		{"unknown mode", ErrInvalid, func() error { return h.lock("x", "r", Mode(9), 0) }},
		{"mode IV", ErrInvalid, func() error { return h.lock("x", "r", ModeIV, 0) }},
		{"name too long", ErrInvalid, func() error { return h.lock("x", long, PR, 0) }},
		{"empty name", ErrInvalid, func() error { return h.lock("x", "", PR, 0) }},
		{"unlock flag on lock", ErrInvalid, func() error { return h.lock("x", "r", PR, ForceUnlock) }},
		{"convert flag on lock", ErrInvalid, func() error { return h.lock("x", "r", PR, Convert) }},
		{"convdeadlk on lock", ErrInvalid, func() error { return h.lock("x", "r", PR, ConvDeadlk) }},
		{"owner zero", ErrInvalid, func() error { return h.lockOwner("x", "r", PR, 0, 0) }},
		{"lvb wrong size", ErrInvalid, func() error {
			_, err := h.c.Lock(Request{Resource: "r", Mode: PR, LVB: make([]byte, 8), Owner: 1})
			return err
		}},
		{"valblk without buffer", ErrInvalid, func() error {
			_, err := h.c.Lock(Request{Resource: "r", Mode: PR, Flags: ValBlk, Owner: 1})
			return err
		}},
		{"convert waiting lock", ErrBusy, func() error { return h.convert("b", NL, 0) }},
		{"convert unknown lock", ErrNotFound, func() error { return h.c.Convert(LockID(12345), NL, 0, nil) }},
		{"convert bad mode", ErrInvalid, func() error { return h.convert("a", Mode(7), 0) }},
		{"convert lvb wrong size", ErrInvalid, func() error { return h.c.Convert(h.ids["a"], NL, 0, make([]byte, 3)) }},
		{"convert with orphan", ErrInvalid, func() error { return h.convert("a", NL, Orphan) }},
		{"unlock unknown", ErrNotFound, func() error { return h.c.Unlock(LockID(1<<40|1), 0, nil) }},
		{"unlock waiting", ErrBusy, func() error { return h.unlock("b", 0) }},
		{"cancel unknown", ErrNotFound, func() error { return h.c.CancelStatus(LockID(99), StatusCancel) }},
	}
	for _, tc := range cases {
		err := tc.do()
		if !errors.Is(err, tc.err) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.err)
		}
		if h.c.HasCallbacks() {
			t.Errorf("%s: produced callbacks: %s", tc.name, h.log())
		}
		if after := h.c.Resources(); !reflect.DeepEqual(before, after) {
			t.Errorf("%s: changed state:\n%+v\n%+v", tc.name, before, after)
		}
	}
}

func TestStaleLockIDNeverNamesReusedSlot(t *testing.T) {
	h := newHarness(t)
	h.must(h.lock("a", "r", EX, 0))
	old := h.ids["a"]
	h.must(h.unlock("a", 0))
	h.must(h.lock("b", "r", EX, 0))
	// The core reuses a freed slot at once (deterministically): if it did
	// not, this test would check nothing, so that is a failure too.
	if uint32(h.ids["b"]) != uint32(old) {
		t.Fatalf("the freed lock slot was not reused (old ID %#x, new %#x): the stale-ID check below would test nothing", old, h.ids["b"])
	}
	if err := h.c.Unlock(old, 0, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("stale ID unlocked the new lock: %v", err)
	}
}

func TestNewCoreRejectsBadLVBLen(t *testing.T) {
	for _, n := range []int{-8, 7, 12} {
		if _, err := NewCore(CoreConfig{LVBLen: n}); !errors.Is(err, ErrInvalid) {
			t.Errorf("LVBLen %d: %v", n, err)
		}
	}
}

func TestBlockingCallbackHighbast(t *testing.T) {
	// a is told about PW once; a completion of its own in between does
	// not make a second PW request tell it again (highbast), until it is
	// granted anew.
	h := newHarness(t)
	h.must(h.lock("a", "r", PR, 0))
	h.must(h.lock("x", "r", CR, 0))
	h.must(h.lock("b", "r", PW, 0))
	h.expect("a: OK PR; x: OK CR; a: bast PW")
	h.must(h.convert("a", EX, NoQueue)) // x's CR blocks EX
	h.expect("a: EAGAIN PR")
	h.must(h.lock("c", "r", PW, 0))
	h.expect("")
	// A more restrictive request is still told.
	h.must(h.lock("d", "r", EX, 0))
	h.expect("a: bast EX; x: bast EX")
}
