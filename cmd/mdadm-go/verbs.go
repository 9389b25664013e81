package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/ctl"
	"golang.org/x/sys/unix"
)

// session holds the connection to mdclusterd, opened on first use.
type session struct {
	e      *env
	o      *options
	ctx    context.Context
	client *ctl.Client
}

// socketPath is --socket, else $MDCLUSTER_SOCKET, else ctl.DefaultSocket.
func (s *session) socketPath() string {
	if s.o.socket != "" {
		return s.o.socket
	}
	if p := s.e.getenv(SocketEnv); p != "" {
		return p
	}
	return ctl.DefaultSocket
}

// dial connects to the daemon; it prints why not and returns nil when it
// cannot.
func (s *session) dial() *ctl.Client {
	if s.client != nil {
		return s.client
	}
	path := s.socketPath()
	c, err := ctl.Dial(s.ctx, path)
	if err != nil {
		s.e.errorf("cannot reach mdclusterd at %s: %v\n", path, unwrapDial(err))
		return nil
	}
	s.client = c
	return c
}

// unwrapDial drops the ctl and net prefixes from a dial error, keeping
// the system call and its error ("connect: connection refused").
func unwrapDial(err error) error {
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se
	}
	return err
}

// failed prints a failed request: a daemon's "failed" answer carries
// mdadm's text and is printed as it is; anything else names what was
// attempted. It returns mdadm's status for a failed operation.
func (s *session) failed(what string, err error) int {
	var ce *ctl.Error
	if errors.As(err, &ce) {
		switch ce.Code {
		case ctl.CodeFailed:
			if md, ok := strings.CutSuffix(ce.Message, notMdSuffix); ok {
				return s.notArray(what, md)
			}
			s.e.errorf("%s\n", ce.Message)
		case ctl.CodeNotImplemented:
			s.e.errorf("%s: not implemented yet by mdclusterd (%s)\n", what, ce.Message)
		default:
			s.e.errorf("%s: %v\n", what, ce)
		}
		return exitFail
	}
	s.e.errorf("%s: %s\n", what, strings.TrimPrefix(err.Error(), "ctl: "))
	return exitFail
}

// notMdSuffix ends the daemon's answer for an array it does not run.
const notMdSuffix = " does not appear to be an md device"

// notArray reports an array the daemon does not run as mdadm reports an
// md device it cannot use. mdadm opens the device node first, so a path
// that does not exist gets the open's error (worded as the verb's code
// path words it: Detail's "cannot open", Wait's "stat failed" with status
// 2, open_mddev's "error opening" for the others); a path that exists is
// "not an md device". The daemon's arrays have no device nodes, so an
// array it runs never gets here.
func (s *session) notArray(what, md string) int {
	_, err := s.e.statPath(md)
	if err == nil {
		s.e.errorf("%s%s\n", md, notMdSuffix)
		return exitFail
	}
	why := strerror(err)
	switch {
	case strings.HasPrefix(what, "--detail "):
		s.e.errorf("cannot open %s: %s\n", md, why)
	case strings.HasPrefix(what, "--wait "):
		s.e.errorf("stat failed for %s: %s\n", md, why)
		return exitUsage
	default:
		s.e.errorf("error opening %s: %s\n", md, why)
	}
	return exitFail
}

// strerror is C's strerror text for a system call's error: Go's errno
// strings are glibc's with a lower-case first letter.
func strerror(err error) string {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		return err.Error()
	}
	m := errno.Error()
	if m == "" {
		return m
	}
	return strings.ToUpper(m[:1]) + m[1:]
}

// call sends one array command; ok is false (and status set) when it
// failed.
func (s *session) call(what, cmd string, args, result any) (status int, ok bool) {
	c := s.dial()
	if c == nil {
		return exitFail, false
	}
	if err := c.Array(s.ctx, cmd, args, result); err != nil {
		return s.failed(what, err), false
	}
	return exitOK, true
}

// info prints a success message. mdadm 4.2 prints these with pr_err, on
// stderr, and only at the default verbosity or above.
func (s *session) info(format string, a ...any) {
	if s.o.verbose >= 0 {
		s.e.errorf(format, a...)
	}
}

