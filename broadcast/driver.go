package broadcast

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

// Receiver acts on the broadcasts this node receives. Receive is called on
// the broadcaster's receive loop (Run or Step), one message at a time, in
// the array's total order of broadcasts. It must return once ctx ends
// (Config.ReceiveTimeout): until it returns, this node answers no sender
// (they give up on it after their SendTimeout, other nodes go on
// receiving). Its error goes back to the sender; returning ErrUnknownType
// (wrapped) says the type is not handled here.
//
// Receive must not wait for anything a local sender holds while it waits
// for the token (an application mutex held around Send, say): the sender of
// the message being handled keeps the token until this node answers.
// Calling Send, Begin, Join or Leave with ctx fails at once with
// ErrInHandler for the same reason.
type Receiver interface {
	Receive(ctx context.Context, from dlm.NodeID, m Message) error
}

// ReceiverFunc adapts a function to Receiver.
type ReceiverFunc func(ctx context.Context, from dlm.NodeID, m Message) error

// Receive calls f.
func (f ReceiverFunc) Receive(ctx context.Context, from dlm.NodeID, m Message) error {
	return f(ctx, from, m)
}

// Defaults of Config's bounds.
const (
	// DefaultLockTimeout bounds one lock call that should be quick (the
	// token, the message lock, arming an ack lock): md-cluster's
	// WAIT_DLM_LOCK_TIMEOUT, 30 s.
	DefaultLockTimeout = 30 * time.Second
	// DefaultReceiveTimeout bounds a Receiver's handler. md's slowest
	// receive, a NEWDISK confirmation through udev and mdadm, is bounded
	// by NEW_DEV_TIMEOUT (5 s at HZ=1000, 20 s at HZ=250); 20 s covers both.
	DefaultReceiveTimeout = 20 * time.Second
)

// Config configures a Broadcaster.
type Config struct {
	// Locker is the array's lockspace (64-byte value blocks): the real
	// *dlm.Lockspace, or the simulator's adapter. Its recovery events must
	// reach the Broadcaster (it is a dlm.RecoveryHandler), or departed
	// senders' broadcasts are finished only by the next send.
	Locker dlm.Locker
	// Self is this node's ID; its bitmap slot, and ack lock, is Self-1.
	Self dlm.NodeID
	// Receiver acts on received broadcasts.
	Receiver Receiver
	// Members is the current view when the broadcaster is created; the
	// lockspace's next RecoverDone replaces it. A lockspace handle opened
	// while the lockspace runs hears of no view until the next change, and
	// senders ask the view's members (besides the nodes the token lists as
	// joined) so that a node that is in the view but not joined is reported
	// NotJoined rather than not mentioned. nil: unknown until then.
	Members []dlm.NodeID
	// LockTimeout bounds each lock call that waits only for other nodes'
	// lock traffic (token, message, arming an ack lock), a local sender's
	// wait for another local sender, and Leave's wait for a receive in
	// progress. 0: DefaultLockTimeout.
	LockTimeout time.Duration
	// ReceiveTimeout bounds the Receiver's handler (through its context).
	// 0: DefaultReceiveTimeout.
	ReceiveTimeout time.Duration
	// SendTimeout bounds one Send (token included) or one Txn.Send: the
	// wait for every receiver's answer is what it mostly covers. 0: three
	// LockTimeouts plus ReceiveTimeout, enough for a receiver that takes
	// its full ReceiveTimeout to be heard.
	SendTimeout time.Duration
	// ReleaseToken releases the token after every transaction, as md-cluster
	// does, instead of keeping it cached in EX until another node asks for
	// it (which saves the token's round trip when one node sends several
	// broadcasts in a row, e.g. resync windows). A simulator that must not
	// have the receive loop touch the token sets it.
	ReleaseToken bool
	// Parallel runs task(0) .. task(n-1) and returns when all have returned:
	// a sender asks every receiver at once through it. nil runs them on
	// goroutines. A deterministic simulator passes one that runs them as
	// its own coroutines, or one after the other (Sequential), which is
	// correct but makes a broadcast wait for receivers one at a time.
	Parallel func(n int, task func(i int))
	// NoMailbox turns the mailboxes off: receivers queue no listener and
	// senders ask every receiver through its ack locks (two round trips
	// per broadcast instead of one; see docs/broadcast.md, "The mailbox").
	// The mailboxes are also off when the Locker cannot request without
	// waiting (it is neither an AsyncLocker nor a *dlm.Lockspace), and on
	// the sending side with ReleaseToken (a sender gives its mailboxes up
	// with the token).
	NoMailbox bool
	// Now reads the clock for Stats' latencies only (nil: time.Now); no
	// protocol decision depends on it.
	Now func() time.Time
	// Logger receives the broadcaster's log; nil means slog.Default().
	Logger *slog.Logger

	// mutation makes the broadcaster deliberately wrong in one md-like way,
	// so the regression tests can show they catch it. Tests only.
	mutation mutation
	// trace, when set, is called at each step of a send and a receive with
	// the step's name and the node it concerns (the receiver asked, for a
	// sender's per-receiver steps; this node otherwise), on the goroutine
	// taking the step. Tests only: TestTraceWarmBroadcast times the steps.
	trace func(step string, node dlm.NodeID)
}

// mutation names a deliberate bug for regression tests.
type mutation uint8

const (
	// mutNoReplyOnError: a receive whose handler failed or timed out is not
	// answered and the ack lock stays held (md before "fix hanging issue
	// while a new disk adding", 2024).
	mutNoReplyOnError mutation = iota + 1
	// mutNoReplyUnknown: an unknown message type is not answered (md's
	// "Received unknown message" path before the same fix).
	mutNoReplyUnknown
	// mutRecvTakesSendLock: the receive side takes the local send lock, as
	// md's recv_mutex couples receiving with sending.
	mutRecvTakesSendLock
	// mutJoinWithoutToken: Join does not wait for the token (md before
	// "fix locking when node joins cluster during message broadcast").
	mutJoinWithoutToken
)

// AsyncLocker is a dlm.Locker that can also start a request without
// waiting for it: a receiver keeps one queued on its mailbox between
// broadcasts (its listener), which no blocking call can do without a
// goroutine parked on it. *dlm.Lockspace has it (LockAsync); the
// simulator's adapter implements it.
type AsyncLocker interface {
	// RequestAsync starts a request and returns its handle at once; done
	// is called once with its outcome (nil: granted), not on the caller's
	// goroutine, and must not wait. Unlock with ForceUnlock ends a request
	// still pending (done then gets an error).
	RequestAsync(spec dlm.LockSpec, done func(error)) (dlm.LockHandle, error)
}

// lockspaceAsync is AsyncLocker over the real lockspace.
type lockspaceAsync struct{ ls *dlm.Lockspace }

func (a lockspaceAsync) RequestAsync(spec dlm.LockSpec, done func(error)) (dlm.LockHandle, error) {
	req := dlm.LockRequest{Resource: spec.Resource, Mode: spec.Mode, Flags: spec.Flags, LVB: spec.LVB}
	if f := spec.OnBlock; f != nil {
		req.OnBlock = func(_ *dlm.Lock, m dlm.Mode) { f(m) }
	}
	lk, err := a.ls.LockAsync(context.Background(), req, func(_ *dlm.Lock, err error) { done(err) })
	if err != nil {
		return nil, err
	}
	return lk, nil
}

func asyncOf(l dlm.Locker) AsyncLocker {
	switch a := l.(type) {
	case AsyncLocker:
		return a
	case *dlm.Lockspace:
		return lockspaceAsync{a}
	}
	return nil
}

// listener is one request queued on this node's mailbox.
type listener struct {
	h       dlm.LockHandle
	blocked bool // a request waits behind it (it was granted)
}

// Sequential is a Config.Parallel that runs the tasks one after the other.
func Sequential(n int, task func(i int)) {
	for i := range n {
		task(i)
	}
}

// growStack grows the calling goroutine's stack to hold a send's call
// chain (lock call, transport, AES-GCM) while the stack has one frame to
// copy. A new goroutine starts with a small stack, and left alone it grows
// deep inside that chain, where copying the stack means adjusting dozens of
// frames: measured at about 8% of a broadcast's CPU (BenchmarkBroadcast3).
//
//go:noinline
func growStack() {
	var pad [12 << 10]byte
	stackSink(pad[:])
}

//go:noinline
func stackSink(b []byte) {
	if len(b) > 0 && b[0] == 1 {
		panic("unreachable")
	}
}

func goroutines(n int, task func(i int)) {
	if n == 0 {
		return
	}
	var wg sync.WaitGroup
	for i := 1; i < n; i++ {
		wg.Go(func() {
			growStack()
			task(i)
		})
	}
	task(0)
	wg.Wait()
}

