// Command dlm-demo shows the lock manager at work: several clients
// contend for a few resources, and the demo prints the queues and every
// callback as it happens (the clustered-RAID demo is cmd/mdcluster-demo).
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/mdcluster/mdcluster/dlm"
)

func main() {
	seed := flag.Uint64("seed", 1, "seed of the random contention phase")
	clients := flag.Int("clients", 4, "clients in the contention phase")
	ops := flag.Int("ops", 2000, "operations per client in the contention phase")
	flag.Parse()
	if err := run(os.Stdout, *seed, *clients, *ops); err != nil {
		fmt.Fprintln(os.Stderr, "dlm-demo:", err)
		os.Exit(1)
	}
}

// printer serialises output from callbacks and the main goroutine.
type printer struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *printer) say(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, format+"\n", args...)
}

func (p *printer) dump(ls *dlm.Lockspace, owners map[dlm.LockID]string) {
	for _, r := range ls.Dump() {
		var b strings.Builder
		fmt.Fprintf(&b, "    %-10s", r.Name)
		q := func(tag string, locks []dlm.LockInfo) {
			fmt.Fprintf(&b, " %s[", tag)
			for i, l := range locks {
				if i > 0 {
					b.WriteByte(' ')
				}
				who := owners[l.ID]
				switch l.State {
				case "granted":
					fmt.Fprintf(&b, "%s:%v", who, l.Granted)
				case "converting":
					fmt.Fprintf(&b, "%s:%v>%v", who, l.Granted, l.Requested)
				default:
					fmt.Fprintf(&b, "%s:%v", who, l.Requested)
				}
			}
			b.WriteByte(']')
		}
		q("granted", r.Granted)
		q("converting", r.Converting)
		q("waiting", r.Waiting)
		if r.LVBSeq > 0 {
			fmt.Fprintf(&b, " lvb=%q seq=%d", strings.TrimRight(string(r.LVB), "\x00"), r.LVBSeq)
		}
		if r.Idle {
			b.WriteString(" (idle, cached by its master)")
		}
		p.say("%s", b.String())
	}
}

