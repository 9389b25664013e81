package nbd

import (
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// logBurst is how many protocol-error lines may be logged back to back
// before LogInterval spacing applies.
const logBurst = 5

// rateLog is a token bucket in front of a logger, for lines a client can
// provoke: whatever a client sends, the server logs at most logBurst lines
// plus one per interval. Lines dropped are counted and the count rides on
// the next line that gets through.
type rateLog struct {
	log        *slog.Logger
	interval   time.Duration
	suppressed *atomic.Uint64 // the server's Stats counter

	mu      sync.Mutex
	tokens  float64
	last    time.Time
	dropped uint64 // since the last line logged
}

func newRateLog(log *slog.Logger, interval time.Duration, suppressed *atomic.Uint64) *rateLog {
	return &rateLog{log: log, interval: interval, suppressed: suppressed, tokens: logBurst}
}

// warn logs msg with args at Warn level if the bucket allows.
func (r *rateLog) warn(msg string, args ...any) {
	now := time.Now()
	r.mu.Lock()
	if !r.last.IsZero() {
		r.tokens = min(logBurst, r.tokens+float64(now.Sub(r.last))/float64(r.interval))
	}
	r.last = now
	if r.tokens < 1 {
		r.dropped++
		r.mu.Unlock()
		r.suppressed.Add(1)
		return
	}
	r.tokens--
	dropped := r.dropped
	r.dropped = 0
	r.mu.Unlock()
	if dropped > 0 {
		args = append(args, "suppressed_since_last", dropped)
	}
	r.log.Warn(msg, args...)
}