// Stats counts what a Broadcaster did.
type Stats struct {
	// Sends counts broadcasts this node published (finishing a dead
	// holder's broadcast included); SendErrors the Send and Txn.Send calls
	// that returned an error.
	Sends, SendErrors uint64
	// ReceiverErrors counts receivers' errors in this node's Results.
	ReceiverErrors uint64
	// Receives counts broadcasts this node acted on (its handler was
	// called); HandlerErrors those whose handler failed.
	Receives, HandlerErrors uint64
	// Replies counts answers written to this node's ack lock.
	Replies uint64
	// Finishes counts unfinished broadcasts re-published by this node.
	Finishes uint64
	// Held counts this node's mailbox listeners granted with nothing to
	// answer and kept until a request blocked behind them (see
	// Machine.MailboxIncoming); Fallbacks the receivers this node, sending,
	// asked through their ack locks after their mailbox gave no reply.
	Held, Fallbacks uint64
	// Gaps counts the broadcasts received whose sequence number was not
	// the one after the last this node had seen: it missed broadcasts
	// (its senders reported it unanswered) or numbers were lost to a
	// failed publish.
	Gaps uint64
	// LastSend and AvgSend are the latency of Send / Txn.Send as callers
	// saw it (successful calls).
	LastSend, AvgSend time.Duration
	// SendOK counts the successful Send / Txn.Send calls and SendTime is
	// their latencies' sum: a metrics exporter turns the pair into a
	// summary without the send path recording anything more.
	SendOK   uint64
	SendTime time.Duration
}

// Broadcaster is one node's end of an array's broadcast: it sends (Send,
// Begin), receives (Run or Step), joins and leaves, and follows the
// lockspace's recovery (it is a dlm.RecoveryHandler).
//
// Concurrency: local senders, Join and Leave serialise on a local lock
// that the receive side never takes, so this node keeps answering other
// senders while its own sends wait for the token. Lock calls are made on
// the caller's goroutine; the only goroutines are Config.Parallel's.
// Blocking callbacks and recovery events only update state and signal the
// receive loop.
type Broadcaster struct {
	cfg Config
	log *slog.Logger
	now func() time.Time

	// sem is the local send lock: held by Join, Leave and a transaction,
	// and by the receive loop only to release the cached token (without
	// waiting for it).
	sem chan struct{}
	// sig wakes Run: a blocking callback or recovery event left work.
	sig chan struct{}

	mu sync.Mutex // guards the fields below; never held across a lock call or the handler
	m  *Machine
	// The locks, nil while not joined. token is NL or EX; ack are this
	// node's two ack locks (EX when armed, NL once answered); recvMsg
	// (receiving) and sendMsg (sending) are NL while idle.
	token, recvMsg, sendMsg dlm.LockHandle
	ack                     [2]dlm.LockHandle
	// async starts listeners (nil: no mailbox). lis is the listener
	// queued, granted the ones granted and not yet handled (in order),
	// held one kept with nothing to answer. boxes are the other nodes'
	// mailboxes this node holds as the token holder (EX between sends).
	async   AsyncLocker
	lis     *listener
	granted []*listener
	held    *listener
	boxes   map[dlm.NodeID]dlm.LockHandle
	// copyLk is this node's copy lock (PW while joined); copySeq the
	// sequence number last written into it.
	copyLk  dlm.LockHandle
	copySeq uint64
	// anchor is this node's NL lock on its own mailbox, taken at Join
	// before any listener so that this node masters the mailbox.
	anchor dlm.LockHandle
	// idle is signalled whenever a receive ends, for Leave to wait on.
	idle      chan struct{}
	stats     Stats
	sendTotal time.Duration
	sendOK    uint64
}

var _ dlm.RecoveryHandler = (*Broadcaster)(nil)

// New returns the broadcaster of node cfg.Self. It takes no lock: Join
// does, once the array can act on messages.
func New(cfg Config) (*Broadcaster, error) {
	switch {
	case cfg.Locker == nil:
		return nil, errors.New("broadcast: Config.Locker is required")
	case cfg.Receiver == nil:
		return nil, errors.New("broadcast: Config.Receiver is required")
	case cfg.Locker.LVBLen() < LVBSize:
		return nil, fmt.Errorf("broadcast: the lockspace has %d-byte value blocks, need %d", cfg.Locker.LVBLen(), LVBSize)
	case cfg.LockTimeout < 0 || cfg.ReceiveTimeout < 0 || cfg.SendTimeout < 0:
		return nil, errors.New("broadcast: negative timeout")
	}
	m, err := NewMachine(cfg.Self)
	if err != nil {
		return nil, err
	}
	if cfg.Members != nil {
		m.ViewDone(0, cfg.Members)
	}
	if cfg.LockTimeout == 0 {
		cfg.LockTimeout = DefaultLockTimeout
	}
	if cfg.ReceiveTimeout == 0 {
		cfg.ReceiveTimeout = DefaultReceiveTimeout
	}
	if cfg.SendTimeout == 0 {
		cfg.SendTimeout = 3*cfg.LockTimeout + cfg.ReceiveTimeout
	}
	if cfg.Parallel == nil {
		cfg.Parallel = goroutines
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	lg := cfg.Logger
	if lg == nil {
		lg = slog.Default()
	}
	b := &Broadcaster{cfg: cfg, log: lg.With("node", cfg.Self), now: now, m: m,
		sem: make(chan struct{}, 1), sig: make(chan struct{}, 1), idle: make(chan struct{}, 1),
		boxes: map[dlm.NodeID]dlm.LockHandle{}}
	if !cfg.NoMailbox {
		if b.async = asyncOf(cfg.Locker); b.async != nil {
			m.EnableMailbox()
		}
	}
	return b, nil
}

// Phase returns where this node is (joined or not).
func (b *Broadcaster) Phase() Phase {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.m.Phase()
}

// Seen returns the highest broadcast sequence number this node has seen.
func (b *Broadcaster) Seen() uint64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.m.Seen()
}

// Stats returns the counters.
func (b *Broadcaster) Stats() Stats {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.stats
	s.Gaps = b.m.Gaps()
	s.SendOK, s.SendTime = b.sendOK, b.sendTotal
	if b.sendOK > 0 {
		s.AvgSend = b.sendTotal / time.Duration(b.sendOK)
	}
	return s
}

// --- handler context ---

type handlerKey struct{}

type handlerInfo struct {
	b   *Broadcaster
	seq uint64
}

// handlerCtx is the context a Receiver's handler gets: what
// context.WithValue(context.WithTimeout(parent, ReceiveTimeout),
// handlerKey{}, info) would be, but the timer and the link to the parent
// are made (by materializing exactly that WithDeadline) only when the
// handler asks for Done or for a value other than the handler's own: most
// handlers do neither, and each receive paid for a timer it never used.
// Until then Err reads the parent and the clock, so the bound holds either
// way.
type handlerCtx struct {
	parent   context.Context
	deadline time.Time // the earlier of the parent's and the bound
	info     handlerInfo
	mu       sync.Mutex
	real     context.Context // materialized, or nil
	cancelFn context.CancelFunc
	ended    error // Err when cancel was called, if not materialized
}

var _ context.Context = (*handlerCtx)(nil)

func newHandlerCtx(parent context.Context, d time.Duration, info handlerInfo) *handlerCtx {
	dl := time.Now().Add(d)
	if pdl, ok := parent.Deadline(); ok && pdl.Before(dl) {
		dl = pdl
	}
	return &handlerCtx{parent: parent, deadline: dl, info: info}
}

// materialize returns the real context, making it if needed. Called with
// mu held.
func (c *handlerCtx) materialize() context.Context {
	if c.real == nil {
		c.real, c.cancelFn = context.WithDeadline(c.parent, c.deadline)
		if c.ended != nil {
			c.cancelFn()
		}
	}
	return c.real
}

func (c *handlerCtx) Deadline() (time.Time, bool) { return c.deadline, true }

func (c *handlerCtx) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.materialize().Done()
}

func (c *handlerCtx) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.real != nil {
		return c.real.Err()
	}
	return c.errNow()
}

// errNow is Err while not materialized. Called with mu held.
func (c *handlerCtx) errNow() error {
	if c.ended != nil {
		return c.ended
	}
	if err := c.parent.Err(); err != nil {
		return err
	}
	if !time.Now().Before(c.deadline) {
		return context.DeadlineExceeded
	}
	return nil
}

// Value answers the handler key itself; any other key (context.Cause's
// and context.WithCancel's lookups included) goes to the materialized
// context, so that they see exactly what context.WithTimeout would give.
func (c *handlerCtx) Value(key any) any {
	if _, ok := key.(handlerKey); ok {
		return &c.info
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.materialize().Value(key)
}

// cancel ends the context, as the CancelFunc of context.WithTimeout does.
func (c *handlerCtx) cancel() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cancelFn != nil {
		c.cancelFn()
	} else if c.ended == nil {
		c.ended = c.errNow()
		if c.ended == nil {
			c.ended = context.Canceled
		}
	}
}

// SequenceOf returns the sequence number of the broadcast a Receiver's
// handler is acting on, from the context it was given (for a journal, or
// logs that must line up across nodes).
func SequenceOf(ctx context.Context) (uint64, bool) {
	h, ok := ctx.Value(handlerKey{}).(*handlerInfo)
	if !ok {
		return 0, false
	}
	return h.seq, true
}

func (b *Broadcaster) inHandler(ctx context.Context) bool {
	h, ok := ctx.Value(handlerKey{}).(*handlerInfo)
	return ok && h.b == b
}

// --- small helpers ---

// tr reports a step to Config.trace, if set.
func (b *Broadcaster) tr(step string, node dlm.NodeID) {
	if b.cfg.trace != nil {
		b.cfg.trace(step, node)
	}
}

func (b *Broadcaster) lockCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, b.cfg.LockTimeout)
}