func dispatch(e *env, o *options) int {
	s := &session{e: e, o: o, ctx: context.Background()}
	defer func() {
		if s.client != nil {
			_ = s.client.Close()
		}
	}()
	switch o.mode {
	case modeCreate:
		return s.create()
	case modeAssemble:
		return s.assemble()
	case modeManage:
		return s.manage()
	case modeGrow:
		return s.grow()
	}
	switch o.devmode {
	case "examine":
		return runExamine(e, o)
	case "status":
		return s.status()
	case "cluster":
		return s.cluster()
	case "locks":
		return s.locks()
	}
	// Misc mode: each device with the action given before it, as mdadm's
	// misc_list; the statuses are ORed.
	status := exitOK
	for _, d := range o.devices {
		switch d.act {
		case "examine-bitmap":
			status |= examineBitmapOne(e, d.name)
		case "zero-superblock":
			status |= zeroSuperblockOne(e, o, d.name)
		case "detail":
			status |= s.detail(d.name)
		case "stop":
			status |= s.stop(d.name)
		case "readwrite":
			status |= s.readwrite(d.name)
		case "wait":
			status |= s.wait(d.name)
		}
		if s.client == nil && d.act != "examine-bitmap" && d.act != "zero-superblock" && status != exitOK {
			return status // the daemon is unreachable: do not try each device
		}
	}
	return status
}

func (s *session) create() int {
	o := s.o
	md := o.devices[0].name
	args := ctl.CreateArgs{
		Array: md, Level: o.level, RaidDevices: o.raidDevices, Devices: names(o.devices[1:]),
		Layout: o.layout, ChunkSize: o.chunk, Bitmap: o.bitmap, BitmapChunk: o.bitmapChunk,
		Nodes: o.nodes, HomeCluster: o.homeCluster, Name: o.name, Homehost: o.homehost,
		AssumeClean: o.assumeClean, Run: o.runstop > 0, Force: o.force,
	}
	// mdadm opens every member (exclusively) before it writes anything
	// and stops at the first it cannot open, with status 2. The daemon
	// opens the same paths on this machine and would refuse too, but
	// in its own words.
	claim := s.e.claim
	if claim == nil {
		claim = claimDevice
	}
	for _, d := range args.Devices {
		if d == "missing" {
			continue
		}
		if err := claim(d); err != nil {
			s.e.errorf("cannot open %s: %s\n", d, strerror(err))
			return exitUsage
		}
	}
	var r ctl.CreateResult
	if st, ok := s.call("--create "+md, ctl.CmdArrayCreate, args, &r); !ok {
		return st
	}
	if o.level == 1 {
		// mdadm says this for raid1 whenever --metadata is not given
		// (mdadm-go has no --metadata: always 1.2, at the start); -q
		// silences it.
		s.info("Note: this array has metadata at the start and\n" +
			"    may not be suitable as a boot device.  If you plan to\n" +
			"    store '/boot' on this device please ensure that\n" +
			"    your boot-loader understands md/v1.x metadata, or use\n" +
			"    --metadata=0.90\n")
	}
	s.info("Defaulting to version 1.2 metadata\n")
	for _, w := range r.Warnings {
		s.e.errorf("%s\n", w)
	}
	if r.Started {
		s.info("array %s started.\n", md)
	}
	return exitOK
}

