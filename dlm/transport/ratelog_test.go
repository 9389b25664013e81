package transport

import (
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestLogLimiter: a burst under one key logs its first line at once and its
// last line, with the count of the others, when the interval ends; another
// key is independent; close logs what is pending and stops logging.
func TestLogLimiter(t *testing.T) {
	logs := &logBuf{}
	l := &logLimiter{log: slog.New(slog.NewTextHandler(logs, nil)), interval: 500 * time.Millisecond}
	for i := range 10 {
		l.logf("a", slog.LevelWarn, "event a", "i", i)
	}
	l.logf("b", slog.LevelWarn, "event b")
	lines := func() []string { return strings.Split(strings.TrimSpace(logs.String()), "\n") }
	if got := lines(); len(got) != 2 || !strings.Contains(got[0], "i=0") || !strings.Contains(got[1], "event b") {
		t.Fatalf("before the interval ends:\n%s", logs.String())
	}
	waitFor(t, "the pending line", func() bool { return len(lines()) == 3 })
	if got := lines()[2]; !strings.Contains(got, "i=9") || !strings.Contains(got, "suppressed_since_last=8") {
		t.Fatalf("pending line %q: want the last one (i=9) with the 8 before it counted", got)
	}
	// The flush restarted the interval: the next line waits again.
	l.logf("a", slog.LevelWarn, "event a", "i", 10)
	time.Sleep(50 * time.Millisecond)
	if n := len(lines()); n != 3 {
		t.Fatalf("a line within the interval after a flush was logged at once:\n%s", logs.String())
	}
	l.close()
	if got := lines(); len(got) != 4 || !strings.Contains(got[3], "i=10") || strings.Contains(got[3], "suppressed") {
		t.Fatalf("after close:\n%s", logs.String())
	}
	l.logf("a", slog.LevelWarn, "event a", "i", 11)
	time.Sleep(600 * time.Millisecond)
	if n := len(lines()); n != 4 {
		t.Fatalf("logged after close:\n%s", logs.String())
	}
}