// cleanupCtx bounds the calls that put locks back after a failure: they
// must run even when the caller's context has ended.
func (b *Broadcaster) cleanupCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), b.cfg.LockTimeout)
}

// quickCtx is cleanupCtx for a call that normally completes without
// waiting (a down-conversion or an unlock, which the lock manager completes
// at once): the same bound, but its timer starts only if the call waits on
// Done, so the common case costs no timer (a send makes several of these).
func (b *Broadcaster) quickCtx(ctx context.Context) *boundCtx {
	return &boundCtx{parent: ctx, deadline: time.Now().Add(b.cfg.LockTimeout)}
}

// quickLockCtx is lockCtx for a lock call that normally completes without
// waiting (taking the message lock, which only a receiver still reading
// the previous broadcast holds): context.WithTimeout(ctx, LockTimeout),
// with the timer and the link to ctx made only if the call waits on Done.
// Only for synchronous lock calls: they use Err and Done, nothing else.
func (b *Broadcaster) quickLockCtx(ctx context.Context) *boundCtx {
	dl := time.Now().Add(b.cfg.LockTimeout)
	if pdl, ok := ctx.Deadline(); ok && pdl.Before(dl) {
		dl = pdl
	}
	return &boundCtx{parent: ctx, inherit: true, deadline: dl}
}

// boundCtx is context.WithTimeout(context.WithoutCancel(parent), d) (or,
// with inherit, context.WithTimeout(parent, d)) with the timer, and the
// link to the parent, made lazily by the first call to Done. Err reads the
// clock (and the parent) when no timer runs, so the deadline holds either
// way.
type boundCtx struct {
	parent context.Context // values; with inherit, its cancellation too
	// inherit: the parent's end ends it too (deadline then is the earlier
	// of the parent's and the bound).
	inherit  bool
	stop     func() bool // undoes the context.AfterFunc on parent
	deadline time.Time
	mu       sync.Mutex
	done     chan struct{}
	timer    *time.Timer
	err      error
	afters   []*boundAfter // registered by AfterFunc, run by end
}

// boundAfter is one function registered with boundCtx.AfterFunc.
type boundAfter struct {
	f    func()
	over bool // started or stopped
}

var _ context.Context = (*boundCtx)(nil)

// AfterFunc arranges for f to run on its own goroutine once c ends and
// returns a function that prevents it if it has not started, as
// context.AfterFunc does; context.AfterFunc calls this method when it finds
// it. Without it, context.AfterFunc on a boundCtx (which a lock call waiting
// with it does, see internal/wake) would start a goroutine per call just to
// watch Done.
func (c *boundCtx) AfterFunc(f func()) (stop func() bool) {
	c.Done() // the timer and the link to the parent
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		go f()
		return func() bool { return false }
	}
	a := &boundAfter{f: f}
	c.afters = append(c.afters, a)
	return func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		if a.over {
			return false
		}
		a.over = true
		return true
	}
}

func (c *boundCtx) Deadline() (time.Time, bool) { return c.deadline, true }
func (c *boundCtx) Value(key any) any           { return c.parent.Value(key) }

func (c *boundCtx) Done() <-chan struct{} {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.done == nil {
		if c.err == nil && c.inherit {
			if perr := c.parent.Err(); perr != nil {
				c.end(perr)
			}
		}
		c.done = make(chan struct{})
		if c.err != nil {
			close(c.done)
		} else if d := time.Until(c.deadline); d <= 0 {
			c.end(context.DeadlineExceeded)
		} else {
			c.timer = time.AfterFunc(d, func() {
				c.mu.Lock()
				c.end(context.DeadlineExceeded)
				c.mu.Unlock()
			})
			if c.inherit {
				c.stop = context.AfterFunc(c.parent, func() {
					c.mu.Lock()
					c.end(c.parent.Err())
					c.mu.Unlock()
				})
			}
		}
	}
	return c.done
}

func (c *boundCtx) Err() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err == nil && c.inherit {
		if perr := c.parent.Err(); perr != nil {
			c.end(perr)
		}
	}
	if c.err == nil && c.timer == nil && !time.Now().Before(c.deadline) {
		c.end(context.DeadlineExceeded)
	}
	return c.err
}

// cancel ends the context (context.Canceled unless it had ended) and stops
// its timer.
func (c *boundCtx) cancel() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.timer != nil {
		c.timer.Stop()
	}
	if c.stop != nil {
		c.stop()
	}
	c.end(context.Canceled)
}

// end records err as the context's end and closes Done if it was handed
// out. Called with mu held.
func (c *boundCtx) end(err error) {
	if c.err != nil {
		return
	}
	c.err = err
	if c.done != nil {
		close(c.done)
	}
	for _, a := range c.afters {
		if !a.over {
			a.over = true
			go a.f()
		}
	}
	c.afters = nil
}

// down converts h down to mode within a fresh cleanup bound (a
// down-conversion does not wait for other nodes).
func (b *Broadcaster) down(ctx context.Context, h dlm.LockHandle, mode dlm.Mode, flags dlm.Flags) error {
	cctx := b.quickCtx(ctx)
	defer cctx.cancel()
	if err := h.Convert(cctx, mode, flags); err != nil {
		return fmt.Errorf("convert %s to %s: %w", h.Resource(), mode, err)
	}
	return nil
}

// unlock releases h within a fresh cleanup bound.
func (b *Broadcaster) unlock(ctx context.Context, h dlm.LockHandle, flags dlm.Flags) error {
	cctx := b.quickCtx(ctx)
	defer cctx.cancel()
	if err := h.Unlock(cctx, flags); err != nil {
		return fmt.Errorf("release %s: %w", h.Resource(), err)
	}
	return nil
}

func (b *Broadcaster) signal() {
	select {
	case b.sig <- struct{}{}:
	default:
	}
}

func (b *Broadcaster) acquire(ctx context.Context, what string) error {
	select {
	case b.sem <- struct{}{}:
		return nil
	default:
	}
	lctx, cancel := b.lockCtx(ctx)
	defer cancel()
	select {
	case b.sem <- struct{}{}:
		return nil
	case <-lctx.Done():
		return fmt.Errorf("broadcast: node %d: %s: waiting for this node's other sender: %w", b.cfg.Self, what, lctx.Err())
	}
}

func (b *Broadcaster) trySem() bool {
	select {
	case b.sem <- struct{}{}:
		return true
	default:
		return false
	}
}

func (b *Broadcaster) release() { <-b.sem }

func invalid(h dlm.LockHandle) bool { return h.StatusFlags()&dlm.ValNotValid != 0 }

// gone reports errors that say this node's locks are gone for good.
func gone(err error) bool {
	return errors.Is(err, dlm.ErrReleased) || errors.Is(err, dlm.ErrNotFound)
}

// lost marks this node's locks gone (it must Join again).
func (b *Broadcaster) lost(err error) {
	b.mu.Lock()
	was := b.m.Phase()
	b.m.Lost()
	b.token, b.ack, b.recvMsg, b.sendMsg = nil, [2]dlm.LockHandle{}, nil, nil
	b.lis, b.granted, b.held = nil, nil, nil
	b.copyLk, b.anchor = nil, nil
	clear(b.boxes)
	b.mu.Unlock()
	b.pulseIdle()
	if was == Joined {
		b.log.Error("broadcast: this node's locks are gone; it no longer receives and must join again", "err", err)
	}
}

// --- join and leave ---

