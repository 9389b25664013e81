package lease

import (
	"errors"
	"fmt"
	"time"
)

// Reasons the lease stops I/O; every one wraps ErrStopped.
var (
	ErrStopped       = errors.New("storage lease: I/O stopped")
	ErrNoQuorum      = fmt.Errorf("%w: no quorum", ErrStopped)
	ErrFenced        = fmt.Errorf("%w: fenced (the members carry a newer view generation)", ErrStopped)
	ErrUnreadable    = fmt.Errorf("%w: generation stamp cannot be read", ErrStopped)
	ErrExpired       = fmt.Errorf("%w: lease expired (no recent stamp read)", ErrStopped)
	ErrNoLeaseYet    = fmt.Errorf("%w: no stamp read yet", ErrStopped)
	errNoDurationSet = errors.New("storage lease: duration must be positive")
)

// State is the lease's decision logic, with no clock and no I/O: every
// time is an input on one node's local monotonic clock (a time.Duration
// since any fixed point). It is not safe for concurrent use; Guard locks
// it.
//
// The rule: a read of the stamp that started at local time s and found no
// generation newer than the node's view lets the node do I/O until
// s + Duration. The read is timed from its start because its result may
// describe the disk as of any moment after it started. A fencing node that
// made generation G durable at time T (on its own clock) knows every read
// that starts after T sees G, so every other node's lease from an old read
// ends before T + Duration in real time (up to the two clocks' rate
// difference over one lease, which the margin covers): no synchronised
// clocks are needed, only clocks that run at about the same rate.
type State struct {
	// Duration is the lease: how long one good read of the stamp allows
	// I/O for.
	Duration time.Duration

	view    uint64
	quorate bool

	leased     bool          // a good read since the last reset
	validUntil time.Duration // the lease ends here (exclusive)
	lastStart  time.Duration // start of the newest read applied
	started    bool          // some read was applied
	fenced     Record        // the stamp that fenced us (Generation > 0)
	readErr    error         // the newest read's error
}

// NewState returns a lease with no view (generation 0), not quorate and no
// lease yet: I/O is stopped until SetView and a good read.
func NewState(d time.Duration) (*State, error) {
	if d <= 0 {
		return nil, errNoDurationSet
	}
	return &State{Duration: d}, nil
}

// SetView records the node's agreed view: its generation and whether it
// is quorate. A view at or above the generation that fenced the node
// lifts the fence, but I/O resumes only after a new good read.
func (s *State) SetView(gen uint64, quorate bool) {
	s.view, s.quorate = gen, quorate
	if s.fenced.Generation != 0 && gen >= s.fenced.Generation {
		s.fenced = Record{}
		s.leased = false
	}
}

// View returns the generation and quorum SetView recorded.
func (s *State) View() (uint64, bool) { return s.view, s.quorate }

// Renewed applies a read of the stamp that started at start and found
// rec (the highest valid stamp) or failed with err. A read older than one
// already applied is ignored (reads may finish out of order). A stamp
// newer than the view fences the node: I/O stops until a view at least
// that new arrives. An error stops I/O until a later read succeeds.
func (s *State) Renewed(start time.Duration, rec Record, err error) {
	if s.started && start < s.lastStart {
		return
	}
	s.started, s.lastStart = true, start
	if err != nil {
		s.readErr = err
		return
	}
	s.readErr = nil
	if rec.Generation > s.view {
		if rec.Generation > s.fenced.Generation {
			s.fenced = rec
		}
		s.leased = false
		return
	}
	if s.fenced.Generation != 0 {
		return // still fenced until SetView catches up
	}
	if until := start + s.Duration; !s.leased || until > s.validUntil {
		s.validUntil = until
	}
	s.leased = true
}

// Check says whether the node may do array I/O at now: nil, or an error
// wrapping ErrStopped and naming the first reason found (quorum, fence,
// unreadable stamp, expired lease).
func (s *State) Check(now time.Duration) error {
	switch {
	case !s.quorate:
		return fmt.Errorf("%w (view generation %d)", ErrNoQuorum, s.view)
	case s.fenced.Generation != 0:
		return fmt.Errorf("%w: stamp generation %d by node %d, our view %d", ErrFenced, s.fenced.Generation, s.fenced.Node, s.view)
	case s.readErr != nil:
		return fmt.Errorf("%w: %w", ErrUnreadable, s.readErr)
	case !s.leased:
		return ErrNoLeaseYet
	case now >= s.validUntil:
		return fmt.Errorf("%w: ended %v ago", ErrExpired, now-s.validUntil)
	}
	return nil
}

// ValidUntil returns when the current lease ends and whether there is one.
func (s *State) ValidUntil() (time.Duration, bool) { return s.validUntil, s.leased }

// RenewDue says whether a periodic re-read is due at now: none applied
// yet, or the newest started at least half a lease ago.
func (s *State) RenewDue(now time.Duration) bool {
	return !s.started || now-s.lastStart >= s.Duration/2
}

// FenceWait is how long a node that stamped a new generation must wait,
// after the stamp is durable on every member, before it may treat nodes
// outside that generation as having stopped: the lease plus a margin. The
// margin must cover the clocks' rate difference over one lease, the time
// between a node's lease check and its device write reaching the member,
// and, where a watchdog is configured, its timeout plus one renewal
// interval (see docs/quorum-and-fencing.md).
func FenceWait(lease, margin time.Duration) time.Duration { return lease + margin }