func run(w io.Writer, seed uint64, nclients, nops int) error {
	p := &printer{w: w}
	node, err := dlm.NewNode(dlm.Config{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		return err
	}
	defer node.Close()
	ctx := context.Background()
	owners := map[dlm.LockID]string{}
	var omu sync.Mutex
	name := func(l *dlm.Lock, who string) {
		omu.Lock()
		owners[l.ID()] = who
		omu.Unlock()
	}
	dump := func(ls *dlm.Lockspace) {
		omu.Lock()
		defer omu.Unlock()
		p.dump(ls, owners)
	}

	open := func() (*dlm.Lockspace, error) { return node.Open("demo", dlm.OpenOptions{LVBLen: 32}) }
	alice, err := open()
	if err != nil {
		return err
	}
	bob, _ := open()
	carol, _ := open()

	p.say("== 1. Blocking callbacks: alice holds bitmap0000 in EX and gives way when asked")
	given := make(chan struct{})
	a, err := alice.Acquire(ctx, dlm.LockRequest{Resource: "bitmap0000", Mode: dlm.EX, Flags: dlm.ValBlk,
		OnBlock: func(l *dlm.Lock, m dlm.Mode) {
			p.say("  alice: blocking callback, someone wants %v; writing LVB and dropping to NL", m)
			_ = l.SetLVB(lvb("resync 0-4096"))
			if err := l.Convert(ctx, dlm.NL, dlm.ValBlk); err != nil {
				p.say("  alice: convert failed: %v", err)
			}
			close(given)
		}})
	if err != nil {
		return err
	}
	name(a, "alice")
	p.say("  alice: granted %v", a.Mode())
	dump(alice)
	bdone := make(chan struct{})
	b, err := bob.LockAsync(ctx, dlm.LockRequest{Resource: "bitmap0000", Mode: dlm.PR, Flags: dlm.ValBlk},
		func(l *dlm.Lock, err error) {
			p.say("  bob: completion %v, mode %v, LVB %q (seq %d)", statusOf(err), l.Mode(), trim(l.LVB()), l.LVBSeq())
			close(bdone)
		})
	if err != nil {
		return err
	}
	name(b, "bob")
	<-given
	<-bdone
	dump(alice)

	p.say("")
	p.say("== 2. Queues: conversions go before waiting requests, waiting requests in order")
	c1, _ := carol.Lock(ctx, "token", dlm.PR, 0)
	name(c1, "carol")
	b1, _ := bob.Lock(ctx, "token", dlm.PR, 0)
	name(b1, "bob")
	var wg sync.WaitGroup
	start := func(who string, ls *dlm.Lockspace, m dlm.Mode) {
		wg.Add(1)
		l, err := ls.LockAsync(ctx, dlm.LockRequest{Resource: "token", Mode: m}, func(l *dlm.Lock, err error) {
			p.say("  %s: completion %v, mode %v", who, statusOf(err), l.Mode())
			wg.Done()
		})
		if err == nil {
			name(l, who)
		}
	}
	start("alice", alice, dlm.EX)
	convDone := make(chan struct{})
	if err := b1.ConvertAsync(ctx, dlm.EX, 0, func(l *dlm.Lock, err error) {
		p.say("  bob: conversion PR>EX %v", statusOf(err))
		close(convDone)
	}); err != nil {
		return err
	}
	dump(alice)
	p.say("  carol: converts PR>EX too, which would deadlock with bob's conversion")
	if err := c1.Convert(ctx, dlm.EX, 0); err != nil {
		p.say("  carol: %v (carol keeps %v)", err, c1.Mode())
	}
	p.say("  carol: unlocks")
	_ = c1.Unlock(ctx, 0)
	<-convDone
	dump(alice)
	p.say("  bob: unlocks")
	_ = b1.Unlock(ctx, 0)
	wg.Wait()
	dump(alice)

	p.say("")
	p.say("== 3. A deadline cancels a waiting request")
	tctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	_, err = carol.Lock(tctx, "token", dlm.PR, 0)
	cancel()
	p.say("  carol: PR on token with a 20ms deadline: %v", err)

	p.say("")
	p.say("== 4. Contention: %d clients, %d operations each on 3 resources (seed %d)", nclients, nops, seed)
	for _, ls := range []*dlm.Lockspace{alice, bob, carol} {
		if err := ls.Release(); err != nil {
			return err
		}
	}
	var granted, again, cancelled atomic.Int64
	var inside [3]atomic.Int32
	var violations atomic.Int64
	t0 := time.Now()
	var cw sync.WaitGroup
	for c := range nclients {
		ls, err := open()
		if err != nil {
			return err
		}
		cw.Add(1)
		go func() {
			defer cw.Done()
			defer ls.Release()
			rng := rand.New(rand.NewPCG(seed, uint64(c)))
			modes := []dlm.Mode{dlm.NL, dlm.CR, dlm.CW, dlm.PR, dlm.PW, dlm.EX}
			for range nops {
				r := rng.IntN(3)
				m := modes[rng.IntN(6)]
				var f dlm.Flags
				if rng.IntN(4) == 0 {
					f |= dlm.NoQueue
				}
				lctx, cancel := context.WithTimeout(ctx, time.Second)
				l, err := ls.Lock(lctx, fmt.Sprintf("res%d", r), m, f)
				cancel()
				switch {
				case errors.Is(err, dlm.ErrAgain):
					again.Add(1)
					continue
				case err != nil:
					cancelled.Add(1)
					continue
				}
				granted.Add(1)
				if m == dlm.EX {
					if inside[r].Add(1) != 1 {
						violations.Add(1)
					}
					inside[r].Add(-1)
				}
				_ = l.Unlock(ctx, 0)
			}
		}()
	}
	cw.Wait()
	el := time.Since(t0)
	p.say("  granted %d, refused (NOQUEUE) %d, timed out %d, mutual-exclusion violations %d, %.0f ops/s",
		granted.Load(), again.Load(), cancelled.Load(), violations.Load(), float64(nclients*nops)/el.Seconds())
	if violations.Load() != 0 {
		return fmt.Errorf("%d mutual-exclusion violations", violations.Load())
	}
	return nil
}

func lvb(s string) []byte {
	b := make([]byte, 32)
	copy(b, s)
	return b
}

func trim(b []byte) string { return strings.TrimRight(string(b), "\x00") }

func statusOf(err error) string {
	if err == nil {
		return "granted"
	}
	return err.Error()
}