// Join makes this node a receiver (and allowed sender) of the array's
// broadcasts. Call it once the array can act on messages: a node that has
// not joined is skipped by senders (reported NotJoined), so no message can
// reach an array that is not started.
//
// Holding the token (so no broadcast is in flight), it takes both its ack
// locks in EX, reads the message lock to learn the last sequence number (that
// broadcast was sent before this node joined and is never acted on here:
// the caller loads the array's state after Join returns), records itself
// in the token's list of joined nodes and releases the token.
func (b *Broadcaster) Join(ctx context.Context) (err error) {
	if b.inHandler(ctx) {
		return fmt.Errorf("broadcast: join: %w", ErrInHandler)
	}
	if err := b.acquire(ctx, "join"); err != nil {
		return err
	}
	defer b.release()
	b.mu.Lock()
	if b.m.Phase() == Joined {
		b.mu.Unlock()
		return nil
	}
	b.mu.Unlock()
	self := b.cfg.Self
	var held []dlm.LockHandle
	defer func() {
		if err == nil {
			return
		}
		cctx, cancel := b.cleanupCtx(ctx)
		defer cancel()
		for i := len(held) - 1; i >= 0; i-- {
			_ = held[i].Unlock(cctx, 0) // no ValBlk: nothing is written
		}
		b.mu.Lock()
		b.m.TokenLost()
		b.mu.Unlock()
	}()
	lctx, cancel := b.lockCtx(ctx)
	defer cancel()
	tokMode := dlm.EX
	if b.cfg.mutation == mutJoinWithoutToken {
		tokMode = dlm.NL
	}
	tok, err := b.cfg.Locker.Request(lctx, dlm.LockSpec{Resource: TokenLock, Mode: tokMode, Flags: dlm.ValBlk, OnBlock: b.tokenBlocked})
	if err != nil {
		return fmt.Errorf("broadcast: node %d: join: take %s in EX (a broadcast or join in flight?): %w", self, TokenLock, err)
	}
	held = append(held, tok)
	b.mu.Lock()
	b.m.TokenGranted(tok.LVB(), invalid(tok))
	b.mu.Unlock()
	var ack [2]dlm.LockHandle
	for i := range uint8(2) {
		h, err := b.cfg.Locker.Request(lctx, dlm.LockSpec{Resource: AckLock(self, i), Mode: dlm.EX, Flags: dlm.ValBlk,
			OnBlock: func(dlm.Mode) { b.notified(i) }})
		if err != nil {
			return fmt.Errorf("broadcast: node %d: join: take %s in EX: %w", self, AckLock(self, i), err)
		}
		held = append(held, h)
		ack[i] = h
	}
	rm, err := b.cfg.Locker.Request(lctx, dlm.LockSpec{Resource: MessageLock, Mode: dlm.CR, Flags: dlm.ValBlk})
	if err != nil {
		return fmt.Errorf("broadcast: node %d: join: read %s in CR: %w", self, MessageLock, err)
	}
	held = append(held, rm)
	lvb, inval := rm.LVB(), invalid(rm)
	lvb = b.newest(ctx, lvb)
	var cp, anchor dlm.LockHandle
	if b.async != nil {
		// Look the mailbox up first (no sender asks a node that is not
		// joined, and none sends while the joiner holds the token), so that
		// this node masters it: its listeners' grants and releases are
		// then local. The NL lock is kept until Leave.
		if anchor, err = b.cfg.Locker.Request(lctx, dlm.LockSpec{Resource: MailboxLock(self), Mode: dlm.NL}); err != nil {
			return fmt.Errorf("broadcast: node %d: join: %s in NL: %w", self, MailboxLock(self), err)
		}
		held = append(held, anchor)
		// Only broadcasts taken from the mailbox need a copy.
		if cp, err = b.cfg.Locker.Request(lctx, dlm.LockSpec{Resource: CopyLock(self), Mode: dlm.PW, Flags: dlm.ValBlk}); err != nil {
			return fmt.Errorf("broadcast: node %d: join: take %s in PW: %w", self, CopyLock(self), err)
		}
		held = append(held, cp)
	}
	if err := rm.Convert(lctx, dlm.NL, 0); err != nil {
		return fmt.Errorf("broadcast: node %d: join: release %s to NL: %w", self, MessageLock, err)
	}
	sm, err := b.cfg.Locker.Request(lctx, dlm.LockSpec{Resource: MessageLock, Mode: dlm.NL})
	if err != nil {
		return fmt.Errorf("broadcast: node %d: join: %s in NL for sending: %w", self, MessageLock, err)
	}
	held = append(held, sm)
	b.mu.Lock()
	val := b.m.TokenValueAfterJoin(b.cfg.Locker.LVBLen())
	b.mu.Unlock()
	if err := tok.SetLVB(val); err != nil {
		return fmt.Errorf("broadcast: node %d: join: %w", self, err)
	}
	if err := b.down(ctx, tok, dlm.NL, dlm.ValBlk); err != nil {
		return fmt.Errorf("broadcast: node %d: join: release the token: %w", self, err)
	}
	// Joined only now, with the locks in place: the receive loop (a
	// catch-up after a recovery event, say) finds everything it uses.
	b.mu.Lock()
	b.m.Joined(lvb, inval)
	b.m.TokenReleased()
	b.token, b.ack, b.recvMsg, b.sendMsg = tok, ack, rm, sm
	b.copyLk, b.copySeq, b.anchor = cp, 0, anchor
	seen := b.m.Seen()
	b.mu.Unlock()
	held = nil
	b.log.Info("broadcast: joined", "ack_locks", []string{AckLock(self, 0), AckLock(self, 1)}, "last_seq", seen)
	b.signal()
	return nil
}

// Leave stops this node receiving and sending. Holding the token (so no
// broadcast is in flight), it waits for a receive still under way here to
// end (at most LockTimeout: a handler that outlived its sender's patience
// may still be acting), writes a "left" reply into its ack locks and
// releases them, releases the message lock and removes itself from the
// token's joined list. Run must still be running while Leave waits for the
// token: a broadcast in flight needs this node's answer before the token
// is free.
func (b *Broadcaster) Leave(ctx context.Context) error {
	if b.inHandler(ctx) {
		return fmt.Errorf("broadcast: leave: %w", ErrInHandler)
	}
	if err := b.acquire(ctx, "leave"); err != nil {
		return err
	}
	defer b.release()
	b.mu.Lock()
	ph := b.m.Phase()
	b.mu.Unlock()
	if ph != Joined {
		b.dropHandles(ctx)
		return nil
	}
	if err := b.takeToken(ctx, "leave"); err != nil {
		return err
	}
	if err := b.leaveWhenIdle(ctx); err != nil {
		rerr := b.releaseToken(ctx)
		return errors.Join(fmt.Errorf("broadcast: node %d: leave: %w", b.cfg.Self, err), rerr)
	}
	b.mu.Lock()
	reply := b.m.LeaveReply()
	val := b.m.TokenValue(b.cfg.Locker.LVBLen())
	tok, ack, rm, sm := b.token, b.ack, b.recvMsg, b.sendMsg
	b.token, b.ack, b.recvMsg, b.sendMsg = nil, [2]dlm.LockHandle{}, nil, nil
	b.mu.Unlock()
	n := b.cfg.Locker.LVBLen()
	var errs []error
	errs = append(errs, b.dropMailboxes(ctx)...)
	for _, h := range ack {
		// An armed lock (EX) gets the reply written on unlock; an answered
		// one (NL) keeps its last answer, which no sender takes for a reply
		// to a later broadcast.
		if err := h.SetLVB(reply.Encode(n)); err != nil {
			errs = append(errs, err)
		}
		if err := b.unlock(ctx, h, dlm.ValBlk); err != nil {
			errs = append(errs, err)
		}
	}
	for _, h := range []dlm.LockHandle{rm, sm} {
		if err := b.unlock(ctx, h, 0); err != nil {
			errs = append(errs, err)
		}
	}
	if err := tok.SetLVB(val); err != nil {
		errs = append(errs, err)
	}
	if err := b.unlock(ctx, tok, dlm.ValBlk); err != nil {
		errs = append(errs, err)
	}
	b.mu.Lock()
	b.m.TokenReleased()
	b.mu.Unlock()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("broadcast: node %d: leave: %w", b.cfg.Self, err)
	}
	b.log.Info("broadcast: left", "last_seq", reply.Seq)
	return nil
}

// leaveWhenIdle marks this node not joined as soon as no receive is under
// way, so the receive loop starts nothing more; it waits at most
// LockTimeout for a receive in progress.
func (b *Broadcaster) leaveWhenIdle(ctx context.Context) error {
	lctx, cancel := b.lockCtx(ctx)
	defer cancel()
	for {
		b.mu.Lock()
		err := b.m.CanLeave()
		if err == nil {
			b.m.Left()
		}
		b.mu.Unlock()
		if err == nil {
			return nil
		}
		select {
		case <-b.idle:
		case <-lctx.Done():
			return fmt.Errorf("%w; waited %v: %w", err, b.cfg.LockTimeout, lctx.Err())
		}
	}
}

func (b *Broadcaster) pulseIdle() {
	select {
	case b.idle <- struct{}{}:
	default:
	}
}

// dropHandles releases whatever locks a node that lost its membership
// still has handles for (best effort: they are usually gone already).
func (b *Broadcaster) dropHandles(ctx context.Context) {
	b.mu.Lock()
	hs := []dlm.LockHandle{b.ack[0], b.ack[1], b.recvMsg, b.sendMsg, b.token}
	b.token, b.ack, b.recvMsg, b.sendMsg = nil, [2]dlm.LockHandle{}, nil, nil
	b.m.TokenLost()
	b.mu.Unlock()
	for _, h := range hs {
		if h != nil && h.Mode() != dlm.ModeIV {
			_ = b.unlock(ctx, h, 0)
		}
	}
	b.dropMailboxes(ctx)
}

// dropMailboxes ends this node's listeners (the queued one, granted ones,
// the kept one) and releases the other nodes' mailboxes it holds, none of
// them with a value written. Called when this node is no longer joined.
func (b *Broadcaster) dropMailboxes(ctx context.Context) []error {
	b.mu.Lock()
	var ls []*listener
	if b.lis != nil {
		ls = append(ls, b.lis)
	}
	ls = append(ls, b.granted...)
	if b.held != nil {
		ls = append(ls, b.held)
	}
	b.lis, b.granted, b.held = nil, nil, nil
	b.m.ListenerFailed()
	b.mu.Unlock()
	var errs []error
	b.mu.Lock()
	own := []dlm.LockHandle{b.copyLk, b.anchor}
	b.copyLk, b.anchor = nil, nil
	b.mu.Unlock()
	for _, h := range own {
		if h != nil && h.Mode() != dlm.ModeIV {
			if err := b.unlock(ctx, h, 0); err != nil && !gone(err) {
				errs = append(errs, err)
			}
		}
	}
	for _, l := range ls {
		if l.h == nil {
			continue // its request call failed
		}
		// Granted or still queued: ForceUnlock ends either.
		if err := b.unlock(ctx, l.h, dlm.ForceUnlock); err != nil && !gone(err) {
			errs = append(errs, err)
		}
	}
	errs = append(errs, b.releaseBoxes(ctx)...)
	return errs
}

