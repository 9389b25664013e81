package vmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The CLI comparison runs one script of mdadm invocations twice in the
// same VM: first with real mdadm against the kernel's md driver, then,
// after every array is stopped and its loop devices detached, with
// mdadm-go against a single-node, non-clustered mdclusterd on fresh loop
// devices of the same numbers. The device names, major/minor numbers, host
// name and time zone are therefore the same for both tools, and whatever
// still differs is either normalised below (with the reason) or a bug.

// cliMemberSize is each member image's size: small, so resyncs and
// recoveries are short under TCG, but large enough for an internal bitmap.
const cliMemberSize = "16M"

// cliMembers is how many loop devices the script uses.
const cliMembers = 10

// cliCapture is one invocation both tools run. Its output is saved as
// <id>.<tool>.{stdout,stderr,exit}.
type cliCapture struct {
	id   string
	args string // after the tool's name; {N} is member N's loop device
	// detail: --detail output, normalised by normDetail before comparing.
	detail bool
	// okExit: real mdadm must exit 0 (a failure would make the comparison
	// hollow: two identical error messages prove nothing).
	okExit bool
	// errExit: real mdadm must fail (the bad-input cases).
	errExit bool
	// status: the status view, normalised by normStatus.
	status bool
}

// cliStep is either a capture or a plain command whose output is not
// compared (waiting for a resync).
type cliStep struct {
	capture *cliCapture
	plain   string // shell line run as `try $T <plain>`
}

func capt(id, args string) cliStep {
	return cliStep{capture: &cliCapture{id: id, args: args, okExit: true}}
}
func detail(id, md string) cliStep {
	return cliStep{capture: &cliCapture{id: id, args: "--detail " + md, detail: true, okExit: true}}
}
func bad(id, args string) cliStep {
	return cliStep{capture: &cliCapture{id: id, args: args, errExit: true}}
}
func wait(md string) cliStep { return cliStep{plain: "--wait " + md} }

// cliScript is what both tools run, in order: the arrays (raid1 with an
// internal bitmap; raid10 near=2; a raid1 created degraded, then
// completed, given a spare, and failed over to it), their --detail at
// each state, and the same bad or edge invocations against them.
var cliScript = []cliStep{
	capt("create-r1", "--create /dev/md0 --run --level=1 --raid-devices=2 --bitmap=internal {0} {1}"),
	wait("/dev/md0"),
	detail("detail-r1", "/dev/md0"),

	capt("create-r10", "--create /dev/md1 --run --level=10 --layout=n2 --chunk=64 --raid-devices=4 --bitmap=internal {2} {3} {4} {5}"),
	wait("/dev/md1"),
	detail("detail-r10", "/dev/md1"),

	capt("create-degraded", "--create /dev/md2 --run --level=1 --raid-devices=2 --bitmap=internal {6} missing"),
	detail("detail-degraded", "/dev/md2"),
	capt("add-to-degraded", "/dev/md2 --add {7}"),
	wait("/dev/md2"),
	detail("detail-recovered", "/dev/md2"),
	capt("add-spare", "/dev/md2 --add {8}"),
	detail("detail-spare", "/dev/md2"),
	capt("fail-member", "/dev/md2 --fail {6}"),
	wait("/dev/md2"),
	detail("detail-failed", "/dev/md2"),

	// Bad and edge invocations: the same message and exit status, and
	// nothing changed (the details and the status view after them).
	bad("add-missing-device", "/dev/md0 --add /dev/nonexistent"),
	bad("fail-non-member", "/dev/md0 --fail {9}"),
	bad("remove-non-member", "/dev/md0 --remove {9}"),
	bad("remove-active-member", "/dev/md0 --remove {0}"),
	bad("fail-missing-device", "/dev/md0 --fail /dev/nonexistent"),
	bad("remove-missing-device", "/dev/md0 --remove /dev/nonexistent"),
	bad("add-to-unknown-array", "/dev/md9 --add {9}"),
	bad("stop-unknown-array", "--stop /dev/md9"),
	bad("wait-unknown-array", "--wait /dev/md9"),
	bad("readwrite-unknown-array", "--readwrite /dev/md9"),
	bad("grow-unknown-array", "--grow /dev/md9 --bitmap=none"),
	bad("detail-unknown-array", "--detail /dev/md9"),
	bad("detail-non-array", "--detail {9}"),
	bad("unknown-option", "--frobnicate /dev/md0"),
	bad("unknown-short-option", "-j /dev/md0"),
	bad("missing-argument", "--create /dev/md5 --level"),
	bad("create-no-devices", "--create /dev/md5 --run --level=1 --raid-devices=2"),
	bad("create-too-few", "--create /dev/md5 --run --level=1 --raid-devices=2 {9}"),
	bad("create-too-many", "--create /dev/md5 --run --level=1 --raid-devices=2 {9} missing missing"),
	bad("create-bad-level", "--create /dev/md5 --run --level=7 --raid-devices=2 {9} missing"),
	bad("create-in-use", "--create /dev/md5 --run --level=1 --raid-devices=2 {0} {9}"),
	bad("add-no-array", "--add {9}"),
	capt("manage-no-devices", "--manage /dev/md0 --fail"),

	detail("detail-r1-after", "/dev/md0"),
	detail("detail-failed-after", "/dev/md2"),
	capt("remove-failed", "/dev/md2 --remove {6}"),
	detail("detail-removed", "/dev/md2"),
	capt("stop-r10", "--stop /dev/md1"),
	bad("detail-stopped", "--detail /dev/md1"),
	{capture: &cliCapture{id: "status", args: "--status", status: true}},
	capt("stop-r1", "--stop /dev/md0"),
	bad("detail-stopped-r1", "--detail /dev/md0"),
	bad("stop-stopped-r1", "--stop /dev/md0"),
	// -q: which messages it silences.
	capt("create-quiet", "--create /dev/md3 -q --run --level=1 --raid-devices=2 {9} missing"),
	capt("stop-quiet", "--stop -q /dev/md3"),
}

