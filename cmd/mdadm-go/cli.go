package main

import (
	"fmt"
	"io"
	"sort"
	"strings"
	"time"
)

// Exit statuses, as mdadm uses them.
const (
	exitOK    = 0
	exitFail  = 1 // a device could not be examined / operation failed
	exitUsage = 2 // bad command line
)

// env is everything a mode may touch outside its arguments; tests build
// their own.
type env struct {
	stdout, stderr io.Writer
	prog           string         // prefix for diagnostics
	hostname       string         // default homehost ("<system>")
	location       *time.Location // time zone for printed times
}

// errorf prints a diagnostic the way mdadm does: "prog: message".
func (e *env) errorf(format string, a ...any) {
	fmt.Fprintf(e.stderr, "%s: "+format, append([]any{e.prog}, a...)...)
}

// options holds the parsed command line.
type options struct {
	mode     *mode
	devices  []string
	homehost string // as given; "" means default
	verbose  int
}

// mode is one of mdadm's operating modes (here: the "misc" operations that
// act on devices). Later issues add create, assemble, detail... by adding
// entries to modeTable; the dispatcher does not change.
type mode struct {
	short byte   // short option letter, 0 if none
	long  string // long option name
	help  string // one line for --help
	run   func(e *env, o *options) int
}

// modeTable lists the modes this build supports.
func modeTable() []*mode {
	return []*mode{
		{short: 'E', long: "examine", help: "print the md superblock of each member device", run: runExamine},
		{short: 'X', long: "examine-bitmap", help: "print the write-intent bitmap of a member device or bitmap file", run: runExamineBitmap},
	}
}

func usage(e *env, w io.Writer) {
	fmt.Fprintf(w, "Usage: %s MODE [OPTIONS] DEVICE...\n\nModes:\n", e.prog)
	ms := modeTable()
	sort.Slice(ms, func(i, j int) bool { return ms[i].long < ms[j].long })
	for _, m := range ms {
		fmt.Fprintf(w, "  -%c, --%-16s %s\n", m.short, m.long, m.help)
	}
	fmt.Fprintf(w, "\nOptions:\n  --homehost=NAME     homehost for --examine (default: this host's name; <none> for none)\n  -v, --verbose       accepted for compatibility\n  -h, --help          this text\n")
}

// run parses args, dispatches to the mode and returns the exit status.
func run(args []string, e *env) int {
	o, status, done := parse(args, e)
	if done {
		return status
	}
	return o.mode.run(e, o)
}

// parse reads the command line. done is true when the program should exit
// with status without running a mode (help, errors).
func parse(args []string, e *env) (o *options, status int, done bool) {
	o = &options{}
	table := modeTable()
	setMode := func(m *mode) bool {
		if o.mode != nil && o.mode != m {
			e.errorf("--%s cannot be given with --%s\n", o.mode.long, m.long)
			return false
		}
		o.mode = m
		return true
	}
	bad := func(format string, a ...any) (*options, int, bool) {
		e.errorf(format, a...)
		fmt.Fprintf(e.stderr, "Usage: %s --help\n  for help\n", e.prog)
		return nil, exitUsage, true
	}
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			o.devices = append(o.devices, args[i+1:]...)
			i = len(args)
		case strings.HasPrefix(a, "--"):
			name, val, hasVal := strings.Cut(a[2:], "=")
			switch name {
			case "help":
				usage(e, e.stdout)
				return nil, exitOK, true
			case "verbose":
				o.verbose++
				continue
			case "homehost":
				if !hasVal {
					if i+1 >= len(args) {
						return bad("option --homehost requires an argument\n")
					}
					i++
					val = args[i]
				}
				o.homehost = val
				continue
			}
			m := findLong(table, name)
			if m == nil {
				return bad("unrecognised option '%s'\n", a)
			}
			if hasVal {
				return bad("option '--%s' doesn't allow an argument\n", name)
			}
			if !setMode(m) {
				return nil, exitUsage, true
			}
		case len(a) > 1 && a[0] == '-':
			for _, c := range []byte(a[1:]) {
				switch c {
				case 'h':
					usage(e, e.stdout)
					return nil, exitOK, true
				case 'v':
					o.verbose++
					continue
				}
				m := findShort(table, c)
				if m == nil {
					return bad("invalid option -- '%c'\n", c)
				}
				if !setMode(m) {
					return nil, exitUsage, true
				}
			}
		default:
			o.devices = append(o.devices, a)
		}
	}
	if o.mode == nil {
		if len(o.devices) == 0 {
			usage(e, e.stderr)
			return nil, exitUsage, true
		}
		return bad("no mode given for %s (supported: --examine, --examine-bitmap)\n", o.devices[0])
	}
	return o, 0, false
}

func findLong(t []*mode, name string) *mode {
	for _, m := range t {
		if m.long == name {
			return m
		}
	}
	return nil
}

func findShort(t []*mode, c byte) *mode {
	for _, m := range t {
		if m.short == c {
			return m
		}
	}
	return nil
}

// homehost resolves --homehost the way mdadm does: default and "<system>"
// mean this host's name, "" and "<none>" mean none.
func (o *options) homehostFor(e *env) string {
	h := o.homehost
	if h == "" || strings.EqualFold(h, "<system>") {
		h = e.hostname
	}
	if strings.EqualFold(h, "<none>") || strings.EqualFold(h, "<ignore>") {
		return ""
	}
	return h
}