// releaseBoxes releases the other nodes' mailboxes this node holds as the
// token holder: the next holder takes them (their listeners, granted on
// the way, are kept until its requests block behind them).
func (b *Broadcaster) releaseBoxes(ctx context.Context) []error {
	b.mu.Lock()
	var hs []dlm.LockHandle
	// In node order: a simulator must see the same calls in every replay.
	for _, n := range slices.Sorted(maps.Keys(b.boxes)) {
		hs = append(hs, b.boxes[n])
	}
	clear(b.boxes)
	b.mu.Unlock()
	var errs []error
	for _, h := range hs {
		if h.Mode() == dlm.ModeIV {
			continue
		}
		if err := b.unlock(ctx, h, 0); err != nil && !gone(err) {
			errs = append(errs, err)
		}
	}
	return errs
}

// --- callbacks and recovery events: they only record and signal ---

// notified is the blocking callback of ack lock number lock: a sender
// waits for us there.
func (b *Broadcaster) notified(lock uint8) {
	b.tr("recv: blocking callback", b.cfg.Self)
	b.mu.Lock()
	b.m.Notify(lock)
	b.mu.Unlock()
	b.signal()
}

// listenerDone is the completion of listener l's request.
func (b *Broadcaster) listenerDone(l *listener, err error) {
	b.mu.Lock()
	if b.lis != l {
		b.mu.Unlock()
		return // dropped (left, lost) meanwhile
	}
	b.lis = nil
	if err != nil {
		b.m.ListenerFailed()
	} else {
		b.granted = append(b.granted, l)
		b.m.ListenerGranted()
	}
	b.mu.Unlock()
	if err != nil && !gone(err) {
		b.log.Warn("broadcast: mailbox listener ended without a grant; queueing another", "err", err)
	}
	b.tr("recv: listener granted", b.cfg.Self)
	b.signal()
}

// listenerBlocked is a granted listener's blocking callback: a sender's
// request waits behind it.
func (b *Broadcaster) listenerBlocked(l *listener) {
	b.mu.Lock()
	l.blocked = true
	if b.held == l {
		b.m.HeldBlocked()
	}
	b.mu.Unlock()
	b.signal()
}

// tokenBlocked is the token's blocking callback: another node wants it.
func (b *Broadcaster) tokenBlocked(dlm.Mode) {
	b.mu.Lock()
	b.m.TokenBlocked()
	b.mu.Unlock()
	b.signal()
}

// RecoverPrepare implements dlm.RecoveryHandler; nothing changes until
// recovery is done.
func (b *Broadcaster) RecoverPrepare(gen uint64) {
	b.log.Debug("broadcast: lockspace stopped for recovery", "gen", gen)
}

// RecoverDeparted implements dlm.RecoveryHandler: the departed nodes are
// reported departed (not "not joined") when a sender finds their ack locks
// free.
func (b *Broadcaster) RecoverDeparted(gen uint64, nodes []dlm.NodeID) {
	b.mu.Lock()
	b.m.Departed(nodes)
	b.mu.Unlock()
	b.log.Debug("broadcast: nodes departed", "gen", gen, "nodes", nodes)
}

// RecoverDone implements dlm.RecoveryHandler: senders ask the new view's
// members, and the receive loop checks whether a broadcast whose sender
// departed is still owed to this node.
func (b *Broadcaster) RecoverDone(gen uint64, members []dlm.NodeID, _ dlm.NodeID) {
	b.mu.Lock()
	b.m.ViewDone(gen, members)
	b.mu.Unlock()
	b.signal()
}

// --- the receive loop ---

