package vmtest

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Guest builds the initramfs of a one-shot VM: busybox as the shell and
// tools, the kernel's modules, whatever binaries a test adds, and an /init
// that prepares the machine, runs the test's shell body and saves /out.
type Guest struct {
	*Initramfs
	modules    []string          // names, in load order
	moduleArgs map[string]string // insmod parameters by module name
	// Finally is shell run after the body whether it failed or not,
	// before /out is saved: collecting logs (dmesg, daemons' logs).
	Finally string
	// ConsoleCopy also writes the log to the second serial port, /dev/ttyS1
	// (BootOptions.ConsoleLog on the host), as it is written.
	ConsoleCopy bool
}

// NewGuest starts a guest image with the static busybox at busybox and
// the modules of k.
func NewGuest(busybox string, k *Kernel) (*Guest, error) {
	g := &Guest{Initramfs: NewInitramfs(), moduleArgs: map[string]string{}}
	libs, err := sharedLibraries(busybox)
	if err != nil {
		return nil, err
	}
	if len(libs) != 0 {
		return nil, fmt.Errorf("%s is not statically linked (install busybox-static)", busybox)
	}
	if err := g.AddHostFile("bin/busybox", busybox, 0o755); err != nil {
		return nil, err
	}
	for _, m := range k.Modules {
		name := ModuleName(m)
		if err := g.AddHostFile("lib/modules/"+name+".ko", m, 0o644); err != nil {
			return nil, err
		}
		g.modules = append(g.modules, name)
	}
	return g, nil
}

// ModuleArgs sets the insmod parameters of a module, e.g. "max_loop=32".
func (g *Guest) ModuleArgs(module, args string) { g.moduleArgs[ModuleName(module)] = args }

// initTemplate is the guest's /init. %s are the insmod lines and the
// test's body. The body runs in a shell function with `run` (echo a
// command, run it, stop the body if it fails) and `try` (the same, but
// going on after a failure) at hand and writes its
// results under /out, which ends up as a tar archive on /dev/vda. Its log
// goes to the console and to /out/guest.log; its exit status decides the
// verdict printed after the archive is written.
const initTemplate = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /out /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Keep kernel messages off the console the test reads.
echo N > /sys/module/printk/parameters/ignore_loglevel
echo 1 > /proc/sys/kernel/printk
hostname vmtest

run() {
	echo "+ $*"
	eval "$@" || { echo "FAILED ($?): $*"; exit 1; }
}

try() {
	echo "+ $*"
	eval "$@" || echo "(exit status $?)"
}

modules() {
%s}

body() {
%s}

finally() {
	:
%s}

# The body runs in a subshell, so that run's exit ends only the body and
# its status is recorded, and finally still runs.
{ modules && ( body ); echo $? > /tmp/status; finally; } 2>&1 | tee /out/guest.log %s
verdict=failed
[ "$(cat /tmp/status 2>/dev/null)" = 0 ] && verdict=ok
i=0
while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
tar -cf /dev/vda -C /out . || verdict=notar
sync
echo "` + ResultMarker + ` $verdict"
poweroff -f
`

// Write adds /init and writes the archive to path.
func (g *Guest) Write(path, body string) error {
	var ins strings.Builder
	for _, m := range g.modules {
		fmt.Fprintf(&ins, "\trun insmod /lib/modules/%s.ko %s\n", m, g.moduleArgs[m])
	}
	if !strings.HasSuffix(body, "\n") {
		body += "\n"
	}
	fin := g.Finally
	if fin != "" && !strings.HasSuffix(fin, "\n") {
		fin += "\n"
	}
	cp := ""
	if g.ConsoleCopy {
		cp = "/dev/ttyS1"
	}
	g.AddFile("init", []byte(fmt.Sprintf(initTemplate, ins.String(), body, fin, cp)), 0o755)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("initramfs: %w", err)
	}
	if _, err := g.WriteTo(f); err != nil {
		f.Close()
		return fmt.Errorf("initramfs %s: %w", path, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("initramfs %s: %w", path, err)
	}
	return nil
}