// cliPlan returns the guest body and the captures. The body defines
// `steps` (the script with $T as the tool and $TAG naming its outputs),
// runs it with real mdadm, tears everything down, starts mdclusterd and
// runs it again with mdadm-go. The status view is /proc/mdstat for the
// kernel and `mdadm-go --status` for us.
func cliPlan() (body string, caps []cliCapture) {
	var b strings.Builder
	b.WriteString(`run mkdir -p /img /run/mdc /var/lib
run ifconfig lo 127.0.0.1 up

capture() {
	id=$1; shift
	echo "+ [$TAG] $T $*"
	$T "$@" </dev/null >/out/$id.$TAG.stdout 2>/out/$id.$TAG.stderr
	echo $? >/out/$id.$TAG.exit
	cat /out/$id.$TAG.stdout /out/$id.$TAG.stderr
}

members() {
	i=0
	while [ $i -lt ` + fmt.Sprint(cliMembers) + ` ]; do
		run truncate -s ` + cliMemberSize + ` /img/$TAG-$i.img
		run losetup /dev/loop$i /img/$TAG-$i.img
		i=$((i+1))
	done
}

teardown() {
	for md in /dev/md0 /dev/md1 /dev/md2 /dev/md3 /dev/md5 /dev/md9; do
		[ -b $md ] && mdadm --stop $md >/dev/null 2>&1
	done
	i=0
	while [ $i -lt ` + fmt.Sprint(cliMembers) + ` ]; do
		losetup -d /dev/loop$i 2>/dev/null
		i=$((i+1))
	done
	return 0
}

steps() {
`)
	for _, s := range cliScript {
		if s.capture == nil {
			fmt.Fprintf(&b, "\ttry $T %s\n", devs(s.plain))
			continue
		}
		c := *s.capture
		if c.status {
			// The kernel's status view is /proc/mdstat; ours is --status.
			fmt.Fprintf(&b, "\tif [ $T = mdadm ]; then cp /proc/mdstat /out/%[1]s.mdadm.stdout; "+
				": >/out/%[1]s.mdadm.stderr; echo 0 >/out/%[1]s.mdadm.exit; else capture %[1]s %[2]s; fi\n", c.id, c.args)
			caps = append(caps, c)
			continue
		}
		fmt.Fprintf(&b, "\tcapture %s %s\n", c.id, devs(c.args))
		caps = append(caps, c)
	}
	b.WriteString("}\n")
	// The daemon: one data node, quorum of one, a fence agent that is
	// never needed, members searched among the loop devices.
	b.WriteString(`
echo '=== real mdadm'
T=mdadm TAG=mdadm
members
steps
teardown

echo '=== mdadm-go and mdclusterd'
head -c 32 /dev/urandom > /run/mdc/cluster.key
chmod 600 /run/mdc/cluster.key
printf '#!/bin/sh\nexit 0\n' > /run/mdc/fence
chmod 700 /run/mdc/fence
cat > /run/mdc/mdclusterd.toml <<'EOF'
node_id = 1
profile = "storage-lan"
data_dir = "/var/lib/mdcluster"
cluster_key_file = "/run/mdc/cluster.key"
[gossip]
bind_addr = "127.0.0.1"
port = 7946
[dlm]
listen_addr = "127.0.0.1:0"
[quorum]
data_nodes = [1]
m = 1
[[fencing.level]]
[[fencing.level.agent]]
path = "/run/mdc/fence"
[devices]
search = ["/dev/loop?"]
[control]
socket = "/run/mdcluster/mdclusterd.sock"
[shutdown]
leave_timeout = "2s"
EOF
T=mdadm-go TAG=mdadm-go
members
mdclusterd -c /run/mdc/mdclusterd.toml >/out/mdclusterd.log 2>&1 &
daemon=$!
i=0
while [ ! -S /run/mdcluster/mdclusterd.sock ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
run mdadm-go --cluster
steps
kill -TERM $daemon
wait $daemon
echo "mdclusterd exited"
`)
	return b.String(), caps
}

