package transport

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// logLimiter logs repeated events of one kind (same key) at most once per
// interval. The first line is logged at once; lines within the interval
// are counted and the latest of them is kept, then logged at the end of
// the interval with the count ("suppressed_since_last"), so the log always
// ends with the current state (a reconnect right after a lost connection
// still shows) while a flood costs one line per interval per key. Keys name
// a kind of event and, for authenticated peers, the peer; never anything
// an unauthenticated sender chooses, so the table stays small.
type logLimiter struct {
	log      *slog.Logger
	interval time.Duration
	mu       sync.Mutex
	m        map[string]*limitEntry
	closed   bool
}

type limitEntry struct {
	last       time.Time
	suppressed uint64      // lines not logged since last, pending included
	pending    *limitLine  // the latest of them, logged when the interval ends
	timer      *time.Timer // armed while pending is set
}

type limitLine struct {
	level slog.Level
	msg   string
	args  []any
}

// maxLimitKeys bounds the table; past it, it is cleared (losing only
// suppression counts and pending lines).
const maxLimitKeys = 4096

// logf logs msg at level unless key was logged less than an interval ago.
func (l *logLimiter) logf(key string, level slog.Level, msg string, args ...any) {
	now := time.Now()
	l.mu.Lock()
	if l.closed {
		l.mu.Unlock()
		return
	}
	if l.m == nil || len(l.m) >= maxLimitKeys {
		l.stopTimersLocked()
		l.m = make(map[string]*limitEntry)
	}
	e := l.m[key]
	if e == nil {
		e = &limitEntry{}
		l.m[key] = e
	} else if wait := e.last.Add(l.interval).Sub(now); wait > 0 {
		e.suppressed++
		e.pending = &limitLine{level, msg, args}
		if e.timer == nil {
			e.timer = time.AfterFunc(wait, func() { l.flush(key, e) })
		}
		l.mu.Unlock()
		return
	}
	n := e.suppressed
	e.last, e.suppressed, e.pending = now, 0, nil
	l.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed_since_last", n)
	}
	l.log.Log(context.Background(), level, msg, args...)
}

// flush logs e's pending line at the end of its interval.
func (l *logLimiter) flush(key string, e *limitEntry) {
	l.mu.Lock()
	e.timer = nil
	line := e.pending
	if line == nil || l.closed || l.m[key] != e {
		l.mu.Unlock()
		return
	}
	now := time.Now()
	if wait := e.last.Add(l.interval).Sub(now); wait > 0 {
		// A line was logged directly after the timer fired and before
		// this ran: the interval restarted with it.
		e.timer = time.AfterFunc(wait, func() { l.flush(key, e) })
		l.mu.Unlock()
		return
	}
	n := e.suppressed - 1 // the pending line itself is logged now
	e.last, e.suppressed, e.pending = now, 0, nil
	l.mu.Unlock()
	l.emit(line, n)
}

func (l *logLimiter) emit(line *limitLine, suppressed uint64) {
	args := line.args
	if suppressed > 0 {
		args = append(args[:len(args):len(args)], "suppressed_since_last", suppressed)
	}
	l.log.Log(context.Background(), line.level, line.msg, args...)
}

func (l *logLimiter) stopTimersLocked() {
	for _, e := range l.m {
		if e.timer != nil {
			e.timer.Stop()
			e.timer = nil
		}
	}
}

// close logs the pending lines at once and stops logging: the transport
// is closing.
func (l *logLimiter) close() {
	l.mu.Lock()
	l.closed = true
	l.stopTimersLocked()
	type out struct {
		line *limitLine
		n    uint64
	}
	var lines []out
	for _, e := range l.m {
		if e.pending != nil {
			lines = append(lines, out{e.pending, e.suppressed - 1})
			e.pending = nil
		}
	}
	l.mu.Unlock()
	for _, o := range lines {
		l.emit(o.line, o.n)
	}
}
