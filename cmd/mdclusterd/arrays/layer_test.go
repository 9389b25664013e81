package arrays

import (
	"context"
	"encoding/json"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
)

// The layer end to end (real daemons, mdadm-go, NBD clients) is tested by
// internal/clusterdemo's TestDemoCore and the demo; these are its pure parts.

func TestParseUUID(t *testing.T) {
	u, err := parseUUID("adeeae08:4c0892f4:38a4eae7:4751ea90")
	if err != nil || u[0] != 0xad || u[15] != 0x90 {
		t.Fatalf("mdadm form: %x %v", u, err)
	}
	if v, err := parseUUID("adeeae08-4c08-92f4-38a4-eae74751ea90"); err != nil || v != u {
		t.Fatalf("dashed form: %x %v", v, err)
	}
	for _, bad := range []string{"", "adeeae08", "zzeeae08:4c0892f4:38a4eae7:4751ea90", "adeeae08:4c0892f4:38a4eae7:4751ea9000"} {
		if _, err := parseUUID(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestShortName(t *testing.T) {
	for _, c := range []struct{ stored, fallback, want string }{
		{"vm:md0", "x", "md0"}, {"md0", "x", "md0"}, {"", "x", "x"}, {"host:", "x", "x"},
	} {
		if got := shortName(c.stored, c.fallback); got != c.want {
			t.Errorf("shortName(%q, %q) = %q, want %q", c.stored, c.fallback, got, c.want)
		}
	}
}

func TestSyncing(t *testing.T) {
	idle := array.ArrayStatus{Clean: true, Members: []array.MemberStatus{{State: array.MemberInSync}}}
	if syncing(idle, 1) || syncOf(idle, 100) != nil {
		t.Fatal("an idle clean array reported as syncing")
	}
	rec := idle
	rec.Members = []array.MemberStatus{{State: array.MemberInSync}, {State: array.MemberRecovering}}
	if !syncing(rec, 2) {
		t.Fatal("a recovering member not reported")
	}
	remote := idle
	remote.Sync.Remote = array.Window{Lo: 0, Hi: 8}
	if s := syncOf(remote, 100); !syncing(remote, 1) || s == nil || s.Special != "REMOTE" {
		t.Fatalf("a remote window: %+v", s)
	}
	// A spare that will be activated into the empty slot: a recovery
	// owed (md's --wait waits for it once --add returned).
	owed := idle
	owed.Members = []array.MemberStatus{{State: array.MemberInSync}, {State: array.MemberSpare}}
	if !syncing(owed, 2) {
		t.Fatal("a spare for an empty slot not reported as recovery owed")
	}
	if syncing(owed, 1) {
		t.Fatal("a spare of a complete array reported as syncing")
	}
	run := idle
	run.Sync = array.SyncStatus{Running: true, Kind: array.SyncRecovery, Done: 20, Total: 200}
	if s := syncOf(run, 100); s == nil || s.Action != "recovery" || s.DoneKiB != 10 || s.TotalKiB != 100 {
		t.Fatalf("a running recovery: %+v", s)
	}
}

func TestCommandErrors(t *testing.T) {
	l := New()
	_, err := l.Command(context.Background(), ctl.CmdArrayDetail, json.RawMessage(`{"array":"/dev/md0","bogus":1}`))
	var ce *ctl.Error
	if !errors.As(err, &ce) || ce.Code != ctl.CodeBadRequest {
		t.Fatalf("unknown argument: %v", err)
	}
	_, err = l.Command(context.Background(), ctl.CmdArrayDetail, json.RawMessage(`{"array":"/dev/md0"}`))
	if !errors.As(err, &ce) || ce.Code != ctl.CodeFailed {
		t.Fatalf("detail of an array not running: %v", err)
	}
	if _, err = l.Command(context.Background(), "array.frobnicate", nil); !errors.As(err, &ce) || ce.Code != ctl.CodeUnknownCommand {
		t.Fatalf("unknown command: %v", err)
	}
	res, err := l.Command(context.Background(), ctl.CmdArrayList, nil)
	if err != nil || len(res.(ctl.ArrayList).Arrays) != 0 {
		t.Fatalf("list with nothing running: %v %v", res, err)
	}
}

// TestDropCandidates: a device being added (the array's candidate UUID)
// is not attached as an array of its own; other arrays are, and so is a
// candidate whose array is not attached here.
func TestDropCandidates(t *testing.T) {
	a := [16]byte{0x82, 1, 2, 3}
	b := [16]byte{0x11, 9}
	ca, cb := array.CandidateUUID(a), array.CandidateUUID(b)
	if ca == a || array.CandidateUUID(ca) != a {
		t.Fatalf("candidate of %x is %x", a, ca)
	}
	seen := map[[16]byte]bool{a: true, ca: true, b: true, cb: true}
	attached := map[[16]byte]bool{a: true}
	dropCandidates(seen, func(u [16]byte) bool { return attached[u] })
	want := map[[16]byte]bool{a: true, b: true, cb: true}
	if len(seen) != len(want) {
		t.Fatalf("left %v, want %v", seen, want)
	}
	for u := range want {
		if !seen[u] {
			t.Errorf("%x dropped", u)
		}
	}
}

func TestScanDue(t *testing.T) {
	for _, c := range []struct {
		since            time.Duration
		early, lastEarly int
		want             bool
	}{
		{0, 0, 0, false},
		{time.Second, 3, 3, false},    // the same held messages: nothing new
		{time.Second, 0, 4, false},    // a lockspace opened here took its messages
		{time.Second, 1, 0, true},     // a new lockspace's first message
		{time.Second, 5, 4, true},     // more messages
		{3 * time.Second, 0, 0, true}, // the fallback
	} {
		if got := scanDue(c.since, 3*time.Second, c.early, c.lastEarly); got != c.want {
			t.Errorf("scanDue(%v, 3s, %d, %d) = %v, want %v", c.since, c.early, c.lastEarly, got, c.want)
		}
	}
}

// TestScannerScansOnHeldMessages: the scanner reads the devices when the
// lock manager starts holding messages for a lockspace not opened here,
// within a few polls, not at the fallback period (an hour here), and not
// again while nothing changes.
func TestScannerScansOnHeldMessages(t *testing.T) {
	l := New()
	var early atomic.Int64
	scans := make(chan struct{}, 16)
	l.earlyHeld = func() int { return int(early.Load()) }
	l.scanNow = func(context.Context) { scans <- struct{}{} }
	l.pollEvery, l.fallEvery = 5*time.Millisecond, time.Hour
	l.wg.Add(1)
	go l.scanner()
	defer func() { close(l.stop); l.wg.Wait() }()
	select {
	case <-scans:
		t.Fatal("scanned with no message held")
	case <-time.After(100 * time.Millisecond):
	}
	early.Store(2)
	select {
	case <-scans:
	case <-time.After(10 * time.Second):
		t.Fatal("no scan after messages were held for an unknown lockspace")
	}
	select {
	case <-scans:
		t.Fatal("scanned again although the held messages did not change")
	case <-time.After(100 * time.Millisecond):
	}
	early.Store(0) // attached: the lockspace took them
	early.Store(3)
	select {
	case <-scans:
	case <-time.After(10 * time.Second):
		t.Fatal("no scan after more messages were held")
	}
}

// TestScannerFallback: with no lock manager to ask, the scanner still
// scans every fallback period.
func TestScannerFallback(t *testing.T) {
	l := New()
	scans := make(chan struct{}, 16)
	l.scanNow = func(context.Context) { scans <- struct{}{} }
	l.pollEvery, l.fallEvery = 5*time.Millisecond, 50*time.Millisecond
	l.wg.Add(1)
	go l.scanner()
	defer func() { close(l.stop); l.wg.Wait() }()
	for i := 0; i < 2; i++ {
		select {
		case <-scans:
		case <-time.After(10 * time.Second):
			t.Fatalf("scan %d: none within 10 s with a 50 ms fallback", i+1)
		}
	}
}