// Run is the receive loop: it waits for blocking callbacks and recovery
// events and carries out what they leave (Step) until ctx ends. The daemon
// runs it on a goroutine for as long as the array is open, before Join and
// until after Leave. A step that fails is logged and retried after a
// pause of LockTimeout/30 (between 10 ms and 1 s), so that an error that
// comes back at once cannot make the loop spin; Run returns ctx's error.
func (b *Broadcaster) Run(ctx context.Context) error {
	pause := min(max(b.cfg.LockTimeout/30, 10*time.Millisecond), time.Second)
	for {
		for {
			did, err := b.Step(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				b.log.Warn("broadcast: receive step failed; retrying", "err", err, "after", pause)
				t := time.NewTimer(pause)
				select {
				case <-t.C:
				case <-ctx.Done():
					t.Stop()
					return ctx.Err()
				}
			}
			if !did {
				break
			}
		}
		select {
		case <-b.sig:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Pending reports whether Step has something to do. A simulator that
// drives the broadcaster without Run calls Step while Pending holds.
func (b *Broadcaster) Pending() bool {
	free := len(b.sem) == 0
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.m.Pending(free && !b.cfg.ReleaseToken)
}

// Signal returns the channel Run waits on: it receives a value when a
// blocking callback or a recovery event left something for Step.
func (b *Broadcaster) Signal() <-chan struct{} { return b.sig }

// Step does the next piece of receive-side work, if any, and reports
// whether there was any: answer a sender (read the message lock, arm the
// other ack lock, act, reply), catch up after a recovery, or release the
// cached token to a node that wants it. It never waits for a local sender.
func (b *Broadcaster) Step(ctx context.Context) (bool, error) {
	b.mu.Lock()
	want := b.m.TokenWanted()
	b.mu.Unlock()
	free := want && !b.cfg.ReleaseToken && b.trySem()
	b.mu.Lock()
	job := b.m.Work(free)
	b.mu.Unlock()
	if free && job.Work != WorkReleaseToken {
		b.release()
	}
	switch job.Work {
	case WorkReleaseToken:
		defer b.release()
		return true, b.releaseToken(ctx)
	case WorkReceive:
		var err error
		if job.Mailbox {
			err = b.receiveMailbox(ctx, job)
		} else {
			err = b.receive(ctx, job)
		}
		b.pulseIdle()
		return true, err
	case WorkListen:
		err := b.listen()
		b.mu.Lock()
		b.m.Done()
		b.mu.Unlock()
		b.pulseIdle()
		return true, err
	case WorkReleaseMailbox:
		err := b.releaseHeld(ctx)
		b.pulseIdle()
		return true, err
	}
	return false, nil
}

// listen queues a listener on this node's mailbox: a new EX request that
// waits behind the sender holding the mailbox (or is granted at once if
// nobody does; it is then kept until a request blocks behind it).
func (b *Broadcaster) listen() error {
	l := &listener{}
	b.mu.Lock()
	b.lis = l
	b.m.Listening()
	b.mu.Unlock()
	self := b.cfg.Self
	h, err := b.async.RequestAsync(dlm.LockSpec{Resource: MailboxLock(self), Mode: dlm.EX, Flags: dlm.ValBlk,
		OnBlock: func(dlm.Mode) { b.listenerBlocked(l) }}, func(err error) { b.listenerDone(l, err) })
	b.mu.Lock()
	defer b.mu.Unlock()
	if err != nil {
		if b.lis == l {
			b.lis = nil
			b.m.ListenerFailed()
		}
		return fmt.Errorf("broadcast: node %d: queue a listener on %s: %w", self, MailboxLock(self), err)
	}
	l.h = h
	return nil
}

// releaseHeld queues the next listener, then releases the kept one
// without writing its value: the request blocked behind the kept one (a
// sender's conversion, or a new token holder taking the mailbox) is
// granted first, since a conversion is served before new requests and a
// new request queued earlier stays ahead of ours.
func (b *Broadcaster) releaseHeld(ctx context.Context) error {
	b.mu.Lock()
	l := b.held
	b.mu.Unlock()
	var err error
	if l != nil {
		err = b.listen()
		if err == nil {
			b.mu.Lock()
			b.held = nil
			b.mu.Unlock()
			if uerr := b.unlock(ctx, l.h, 0); uerr != nil && !gone(uerr) {
				err = uerr
			}
		}
	}
	b.mu.Lock()
	if err == nil || l == nil {
		b.m.MailboxReleased()
	} else {
		b.m.Done() // kept; retried when signalled again
	}
	b.mu.Unlock()
	if err != nil {
		b.signal()
		return fmt.Errorf("broadcast: node %d: release the mailbox: %w", b.cfg.Self, err)
	}
	return nil
}

// newest returns, of base (a message lock value) and the broadcasts in
// the copy locks of the nodes the token lists as joined, the one with the highest
// sequence number: a broadcast that reached a receiver only through its
// mailbox is in that receiver's copy lock, and survives there the death of
// its sender and of the message lock's master. Copy locks that cannot be
// read are skipped (their node is gone, or had none).
func (b *Broadcaster) newest(ctx context.Context, base []byte) []byte {
	if b.async == nil {
		return base // no mailboxes: every receiver reads the message lock
	}
	b.mu.Lock()
	nodes := b.m.CopyHolders()
	b.mu.Unlock()
	vals := make([][]byte, len(nodes))
	// One after the other: this runs only at a join, a catch-up or a
	// finish, and Config.Parallel is the send path's.
	Sequential(len(nodes), func(i int) {
		lctx, cancel := b.lockCtx(ctx)
		defer cancel()
		h, err := b.cfg.Locker.Request(lctx, dlm.LockSpec{Resource: CopyLock(nodes[i]), Mode: dlm.CR, Flags: dlm.ValBlk})
		if err != nil {
			return
		}
		if !invalid(h) {
			vals[i] = h.LVB()
		}
		_ = b.unlock(ctx, h, 0)
	})
	b.mu.Lock()
	if b.copyLk != nil && b.copySeq > 0 {
		vals = append(vals, b.copyLk.LVB()) // this node's own, as last written
	}
	b.mu.Unlock()
	best, _ := rawSeq(base)
	for _, v := range vals {
		e, err := DecodeEnvelope(v)
		if err == nil && e.Seq > best {
			best, base = e.Seq, v
		}
	}
	return base
}

// keepCopy writes broadcast lvb (sequence number seq, just taken from the
// mailbox) into this node's copy lock: PW -> PW with VALBLK. That is local
// when this node masters its copy lock (it took it first, at Join), so no
// frame is sent.
func (b *Broadcaster) keepCopy(ctx context.Context, lvb []byte, seq uint64) error {
	b.mu.Lock()
	cp := b.copyLk
	done := seq <= b.copySeq
	b.mu.Unlock()
	if cp == nil || done {
		return nil
	}
	if err := cp.SetLVB(lvb); err != nil {
		return err
	}
	// PW -> PW with VALBLK writes the value in one conversion (a lock
	// manager writes the value on any conversion from PW or EX), where
	// PW -> NL -> PW took two. Granted at once (readers hold CR, compatible
	// with PW): the lazy bound starts no timer unless it waits.
	cctx := b.quickCtx(ctx)
	defer cctx.cancel()
	if err := cp.Convert(cctx, dlm.PW, dlm.ValBlk); err != nil {
		return fmt.Errorf("write %s (PW to PW): %w", CopyLock(b.cfg.Self), err)
	}
	b.mu.Lock()
	b.copySeq = seq
	b.mu.Unlock()
	return nil
}

// receiveMailbox carries out a receive from the mailbox: the granted
// listener's value is the broadcast (else the listener is kept, see
// Machine.MailboxIncoming). Queue the next listener first (it waits behind
// the sender's conversion, which the reply grants), act, then release the
// granted listener with the reply as its value.
func (b *Broadcaster) receiveMailbox(ctx context.Context, job Job) error {
	if b.cfg.mutation == mutRecvTakesSendLock {
		if err := b.acquire(ctx, "receive"); err != nil {
			b.retry(job)
			return err
		}
		defer b.release()
	}
	self := b.cfg.Self
	b.mu.Lock()
	if len(b.granted) == 0 {
		b.m.Done()
		b.mu.Unlock()
		return nil
	}
	l := b.granted[0]
	if l.h == nil { // its request call has not returned yet
		b.m.Retry(job)
		b.mu.Unlock()
		b.signal()
		return nil
	}
	b.mu.Unlock()
	b.tr("recv: loop started", self)
	lvb, inval := l.h.LVB(), invalid(l.h)
	b.mu.Lock()
	d, ok := b.m.MailboxIncoming(lvb, inval)
	if !ok {
		b.granted = b.granted[1:]
		b.held = l
		b.stats.Held++
		b.m.Hold(l.blocked)
		b.mu.Unlock()
		return nil
	}
	b.mu.Unlock()
	b.tr("recv: message read", self)
	if e, err := DecodeEnvelope(lvb); err == nil {
		if err := b.keepCopy(ctx, lvb, e.Seq); err != nil {
			b.retry(job)
			if gone(err) {
				b.lost(err)
			}
			return fmt.Errorf("broadcast: node %d: keep broadcast %d in %s: %w", self, e.Seq, CopyLock(self), err)
		}
	}
	// Queue the next listener before answering: it waits behind the
	// sender's conversion (queued already, in the frame that granted this
	// listener), and the unlock below then grants the conversion and
	// causes the blocking callback for the new listener in one step, so
	// both reach the sender in one frame. This relies on this node
	// mastering its mailbox (Join takes it first); where another node does,
	// the unlock is held back by the lock manager until its next message
	// there or its deferral timer.
	if err := b.listen(); err != nil {
		// The decision is remembered (an act is answered from memory).
		b.retry(job)
		return err
	}
	b.mu.Lock()
	b.granted = b.granted[1:]
	b.mu.Unlock()
	reply := d.Reply
	if d.Act {
		reply = b.act(ctx, d.Env)
	}
	b.tr("recv: acted", self)
	if b.skipReply(reply) {
		// md-like: the sender's request stays blocked behind the listener.
		b.mu.Lock()
		b.held = l
		b.m.Hold(false)
		b.mu.Unlock()
		return nil
	}
	err := l.h.SetLVB(reply.Encode(b.cfg.Locker.LVBLen()))
	if err == nil {
		err = b.unlock(ctx, l.h, dlm.ValBlk)
	}
	b.mu.Lock()
	b.m.MailboxReplied()
	if err == nil {
		b.stats.Replies++
	}
	b.mu.Unlock()
	if err != nil {
		if gone(err) {
			b.lost(err)
		}
		return fmt.Errorf("broadcast: node %d: reply to broadcast %d through %s: %w", self, reply.Seq, MailboxLock(self), err)
	}
	b.tr("recv: replied", self)
	return nil
}

// receive carries out one receive job: read the message lock in CR (and
// let it go at once: the value is copied); decide; arm the other ack lock
// if it is not (so that the next broadcast finds it armed); act; write the
// reply into the notified ack lock and drop it to NL, which grants the
// waiting sender's CR and hands it the reply.
func (b *Broadcaster) receive(ctx context.Context, job Job) (err error) {
	if b.cfg.mutation == mutRecvTakesSendLock {
		if err := b.acquire(ctx, "receive"); err != nil {
			b.retry(job)
			return err
		}
		defer b.release()
	}
	self := b.cfg.Self
	b.mu.Lock()
	ack, rm := b.ack, b.recvMsg
	b.mu.Unlock()
	if ack[0] == nil || ack[1] == nil || rm == nil {
		b.lost(errors.New("no locks"))
		return nil
	}
	b.tr("recv: loop started", self)
	lctx, cancel := b.lockCtx(ctx)
	err = rm.Convert(lctx, dlm.CR, dlm.ValBlk)
	cancel()
	b.tr("recv: message read", self)
	if err != nil {
		b.retry(job)
		if gone(err) {
			b.lost(err)
		}
		return fmt.Errorf("broadcast: node %d: read %s in CR: %w", self, MessageLock, err)
	}
	lvb := rm.LVB()
	if !job.Notified {
		lvb = b.newest(ctx, lvb)
	}
	if err := b.down(ctx, rm, dlm.NL, 0); err != nil {
		b.retry(job)
		if gone(err) {
			b.lost(err)
		}
		return fmt.Errorf("broadcast: node %d: %w", self, err)
	}
	b.mu.Lock()
	d := b.m.Incoming(lvb, job.Notified)
	other, needArm := b.m.NeedArm(job.Lock)
	b.mu.Unlock()
	if job.Notified && needArm {
		// Granted at once unless the sender that asked it last has not let
		// go yet; a blocking callback makes that sender send its unlock.
		lctx, cancel := b.lockCtx(ctx)
		err := ack[other].Convert(lctx, dlm.EX, 0)
		cancel()
		if err != nil {
			b.retry(job)
			if gone(err) {
				b.lost(err)
			}
			return fmt.Errorf("broadcast: node %d: arm %s in EX: %w", self, AckLock(self, other), err)
		}
		b.mu.Lock()
		b.m.Rearmed(other)
		b.mu.Unlock()
	}
	b.tr("recv: other ack armed", self)
	reply := d.Reply
	if d.Act {
		reply = b.act(ctx, d.Env)
	}
	b.tr("recv: acted", self)
	if d.NoReply || b.skipReply(reply) {
		b.mu.Lock()
		b.m.Done()
		b.mu.Unlock()
		return nil
	}
	h := ack[job.Lock]
	if err := h.SetLVB(reply.Encode(b.cfg.Locker.LVBLen())); err != nil {
		b.retry(job)
		return fmt.Errorf("broadcast: node %d: reply: %w", self, err)
	}
	if err := b.down(ctx, h, dlm.NL, dlm.ValBlk); err != nil {
		b.retry(job)
		if gone(err) {
			b.lost(err)
		}
		return fmt.Errorf("broadcast: node %d: reply to broadcast %d: %w", self, reply.Seq, err)
	}
	b.tr("recv: replied", self)
	b.mu.Lock()
	b.m.Replied(job.Lock)
	b.stats.Replies++
	b.mu.Unlock()
	if b.log.Enabled(ctx, slog.LevelDebug) {
		b.log.Debug("broadcast: replied", "seq", reply.Seq, "status", reply.Status, "lock", AckLock(self, job.Lock))
	}
	return nil
}

func (b *Broadcaster) retry(job Job) {
	b.mu.Lock()
	b.m.Retry(job)
	b.mu.Unlock()
}

// skipReply is where the md-like mutations leave a receive unanswered.
func (b *Broadcaster) skipReply(r Reply) bool {
	switch b.cfg.mutation {
	case mutNoReplyOnError:
		return r.Status == StatusFailed || r.Status == StatusTimeout
	case mutNoReplyUnknown:
		return r.Status == StatusUnknownType
	}
	return false
}

// act calls the Receiver for e, bounded by ReceiveTimeout, and returns the
// reply. A panicking handler is an error, not a crash that would leave
// every sender waiting.
func (b *Broadcaster) act(ctx context.Context, e Envelope) Reply {
	hctx := newHandlerCtx(ctx, b.cfg.ReceiveTimeout, handlerInfo{b: b, seq: e.Seq})
	defer hctx.cancel()
	err := func() (err error) {
		defer func() {
			if p := recover(); p != nil {
				err = fmt.Errorf("receiver panicked: %v", p)
			}
		}()
		return b.cfg.Receiver.Receive(hctx, e.Sender, e.Msg)
	}()
	overran := errors.Is(hctx.Err(), context.DeadlineExceeded)
	b.mu.Lock()
	r := b.m.Acted(e, err, overran)
	b.stats.Receives++
	if err != nil {
		b.stats.HandlerErrors++
	}
	b.mu.Unlock()
	if err != nil {
		b.log.Warn("broadcast: receiver failed", "seq", e.Seq, "from", e.Sender, "msg", e.Msg.Type, "status", r.Status, "err", err)
	} else if b.log.Enabled(ctx, slog.LevelDebug) {
		b.log.Debug("broadcast: acted", "seq", e.Seq, "from", e.Sender, "msg", e.Msg.Type)
	}
	return r
}

// --- sending ---

// Txn is a transaction: the token held across several broadcasts, as md
// holds it from metadata_update_start to metadata_update_finish (adding a
// disk: NEWDISK, the no-new-dev check, METADATA_UPDATED). No other node
// can send or join meanwhile. Not for concurrent use; End it promptly.
type Txn struct {
	b    *Broadcaster
	done bool
}

// Begin takes the token (waiting at most LockTimeout) and starts a
// transaction. It waits for this node's other senders first.
func (b *Broadcaster) Begin(ctx context.Context) (*Txn, error) {
	if b.inHandler(ctx) {
		return nil, fmt.Errorf("broadcast: begin: %w", ErrInHandler)
	}
	if err := b.acquire(ctx, "begin"); err != nil {
		return nil, err
	}
	if err := b.takeToken(ctx, "begin"); err != nil {
		b.release()
		return nil, err
	}
	return &Txn{b: b}, nil
}

// takeToken converts the token to EX unless it is cached there. Called
// with sem held.
func (b *Broadcaster) takeToken(ctx context.Context, what string) error {
	self := b.cfg.Self
	b.mu.Lock()
	ph, held, tok := b.m.Phase(), b.m.TokenHeld(), b.token
	b.mu.Unlock()
	if ph != Joined || tok == nil {
		return fmt.Errorf("broadcast: node %d: %s: %w (%s)", self, what, ErrNotJoined, ph)
	}
	if held {
		if tok.Mode() == dlm.EX {
			return nil
		}
		b.lost(errors.New("cached token lock is gone"))
		return fmt.Errorf("broadcast: node %d: %s: cached %s lock is gone: %w", self, what, TokenLock, ErrNotJoined)
	}
	lctx, cancel := b.lockCtx(ctx)
	defer cancel()
	if err := tok.Convert(lctx, dlm.EX, dlm.ValBlk); err != nil {
		if gone(err) {
			b.lost(err)
		}
		return fmt.Errorf("broadcast: node %d: %s: take %s in EX: %w", self, what, TokenLock, err)
	}
	b.mu.Lock()
	b.m.TokenGranted(tok.LVB(), invalid(tok))
	b.mu.Unlock()
	return nil
}

// releaseToken writes the token's value and converts it to NL. Called with
// sem held.
func (b *Broadcaster) releaseToken(ctx context.Context) error {
	b.mu.Lock()
	if !b.m.TokenHeld() || b.token == nil {
		b.mu.Unlock()
		return nil
	}
	val := b.m.TokenValue(b.cfg.Locker.LVBLen())
	tok := b.token
	b.mu.Unlock()
	// The mailboxes go with the token: the next holder takes them.
	for _, err := range b.releaseBoxes(ctx) {
		b.log.Warn("broadcast: releasing a mailbox with the token", "err", err)
	}
	err := tok.SetLVB(val)
	if err == nil {
		err = b.down(ctx, tok, dlm.NL, dlm.ValBlk)
	}
	b.mu.Lock()
	b.m.TokenReleased()
	b.mu.Unlock()
	if err != nil {
		if gone(err) {
			b.lost(err)
		}
		return fmt.Errorf("broadcast: node %d: release the token: %w", b.cfg.Self, err)
	}
	return nil
}

// Send broadcasts m within the transaction and returns when every joined
// receiver has answered, or SendTimeout (from this call) has passed. The
// Result says who acted, who failed (and why), who did not answer, who is
// not joined and who departed. Receivers' failures are not an error of
// Send: see Result.Err. An error (a lock that could not be taken, a
// receiver that did not answer: ErrNoAnswer) ends the transaction and
// releases the token.
func (t *Txn) Send(ctx context.Context, m Message) (Result, error) {
	b := t.b
	if t.done {
		return Result{}, fmt.Errorf("broadcast: node %d: send %s: %w", b.cfg.Self, m.Type, ErrTxnDone)
	}
	if b.inHandler(ctx) {
		return Result{}, fmt.Errorf("broadcast: send %s: %w", m.Type, ErrInHandler)
	}
	sctx, cancel := context.WithTimeout(ctx, b.cfg.SendTimeout)
	defer cancel()
	return t.sendBounded(ctx, sctx, m)
}

// sendBounded is Txn.Send once its bound is set: sctx is ctx bounded by
// SendTimeout. Broadcaster.Send passes its own bounded context as both
// (its bound, from the same SendTimeout, ends first), which saves a second
// timer per broadcast.
func (t *Txn) sendBounded(ctx, sctx context.Context, m Message) (Result, error) {
	b := t.b
	start := b.now()
	res, err := b.send(sctx, m)
	b.mu.Lock()
	if err != nil {
		b.stats.SendErrors++
	} else {
		d := b.now().Sub(start)
		b.stats.LastSend = d
		b.sendTotal += d
		b.sendOK++
	}
	b.stats.ReceiverErrors += uint64(len(res.Failed))
	b.mu.Unlock()
	if err != nil {
		t.abort(ctx)
	}
	return res, err
}

// End ends the transaction: the token goes back to NL, or stays cached in
// EX (see Config.ReleaseToken) until another node asks for it. End after
// End, or after a failed Send ended the transaction, does nothing.
func (t *Txn) End(ctx context.Context) error {
	if t.done {
		return nil
	}
	t.done = true
	b := t.b
	b.mu.Lock()
	rel := b.cfg.ReleaseToken || b.m.TokenWanted() || b.m.Phase() != Joined
	b.mu.Unlock()
	var err error
	if rel {
		err = b.releaseToken(ctx)
	}
	b.release()
	b.mu.Lock()
	wanted := b.m.TokenWanted()
	b.mu.Unlock()
	if wanted {
		// Asked for while we held the send lock after deciding to keep it:
		// the receive loop releases it now that the send lock is free.
		b.signal()
	}
	return err
}

// abort ends the transaction after a failed send, releasing the token so
// that a bound never leaves it held.
func (t *Txn) abort(ctx context.Context) {
	if t.done {
		return
	}
	t.done = true
	b := t.b
	if err := b.releaseToken(ctx); err != nil {
		b.log.Warn("broadcast: releasing the token after a failed send", "err", err)
	}
	b.release()
}

// Send broadcasts m in a transaction of its own: Begin, Txn.Send, End, all
// within SendTimeout.
func (b *Broadcaster) Send(ctx context.Context, m Message) (Result, error) {
	if b.inHandler(ctx) {
		return Result{}, fmt.Errorf("broadcast: send %s: %w", m.Type, ErrInHandler)
	}
	sctx, cancel := context.WithTimeout(ctx, b.cfg.SendTimeout)
	defer cancel()
	t, err := b.Begin(sctx)
	if err != nil {
		b.mu.Lock()
		b.stats.SendErrors++
		b.mu.Unlock()
		return Result{}, fmt.Errorf("broadcast: send %s: %w", m.Type, err)
	}
	// Txn.Send's checks hold here: t is new, and ctx is not a handler's.
	res, err := t.sendBounded(sctx, sctx, m)
	if err != nil {
		return res, err
	}
	return res, t.End(ctx)
}

// send publishes m and collects the answers; the caller holds the token.
func (b *Broadcaster) send(ctx context.Context, msg Message) (Result, error) {
	b.mu.Lock()
	sm := b.sendMsg
	finish := b.m.NeedsFinish()
	b.mu.Unlock()
	if sm == nil {
		return Result{}, fmt.Errorf("broadcast: node %d: send %s: %w", b.cfg.Self, msg.Type, ErrNotJoined)
	}
	b.tr("send: token held", b.cfg.Self)
	if err := b.takeMessage(ctx, sm); err != nil {
		return Result{}, fmt.Errorf("broadcast: send %s: %w", msg.Type, err)
	}
	b.tr("send: message in EX", b.cfg.Self)
	if finish {
		val := b.newest(ctx, sm.LVB())
		b.mu.Lock()
		e, act, ok := b.m.Finish(val)
		b.mu.Unlock()
		if ok {
			if err := b.finish(ctx, sm, e, act); err != nil {
				return Result{}, fmt.Errorf("broadcast: send %s: %w", msg.Type, err)
			}
			if err := b.takeMessage(ctx, sm); err != nil {
				return Result{}, fmt.Errorf("broadcast: send %s: %w", msg.Type, err)
			}
		}
	}
	b.mu.Lock()
	e := b.m.Publish(sm.LVB(), msg)
	b.mu.Unlock()
	return b.publish(ctx, sm, e)
}

// takeMessage converts the sending message lock NL to EX, reading its
// value. It waits only for receivers still reading the previous broadcast
// (they let go as soon as they have copied it); the error names the
// previous broadcast's laggards when there were any.
func (b *Broadcaster) takeMessage(ctx context.Context, sm dlm.LockHandle) error {
	lctx := b.quickLockCtx(ctx)
	defer lctx.cancel()
	err := sm.Convert(lctx, dlm.EX, dlm.ValBlk)
	if err == nil {
		return nil
	}
	if gone(err) {
		b.lost(err)
	}
	b.mu.Lock()
	seq, lag := b.m.Laggards()
	b.mu.Unlock()
	if len(lag) > 0 {
		return fmt.Errorf("broadcast: node %d: take %s in EX (nodes %v had not answered broadcast %d): %w",
			b.cfg.Self, MessageLock, lag, seq, err)
	}
	return fmt.Errorf("broadcast: node %d: take %s in EX (waiting for the previous broadcast's readers): %w", b.cfg.Self, MessageLock, err)
}

// finish re-publishes a broadcast whose sender died with the token, so
// that every receiver has acted on it before the next one; this node acts
// on it first if it had not. Holds the message lock in EX on entry, NL on
// return.
func (b *Broadcaster) finish(ctx context.Context, sm dlm.LockHandle, e Envelope, act bool) error {
	if act {
		b.act(ctx, e)
	}
	res, err := b.publish(ctx, sm, e)
	b.mu.Lock()
	b.m.Finished()
	b.stats.Finishes++
	b.mu.Unlock()
	b.log.Info("broadcast: finished a broadcast whose sender's token holder died", "seq", e.Seq, "from", e.Sender, "msg", e.Msg.Type,
		"acted", res.Acted, "failed", len(res.Failed), "unanswered", res.Unanswered)
	if err != nil {
		return fmt.Errorf("finishing broadcast %d from node %d: %w", e.Seq, e.Sender, err)
	}
	return nil
}

// ask asks receiver r for its answer to e: a CR request on its ack lock
// e.Toggle, which blocks (notifying r) until r answers, or is granted at
// once if r does not hold that lock. Then, unless the grant carried r's
// answer to e, the other ack lock the same way: a joined receiver always
// holds one of them. Each lock is released as soon as its value is read.
func (b *Broadcaster) ask(ctx context.Context, e Envelope, r dlm.NodeID, n int) Answer {
	a := Answer{Node: r}
	b.tr("send: ask", r)
	for k, lock := range [2]uint8{e.Toggle, e.Toggle ^ 1} {
		h, err := b.cfg.Locker.Request(ctx, dlm.LockSpec{Resource: AckLock(r, lock), Mode: dlm.CR, Flags: dlm.ValBlk})
		if err != nil {
			a.Err = err
			return a
		}
		a.Tried = k + 1
		b.tr("send: ack granted", r)
		a.LVB[k], a.Invalid[k] = h.LVB(), invalid(h)
		if len(a.LVB[k]) != n {
			a.LVB[k] = make([]byte, n)
		}
		if err := b.unlock(ctx, h, 0); err != nil {
			b.log.Warn("broadcast: releasing a receiver's ack lock", "err", err)
		}
		if !a.Invalid[k] && Matches(e.Seq, r, a.LVB[k]) {
			return a
		}
	}
	return a
}

// askMailbox asks receiver r through its mailbox: take the mailbox in EX
// unless this node holds it already, write val into it as it goes EX -> NL
// (which grants r's listener: r is notified and has the broadcast), and
// convert back to EX, which waits behind the listener until r releases it
// with its reply. Any outcome but r's reply to e (r was not listening: it
// is not joined, departed, or its listener was held up) falls back to ask,
// which tells them apart; a lock error is the answer, as in ask.
func (b *Broadcaster) askMailbox(ctx context.Context, e Envelope, val []byte, r dlm.NodeID, n int) Answer {
	b.tr("send: ask", r)
	b.mu.Lock()
	h := b.boxes[r]
	b.mu.Unlock()
	switch {
	case h == nil:
		nh, err := b.cfg.Locker.Request(ctx, dlm.LockSpec{Resource: MailboxLock(r), Mode: dlm.EX, Flags: dlm.ValBlk})
		if err != nil {
			return Answer{Node: r, Err: err}
		}
		h = nh
		b.mu.Lock()
		b.boxes[r] = h
		b.mu.Unlock()
	case h.Mode() != dlm.EX:
		// A send that stopped waiting left it in NL.
		if err := h.Convert(ctx, dlm.EX, dlm.ValBlk); err != nil {
			if gone(err) {
				b.mu.Lock()
				delete(b.boxes, r)
				b.mu.Unlock()
			}
			return Answer{Node: r, Err: err}
		}
	}
	err := h.SetLVB(val)
	if err == nil {
		// Deferred by the lock manager, it travels with the conversion
		// below, in one frame.
		err = b.down(ctx, h, dlm.NL, dlm.ValBlk)
	}
	if err == nil {
		err = h.Convert(ctx, dlm.EX, dlm.ValBlk)
	}
	if err != nil {
		if gone(err) {
			b.mu.Lock()
			delete(b.boxes, r)
			b.mu.Unlock()
		}
		return Answer{Node: r, Err: err}
	}
	b.tr("send: ack granted", r)
	lvb := h.LVB()
	if len(lvb) != n {
		lvb = make([]byte, n)
	}
	if !invalid(h) && Matches(e.Seq, r, lvb) {
		return Answer{Node: r, Tried: 1, LVB: [2][]byte{lvb}}
	}
	b.mu.Lock()
	b.stats.Fallbacks++
	b.mu.Unlock()
	return b.ask(ctx, e, r, n)
}

// publish writes e into the message lock (EX to CW publishes it), asks
// every receiver for its answer at once (ask), releases the message lock and
// returns the Result. Holds the message lock in EX on entry, NL on return.
func (b *Broadcaster) publish(ctx context.Context, sm dlm.LockHandle, e Envelope) (Result, error) {
	self := b.cfg.Self
	n := b.cfg.Locker.LVBLen()
	// Encoded once: the message lock and every mailbox get the same
	// value (SetLVB copies it).
	val := e.Encode(n)
	if err := sm.SetLVB(val); err != nil {
		_ = b.down(ctx, sm, dlm.NL, 0)
		return Result{Seq: e.Seq}, fmt.Errorf("broadcast: node %d: broadcast %d: %w", self, e.Seq, err)
	}
	if err := b.down(ctx, sm, dlm.CW, dlm.ValBlk); err != nil {
		// Whether it was published is unknown: if it was, receivers act on
		// it when notified by a later finish or catch-up, never twice.
		if gone(err) {
			b.lost(err)
		}
		return Result{Seq: e.Seq}, fmt.Errorf("broadcast: node %d: publish broadcast %d (%s) through %s: %w", self, e.Seq, e.Msg.Type, MessageLock, err)
	}
	b.tr("send: published", self)
	b.mu.Lock()
	recv := b.m.Receivers()
	viaBox := make([]bool, len(recv))
	if b.async != nil && !b.cfg.ReleaseToken {
		for i, r := range recv {
			viaBox[i] = b.m.MailboxReceiver(r)
		}
	}
	b.stats.Sends++
	b.mu.Unlock()
	answers := make([]Answer, len(recv))
	b.cfg.Parallel(len(recv), func(i int) {
		if viaBox[i] {
			answers[i] = b.askMailbox(ctx, e, val, recv[i], n)
		} else {
			answers[i] = b.ask(ctx, e, recv[i], n)
		}
	})
	if err := b.down(ctx, sm, dlm.NL, 0); err != nil {
		if gone(err) {
			b.lost(err)
		}
		return Result{Seq: e.Seq}, fmt.Errorf("broadcast: node %d: release %s after broadcast %d: %w", self, MessageLock, e.Seq, err)
	}
	b.tr("send: all answered, message in NL", self)
	b.mu.Lock()
	res := b.m.Sent(e.Seq, answers)
	b.mu.Unlock()
	if len(res.Failed) > 0 || len(res.Unanswered) > 0 || len(res.Departed) > 0 {
		b.log.Warn("broadcast: not every receiver acted", "seq", e.Seq, "msg", e.Msg.Type, "acted", res.Acted,
			"failed", res.Err(), "unanswered", res.Unanswered, "departed", res.Departed, "not_joined", res.NotJoined)
	} else if b.log.Enabled(ctx, slog.LevelDebug) {
		b.log.Debug("broadcast: sent", "seq", e.Seq, "msg", e.Msg.Type, "acted", res.Acted, "not_joined", res.NotJoined)
	}
	if len(res.Unanswered) > 0 {
		return res, fmt.Errorf("broadcast: node %d: broadcast %d (%s): no answer from nodes %v within the send timeout: %w",
			self, e.Seq, e.Msg.Type, res.Unanswered, ErrNoAnswer)
	}
	return res, nil
}