func (s *session) assemble() int {
	o := s.o
	args := ctl.AssembleArgs{UUID: o.uuid, Name: o.name, Scan: o.scan, Force: o.force, Run: o.runstop > 0, Readonly: o.readonly}
	what := "--assemble --scan"
	if len(o.devices) > 0 {
		args.Array, args.Devices = o.devices[0].name, names(o.devices[1:])
		what = "--assemble " + args.Array
	}
	var r ctl.AssembleResult
	if st, ok := s.call(what, ctl.CmdArrayAssemble, args, &r); !ok {
		return st
	}
	for _, a := range r.Arrays {
		for _, w := range a.Warnings {
			s.e.errorf("%s\n", w)
		}
		if !a.Started {
			s.info("%s assembled from %d drive%s, but not started.\n", a.Array, a.Drives, plural(a.Drives))
			continue
		}
		msg := fmt.Sprintf("%s has been started with %d drive%s", a.Array, a.Drives, plural(a.Drives))
		if a.Drives < a.RaidDevices {
			msg += fmt.Sprintf(" (out of %d)", a.RaidDevices)
		}
		if a.Spares > 0 {
			msg += fmt.Sprintf(" and %d spare%s", a.Spares, plural(a.Spares))
		}
		s.info("%s.\n", msg)
	}
	return exitOK
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

// manage runs mdadm's Manage steps in its order: the member devices (in
// runs of one action, in command-line order), then --stop.
func (s *session) manage() int {
	o := s.o
	md := o.devices[0].name
	devs := o.devices[1:]
	if len(devs) == 0 && o.runstop >= 0 {
		// Nothing to do, but mdadm opens the array first: an unknown
		// one is an error even then.
		var d ctl.Detail
		st, _ := s.call("--manage "+md, ctl.CmdArrayDetail, ctl.ArrayArgs{Array: md}, &d)
		return st
	}
	for len(devs) > 0 {
		n := 1
		for n < len(devs) && devs[n].act == devs[0].act {
			n++
		}
		run := devs[:n]
		devs = devs[n:]
		if st := s.manageRun(md, run[0].act, names(run)); st != exitOK {
			return st
		}
	}
	if o.runstop < 0 {
		return s.stop(md)
	}
	return exitOK
}

func (s *session) manageRun(md, act string, devs []string) int {
	var r ctl.DevicesResult
	what := "--" + act + " " + md
	if act == "cluster-confirm" {
		args := ctl.ClusterConfirmArgs{Array: md}
		for _, d := range devs {
			slot, dev, _ := parseConfirm(d) // checked while parsing
			args.Confirms = append(args.Confirms, ctl.ClusterConfirm{Slot: slot, Device: dev})
		}
		st, ok := s.call(what, ctl.CmdArrayClusterConfirm, args, &r)
		if !ok {
			return st
		}
		return s.outcomes(md, act, r)
	}
	// mdadm stats each member device named by path when it comes to it
	// (its stat_is_blkdev) and stops there: the devices before it are
	// acted on, the rest are not. The keywords are not paths; a regular
	// file passes (mdcluster takes image files as members, where mdadm
	// would say "is not a block device").
	for i, d := range devs {
		if slices.Contains(manageKeywords, d) {
			continue
		}
		if _, err := s.e.statPath(d); err != nil {
			if i > 0 {
				if st := s.manageRun(md, act, devs[:i]); st != exitOK {
					return st
				}
			}
			s.e.errorf("stat failed for %s: %s\n", d, strerror(err))
			return exitFail
		}
	}
	cmd := map[string]string{
		"add": ctl.CmdArrayAdd, "add-spare": ctl.CmdArrayAddSpare, "remove": ctl.CmdArrayRemove,
		"fail": ctl.CmdArrayFail, "re-add": ctl.CmdArrayReAdd,
	}[act]
	st, ok := s.call(what, cmd, ctl.DevicesArgs{Array: md, Devices: devs, Force: s.o.force}, &r)
	if !ok {
		return st
	}
	return s.outcomes(md, act, r)
}

// manageKeywords are the member names mdadm's manage mode reads as
// selectors rather than paths.
var manageKeywords = []string{"failed", "faulty", "detached", "missing", "set-A", "set-B", "all"}

// outcomes prints mdadm's per-device messages; the first failure ends the
// command: 1, or 2 for a busy --fail (Manage_subdevs returns 2 only when
// setting a member faulty failed with EBUSY; a busy --remove is 1).
func (s *session) outcomes(md, act string, r ctl.DevicesResult) int {
	for _, d := range r.Devices {
		if d.Error != "" {
			s.e.errorf("%s\n", d.Error)
			if d.Busy && d.Action == "" && act == "fail" {
				return exitUsage
			}
			return exitFail
		}
		switch d.Action {
		case "added":
			s.info("added %s\n", d.Device)
		case "re-added":
			s.info("re-added %s\n", d.Device)
		case "removed":
			s.info("hot removed %s from %s\n", d.Device, md)
		case "failed":
			s.info("set %s faulty in %s\n", d.Device, md)
		}
	}
	return exitOK
}

func (s *session) grow() int {
	o := s.o
	md := o.devices[0].name
	args := ctl.GrowArgs{Array: md, Bitmap: o.bitmap, BitmapChunk: o.bitmapChunk, Nodes: o.nodes, Force: o.force}
	st, _ := s.call("--grow "+md, ctl.CmdArrayGrow, args, nil)
	return st
}

func (s *session) detail(md string) int {
	var d ctl.Detail
	if st, ok := s.call("--detail "+md, ctl.CmdArrayDetail, ctl.ArrayArgs{Array: md}, &d); !ok {
		return st
	}
	s.deviceNumbers(&d)
	writeDetail(s.e.stdout, &d, s.o.homehostFor(s.e), s.e.location)
	return exitOK
}

// deviceNumbers fills in the major and minor numbers of members the
// daemon left at 0:0 (it reports none for now) from the device nodes
// here: mdadm-go runs on the daemon's machine, and mdadm prints the
// numbers of the block devices. Image files keep 0:0.
func (s *session) deviceNumbers(d *ctl.Detail) {
	for i := range d.Devices {
		r := &d.Devices[i]
		if r.Major != 0 || r.Minor != 0 || r.Device == "" {
			continue
		}
		fi, err := s.e.statPath(r.Device)
		if err != nil || fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0 {
			continue
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok {
			r.Major, r.Minor = int(unix.Major(st.Rdev)), int(unix.Minor(st.Rdev))
		}
	}
}

func (s *session) stop(md string) int {
	if st, ok := s.call("--stop "+md, ctl.CmdArrayStop, ctl.ArrayArgs{Array: md}, nil); !ok {
		return st
	}
	s.info("stopped %s\n", md)
	return exitOK
}

func (s *session) readwrite(md string) int {
	st, _ := s.call("--readwrite "+md, ctl.CmdArrayReadwrite, ctl.ArrayArgs{Array: md}, nil)
	return st
}

// wait sends array.wait and, while it is pending, polls array.detail on a
// second connection to show the progress: a bar redrawn in place on a
// terminal, a line per percent otherwise. Exit: 0 when it waited, 1 when
// nothing was running (mdadm's Wait).
func (s *session) wait(md string) int {
	c := s.dial()
	if c == nil {
		return exitFail
	}
	type result struct {
		r   ctl.WaitResult
		err error
	}
	done := make(chan result, 1)
	go func() {
		var r ctl.WaitResult
		err := c.Array(s.ctx, ctl.CmdArrayWait, ctl.ArrayArgs{Array: md}, &r)
		done <- result{r, err}
	}()
	poller, _ := ctl.Dial(s.ctx, s.socketPath())
	if poller != nil {
		defer poller.Close()
	}
	tick := time.NewTicker(s.e.poll)
	defer tick.Stop()
	drawn, last := false, ""
	for {
		select {
		case res := <-done:
			if drawn && s.e.isTerminal {
				fmt.Fprintln(s.e.stdout)
			}
			if res.err != nil {
				return s.failed("--wait "+md, res.err)
			}
			if !res.r.Waited {
				return exitFail
			}
			return exitOK
		case <-tick.C:
			if poller == nil {
				continue
			}
			var d ctl.Detail
			if poller.Array(s.ctx, ctl.CmdArrayDetail, ctl.ArrayArgs{Array: md}, &d) != nil || d.Sync == nil {
				continue
			}
			line := md + ": " + strings.TrimPrefix(progressLine(d.Sync), "\t")
			if s.e.isTerminal {
				fmt.Fprintf(s.e.stdout, "\r%s", line)
				drawn = true
				continue
			}
			// One line per whole percent (or state change) when not a terminal.
			key := fmt.Sprintf("%s %d %s", d.Sync.Action, perMille(d.Sync)/10, d.Sync.Special)
			if key != last {
				fmt.Fprintln(s.e.stdout, line)
				last = key
			}
		}
	}
}

func (s *session) status() int {
	var l ctl.ArrayList
	if st, ok := s.call("--status", ctl.CmdArrayList, nil, &l); !ok {
		return st
	}
	writeMdstat(s.e.stdout, &l)
	return exitOK
}

func (s *session) cluster() int {
	c := s.dial()
	if c == nil {
		return exitFail
	}
	st, err := c.Status(s.ctx)
	if err != nil {
		return s.failed("--cluster", err)
	}
	if err := st.WriteText(s.e.stdout); err != nil {
		return s.failed("--cluster", err)
	}
	return exitOK
}

func (s *session) locks() int {
	c := s.dial()
	if c == nil {
		return exitFail
	}
	ls := ""
	if len(s.o.devices) > 0 {
		ls = s.o.devices[0].name
	}
	l, err := c.Locks(s.ctx, ls)
	if err != nil {
		return s.failed("--locks", err)
	}
	if err := l.WriteText(s.e.stdout); err != nil {
		return s.failed("--locks", err)
	}
	return exitOK
}
