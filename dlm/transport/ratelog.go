package transport

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// logLimiter logs repeated identical events (same key) at most once per
// interval: the first at once, the rest counted and reported with the next
// line logged for the key. Keys name a kind of event and, for
// authenticated peers, the peer; never anything an unauthenticated sender
// chooses, so the table stays small.
type logLimiter struct {
	log      *slog.Logger
	interval time.Duration
	mu       sync.Mutex
	m        map[string]*limitEntry
}

type limitEntry struct {
	last       time.Time
	suppressed uint64
}

// maxLimitKeys bounds the table; past it, it is cleared (losing only
// suppression counts).
const maxLimitKeys = 4096

// logf logs msg at level unless key was logged less than an interval ago.
func (l *logLimiter) logf(key string, level slog.Level, msg string, args ...any) {
	now := time.Now()
	l.mu.Lock()
	if l.m == nil || len(l.m) >= maxLimitKeys {
		l.m = make(map[string]*limitEntry)
	}
	e := l.m[key]
	if e == nil {
		e = &limitEntry{}
		l.m[key] = e
	} else if now.Sub(e.last) < l.interval {
		e.suppressed++
		l.mu.Unlock()
		return
	}
	n := e.suppressed
	e.last, e.suppressed = now, 0
	l.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed_since_last", n)
	}
	l.log.Log(context.Background(), level, msg, args...)
}