var memberRE = regexp.MustCompile(`\{(\d+)\}`)

// devs replaces {N} with member N's loop device.
func devs(s string) string { return memberRE.ReplaceAllString(s, "/dev/loop$1") }

// TestCLIMatchesRealMdadm boots Debian's kernel and runs the same mdadm
// command lines with real mdadm (kernel md) and with mdadm-go (a
// single-node, non-clustered mdclusterd over loop devices), and requires
// the same --detail (normalised as normDetail explains), the same status
// view as /proc/mdstat, and the same messages and exit statuses for the
// bad and edge invocations. See cliScript.
func TestCLIMatchesRealMdadm(t *testing.T) {
	tools := needTools(t)
	cache, err := CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	k, err := FetchKernel(cache, []string{"md-mod", "raid1", "raid10", "loop", "virtio_pci", "virtio_blk"})
	if err != nil {
		t.Fatalf("kernel: %v", err)
	}
	work := t.TempDir()
	g, err := NewGuest(tools["busybox"], k)
	if err != nil {
		t.Fatal(err)
	}
	g.ModuleArgs("loop", "max_loop=16")
	if err := g.AddBinary("sbin/mdadm", tools["mdadm"]); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"mdadm-go", "mdclusterd"} {
		bin := buildStatic(t, tools["go"], work, name)
		if err := g.AddHostFile("bin/"+name, bin, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	body, caps := cliPlan()
	initrd := filepath.Join(work, "initrd.cpio")
	if err := g.Write(initrd, body); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	verdict, files, err := Boot(BootOptions{
		Kernel: k, Initramfs: initrd, WorkDir: work, MemoryMiB: 1024,
		Timeout: 5 * time.Minute, // a guard against a hung guest, not a speed check
		Verbose: testing.Verbose(),
	})
	t.Logf("VM run (%s) took %v", k.Package, time.Since(start).Round(time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	if dir := os.Getenv(OutEnv); dir != "" {
		if err := saveFiles(dir, files); err != nil {
			t.Error(err)
		}
	}
	if verdict != "ok" {
		t.Fatalf("guest verdict %q; its log:\n%s\ndaemon log:\n%s", verdict, files["guest.log"], files["mdclusterd.log"])
	}
	failed, compared := false, 0
	for _, c := range caps {
		want, err1 := result(files, c.id+".mdadm")
		got, err2 := result(files, c.id+".mdadm-go")
		if err1 != nil || err2 != nil {
			t.Errorf("%s: missing output (%v, %v)", c.id, err1, err2)
			failed = true
			continue
		}
		what := c.id + " (mdadm " + devs(c.args) + ")"
		switch {
		case c.okExit && want.exit != 0:
			t.Errorf("%s: real mdadm failed (exit %d), so the comparison proves little:\n%s", what, want.exit, want.stderr)
		case c.errExit && want.exit == 0:
			t.Errorf("%s: real mdadm succeeded where it must fail:\n%s", what, want.stdout)
		}
		wantOut, gotOut := want.stdout, got.stdout
		if c.status {
			wantOut, gotOut = normStatus(wantOut), normStatus(gotOut)
		}
		if c.detail {
			wantOut, gotOut = normDetail(wantOut), normDetail(mdName.ReplaceAllString(gotOut, "${1}${2}"))
		}
		// The program names itself in its diagnostics and usage hint.
		wantErr := strings.ReplaceAll(want.stderr, "mdadm: ", "mdadm-go: ")
		wantErr = strings.ReplaceAll(wantErr, "Usage: mdadm --help", "Usage: mdadm-go --help")
		if gotOut != wantOut {
			t.Errorf("%s: stdout differs from real mdadm (- mdadm, + mdadm-go):\n%s", what, lineDiff(wantOut, gotOut))
			failed = true
		}
		if got.stderr != wantErr {
			t.Errorf("%s: stderr differs from real mdadm (- mdadm, + mdadm-go):\n%s", what, lineDiff(wantErr, got.stderr))
			failed = true
		}
		if got.exit != want.exit {
			t.Errorf("%s: exit status %d, real mdadm %d", what, got.exit, want.exit)
			failed = true
		}
		compared++
	}
	if failed {
		t.Logf("daemon log:\n%s", files["mdclusterd.log"])
	}
	t.Logf("compared %d of %d invocations", compared, len(caps))
}

// detailVolatile are the --detail fields whose values legitimately differ
// between the two runs: the times (the arrays are created seconds apart),
// the UUID (random), and the event count (md bumps it on every superblock
// update the kernel decides to make, e.g. clean/dirty transitions, while
// mdcluster counts its own metadata changes; both only grow, and tools
// compare them between members of one array, never across arrays).
var detailVolatile = regexp.MustCompile(`(?m)^( *(?:Creation Time|Update Time|UUID|Events) : ).*$`)

// mdName matches the array name mdadm-go gives /dev/mdN: mdcluster names
// an array after its md device's base name ("host:md0"), which is also
// its NBD export's name and the name an [[array]] entry of mdclusterd's
// configuration uses; mdadm drops the "md" ("host:0"). Documented in
// docs/cli.md; the rest of the line is compared.
var mdName = regexp.MustCompile(`(?m)^( *Name : [^: ]+:)md(\d+)`)

// normDetail blanks the values of detailVolatile in a --detail output.
func normDetail(s string) string { return detailVolatile.ReplaceAllString(s, "${1}<varies>") }

// bitmapPages matches the allocated-pages figures of mdstat's bitmap
// line. md allocates a counter page when a chunk in it is written and
// frees it some time after the page's last chunk is clean (its bitmap
// daemon's pace), so an idle array shows 0 or 1 page depending on when
// /proc/mdstat is read; the total pages and chunk size are compared.
var bitmapPages = regexp.MustCompile(`bitmap: \d+/(\d+) pages \[\d+KB\]`)

// normStatus blanks the allocated counter pages in a status view.
func normStatus(s string) string {
	return bitmapPages.ReplaceAllString(s, "bitmap: <allocated>/${1} pages [<allocated>KB]")
}

// buildStatic builds a command of the module as a static binary for the
// guest.
func buildStatic(t *testing.T, goTool, dir, name string) string {
	t.Helper()
	out := filepath.Join(dir, name)
	cmd := exec.Command(goTool, "build", "-o", out, "github.com/mdcluster/mdcluster/cmd/"+name)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building %s: %v\n%s", name, err, b)
	}
	return out
}

// TestCLIPlanNamesEveryCaptureOnce guards the script: ids are unique, so
// no capture's output overwrites another's, and the checks that make the
// comparison meaningful are there (some must succeed, some must fail).
func TestCLIPlanNamesEveryCaptureOnce(t *testing.T) {
	body, caps := cliPlan()
	seen := map[string]bool{}
	ok, bad := 0, 0
	for _, c := range caps {
		if seen[c.id] {
			t.Errorf("capture id %s used twice", c.id)
		}
		seen[c.id] = true
		if !strings.Contains(body, " "+c.id+" ") && !strings.Contains(body, "/out/"+c.id+".") {
			t.Errorf("capture %s is not in the guest script", c.id)
		}
		if c.okExit {
			ok++
		}
		if c.errExit {
			bad++
		}
	}
	if ok < 10 || bad < 20 || !seen["status"] {
		t.Errorf("%d captures must succeed, %d must fail, status view captured %v", ok, bad, seen["status"])
	}
}
