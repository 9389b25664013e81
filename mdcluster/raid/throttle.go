package raid

import (
	"context"
	"sync"
	"time"
)

// Clock is the engine's time source: the throttle paces resync with it,
// progress reports speed and ETA by it, and write-intent EndWrite is
// stamped with it. Tests inject a fake one, so throttling is checked
// against simulated time, never by measuring the wall clock.
type Clock interface {
	// Now is monotonic time since an arbitrary epoch.
	Now() time.Duration
	// Sleep waits d, or until ctx ends (returning its error).
	Sleep(ctx context.Context, d time.Duration) error
}

// SystemClock returns the real monotonic clock.
func SystemClock() Clock { return sysClock{start: time.Now()} }

type sysClock struct{ start time.Time }

// Now is the time since the clock was made.
func (c sysClock) Now() time.Duration { return time.Since(c.start) }

// Sleep waits on a timer.
func (c sysClock) Sleep(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// md's defaults for /proc/sys/dev/raid/speed_limit_{min,max}, in KiB/s.
const (
	DefaultSpeedLimitMin = 1000   // KiB/s a resync keeps even while the array is busy
	DefaultSpeedLimitMax = 200000 // KiB/s a resync may use while the array is idle
)

// throttle paces resync I/O the way md's speed limits do: while the array
// has no other I/O the resync may run at speed_limit_max; while it has,
// the resync yields down to speed_limit_min (and is never slowed below
// it). md samples its rate over a window and sleeps when it is above the
// limit; pacing each I/O holds the same rate with no burst after a pause:
// the I/O after one of n bytes may start no earlier than that one's start
// plus n / limit. When the I/O itself is slower than that, nothing waits.
type throttle struct {
	clock Clock

	mu       sync.Mutex
	min, max int64 // KiB/s
	next     time.Duration
	started  bool
	lastUser uint64
}

func (t *throttle) setLimits(min, max int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.min, t.max = min, max
}

func (t *throttle) limits() (min, max int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.min, t.max
}

// reset forgets the previous operation's pacing.
func (t *throttle) reset(userIO uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.started, t.lastUser = false, userIO
}

// wait returns when the next resync I/O may start (or ctx ends).
func (t *throttle) wait(ctx context.Context) error {
	t.mu.Lock()
	now, next, started := t.clock.Now(), t.next, t.started
	t.mu.Unlock()
	if started && next > now {
		return t.clock.Sleep(ctx, next-now)
	}
	return ctx.Err()
}

// done records an I/O of n bytes that started at start: the next may
// start n / limit later. userIO is the engine's count of non-resync
// requests; if it moved since the last call the array is busy and the
// lower limit applies.
func (t *throttle) done(n int64, start time.Duration, userIO uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	busy := userIO != t.lastUser
	t.lastUser = userIO
	limit := max(t.min, t.max)
	if busy {
		limit = t.min
	}
	t.started = true
	t.next = start
	if limit > 0 {
		t.next += time.Duration(float64(n) / float64(limit*1024) * float64(time.Second))
	}
}

// Progress describes the running (or last) resync, recovery or catch-up:
// md's /proc/mdstat line in numbers.
type Progress struct {
	// Op is "resync", "recovery" or "catch-up"; empty before the first.
	Op string
	// Member is the member being rebuilt (recovery, catch-up), else -1.
	Member int
	// Running is true while the operation runs.
	Running bool
	// Done and Total count array bytes scanned and to scan.
	Done, Total int64
	// Copied counts bytes read from source copies (the throttled amount).
	Copied int64
	// Speed is bytes per second over the last few seconds (Copied).
	Speed float64
	// ETA is the time left at Speed (0 when unknown).
	ETA time.Duration
	// Elapsed is the time since the operation started.
	Elapsed time.Duration
	// Err is how the last operation ended (nil while running or on
	// success).
	Err error
}

// progress keeps Progress up to date; speed comes from samples taken at
// least a second apart over the last ten seconds.
type progress struct {
	mu      sync.Mutex
	p       Progress
	start   time.Duration
	samples []sample
}

type sample struct {
	t      time.Duration
	copied int64
	done   int64
}

const (
	sampleEvery  = time.Second
	sampleWindow = 10 * time.Second
)

func (pr *progress) begin(op string, member int, total int64, now time.Duration) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.p = Progress{Op: op, Member: member, Running: true, Total: total}
	pr.start = now
	pr.samples = append(pr.samples[:0], sample{t: now})
}

func (pr *progress) add(done, copied int64, now time.Duration) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.p.Done += done
	pr.p.Copied += copied
	last := pr.samples[len(pr.samples)-1]
	if now-last.t >= sampleEvery {
		pr.samples = append(pr.samples, sample{t: now, copied: pr.p.Copied, done: pr.p.Done})
		for len(pr.samples) > 2 && now-pr.samples[1].t >= sampleWindow {
			pr.samples = pr.samples[1:]
		}
	}
}

func (pr *progress) end(err error, now time.Duration) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	pr.p.Running, pr.p.Err = false, err
	pr.p.Elapsed = now - pr.start
}

func (pr *progress) get(now time.Duration) Progress {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	p := pr.p
	if !p.Running {
		return p
	}
	p.Elapsed = now - pr.start
	if len(pr.samples) > 0 {
		s := pr.samples[0]
		if dt := now - s.t; dt > 0 {
			p.Speed = float64(p.Copied-s.copied) / dt.Seconds()
			if rate := float64(p.Done-s.done) / dt.Seconds(); rate > 0 {
				p.ETA = time.Duration(float64(p.Total-p.Done) / rate * float64(time.Second))
			}
		}
	}
	return p
}
