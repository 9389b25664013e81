package vmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// scenario is one array real mdadm creates in the guest. Its members are
// loop devices over sparse image files; steps are guest shell lines, with
// {md} standing for the array device (/dev/mdN), {mdname} for its name
// (mdN) and {0}, {1}, ... for the members.
type scenario struct {
	name    string
	members int
	steps   []string
	bitmap  bool // every member carries a bitmap, so -X must succeed on it
	noArray bool // no superblock at all: -E and -X must fail
}

// memberSize is the size of each member image. Small keeps resyncs short.
const memberSize = "24M"

// scenarios covers the superblock versions, levels, layouts, roles and
// bitmap placements real mdadm and the kernel produce. (Clustered arrays
// are not among them: mdadm creates one only through a running DLM, i.e.
// corosync and dlm_controld; the fixtures hold one made that way.) Some
// arrays are stopped while a resync runs, so resync offsets and dirty
// bitmap bits differ from run to run; both tools always read the same
// bytes.
var scenarios = []scenario{
	{name: "r1-v12-bitmap", members: 2, bitmap: true, steps: []string{
		"run mdadm --create {md} --run --metadata=1.2 --level=1 --raid-devices=2 --bitmap=internal --bitmap-chunk=64K {0} {1}",
		"run dd if=/dev/urandom of={md} bs=64k count=64 conv=fsync",
		"try mdadm --wait {md}",
		"run dd if=/dev/urandom of={md} bs=4k count=32 seek=100 conv=fsync",
	}},
	{name: "r1-v10-writemostly", members: 3, bitmap: true, steps: []string{
		"run mdadm --create {md} --run --metadata=1.0 --level=1 --raid-devices=3 --bitmap=internal --bitmap-chunk=128K --write-behind=64 --assume-clean --name=wm {0} {1} --write-mostly {2}",
		"run dd if=/dev/urandom of={md} bs=64k count=16 conv=fsync",
	}},
	{name: "r1-v11-spare-faulty", members: 3, steps: []string{
		"run mdadm --create {md} --run --metadata=1.1 --level=1 --raid-devices=2 --spare-devices=1 {0} {1} {2}",
		"try mdadm --wait {md}",
		"run mdadm {md} --fail {1}",
		"try mdadm --wait {md}",
	}},
	// Resync throttled to a crawl: stopped half-way, the members keep a
	// resync offset and dirty bitmap chunks.
	{name: "r10-n2-spare-resyncing", members: 5, bitmap: true, steps: []string{
		"run mdadm --create {md} --run --level=10 --layout=n2 --raid-devices=4 --spare-devices=1 --bitmap=internal --bitmap-chunk=64K {0} {1} {2} {3} {4}",
		"run 'echo 200 > /sys/block/{mdname}/md/sync_speed_max'",
		"run dd if=/dev/urandom of={md} bs=64k count=32 conv=fsync",
	}},
	{name: "r10-f2", members: 3, bitmap: true, steps: []string{
		"run mdadm --create {md} --run --level=10 --layout=f2 --chunk=64 --raid-devices=3 --bitmap=internal {0} {1} {2}",
		"try mdadm --wait {md}",
	}},
	{name: "r10-o2-homehost", members: 2, steps: []string{
		"run mdadm --create {md} --run --level=10 --layout=o2 --raid-devices=2 --assume-clean --homehost=elsewhere --name=o2 {0} {1}",
	}},
	{name: "r1-grown-bitmap", members: 2, bitmap: true, steps: []string{
		"run mdadm --create {md} --run --level=1 --raid-devices=2 --assume-clean {0} {1}",
		"run mdadm --grow {md} --bitmap=internal",
		"run dd if=/dev/urandom of={md} bs=64k count=8 conv=fsync",
	}},
	{name: "blank", members: 1, noArray: true},
}

// check is one command pair run in the guest: real mdadm and mdadm-go with
// the same arguments. Each leaves <id>.<tool>.{stdout,stderr,exit} in /out.
type check struct {
	id      string
	args    []string
	mustRun bool // real mdadm must exit 0 (keeps the comparison meaningful)
	mustErr bool // real mdadm must fail
}

// plan turns the scenarios into the guest's shell body and the checks.
func plan() (body string, checks []check) {
	var b strings.Builder
	loop := 0
	for i, sc := range scenarios {
		md := fmt.Sprintf("/dev/md%d", i)
		var devs []string
		fmt.Fprintf(&b, "\necho '=== %s'\n", sc.name)
		for m := 0; m < sc.members; m++ {
			img := fmt.Sprintf("/img/%s-%d.img", sc.name, m)
			dev := fmt.Sprintf("/dev/loop%d", loop)
			loop++
			fmt.Fprintf(&b, "run truncate -s %s %s\nrun losetup %s %s\n", memberSize, img, dev, img)
			devs = append(devs, dev)
		}
		for _, s := range sc.steps {
			s = strings.ReplaceAll(s, "{md}", md)
			s = strings.ReplaceAll(s, "{mdname}", filepath.Base(md))
			for m, d := range devs {
				s = strings.ReplaceAll(s, "{"+strconv.Itoa(m)+"}", d)
			}
			b.WriteString(s + "\n")
		}
		if !sc.noArray {
			fmt.Fprintf(&b, "run cat /proc/mdstat\nrun mdadm --stop %s\n", md)
		}
		// Members are examined through their loop devices only: the
		// images live on the initramfs's tmpfs, which refuses O_DIRECT,
		// so real mdadm cannot open them there. (The host-side tests in
		// cmd/mdadm-go examine image files.)
		for m := range devs {
			p := fmt.Sprintf("%s.%d", sc.name, m)
			checks = append(checks,
				check{id: p + ".E", args: []string{"-E", devs[m]}, mustRun: !sc.noArray, mustErr: sc.noArray},
				check{id: p + ".X", args: []string{"-X", devs[m]}, mustRun: sc.bitmap, mustErr: sc.noArray},
			)
		}
		if len(devs) > 1 {
			checks = append(checks, check{id: sc.name + ".E-all", args: append([]string{"-E"}, devs...), mustRun: true})
		}
	}
	b.WriteString("\necho '=== examine'\n")
	for _, c := range checks {
		for _, tool := range []string{"mdadm", "mdadm-go"} {
			out := "/out/" + c.id + "." + tool
			fmt.Fprintf(&b, "%s %s </dev/null >%s.stdout 2>%s.stderr; echo $? >%s.exit\n",
				tool, strings.Join(c.args, " "), out, out, out)
		}
	}
	return b.String(), checks
}

// TestExamineMatchesRealMdadm boots Debian's kernel, has real mdadm create
// the scenarios' arrays on loop devices, stops them, and requires
// `mdadm-go -E` and `-X` to print exactly what real `mdadm -E` and `-X`
// print for every member: stdout byte for byte, the exit status, and
// stderr with "mdadm:" read as "mdadm-go:".
func TestExamineMatchesRealMdadm(t *testing.T) {
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
	mdadmGo := buildMdadmGo(t, tools["go"], work)

	g, err := NewGuest(tools["busybox"], k)
	if err != nil {
		t.Fatal(err)
	}
	g.ModuleArgs("loop", "max_loop=32")
	if err := g.AddBinary("sbin/mdadm", tools["mdadm"]); err != nil {
		t.Fatal(err)
	}
	if err := g.AddHostFile("bin/mdadm-go", mdadmGo, 0o755); err != nil {
		t.Fatal(err)
	}
	body, checks := plan()
	body = "run mkdir -p /img\n" + body
	initrd := filepath.Join(work, "initrd.cpio")
	if err := g.Write(initrd, body); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	verdict, files, err := Boot(BootOptions{
		Kernel:    k,
		Initramfs: initrd,
		WorkDir:   work,
		MemoryMiB: 1024,
		Timeout:   5 * time.Minute, // a guard against a hung guest, not a speed check
		Verbose:   testing.Verbose(),
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
		t.Fatalf("guest verdict %q; its log:\n%s", verdict, files["guest.log"])
	}

	compared := 0
	for _, c := range checks {
		want, err1 := result(files, c.id+".mdadm")
		got, err2 := result(files, c.id+".mdadm-go")
		if err1 != nil || err2 != nil {
			t.Errorf("%s: missing output (%v, %v); guest log:\n%s", c.id, err1, err2, files["guest.log"])
			continue
		}
		what := "mdadm " + strings.Join(c.args, " ")
		switch {
		case c.mustRun && want.exit != 0:
			t.Errorf("%s: real mdadm failed (exit %d), so the comparison proves little:\n%s", what, want.exit, want.stderr)
		case c.mustErr && want.exit == 0:
			t.Errorf("%s: real mdadm succeeded where it must fail:\n%s", what, want.stdout)
		}
		wantErr := strings.ReplaceAll(want.stderr, "mdadm: ", "mdadm-go: ")
		if got.stdout != want.stdout {
			t.Errorf("%s: stdout differs from real mdadm (- mdadm, + mdadm-go):\n%s", what, lineDiff(want.stdout, got.stdout))
		}
		if got.stderr != wantErr {
			t.Errorf("%s: stderr differs from real mdadm (- mdadm, + mdadm-go):\n%s", what, lineDiff(wantErr, got.stderr))
		}
		if got.exit != want.exit {
			t.Errorf("%s: exit status %d, real mdadm %d", what, got.exit, want.exit)
		}
		compared++
	}
	t.Logf("compared %d mdadm invocations with mdadm-go's", compared)
}

// OutEnv names the environment variable that, when set, makes the test
// copy everything the guest wrote (outputs, exit statuses, guest.log) into
// that directory.
const OutEnv = "MDCLUSTER_VMTEST_OUT"

func saveFiles(dir string, files map[string][]byte) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("%s: %w", OutEnv, err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, filepath.Base(name)), b, 0o644); err != nil {
			return fmt.Errorf("%s: %w", OutEnv, err)
		}
	}
	return nil
}

// output is what one command left in /out.
type output struct {
	stdout, stderr string
	exit           int
}

func result(files map[string][]byte, prefix string) (output, error) {
	var o output
	for _, s := range []string{".stdout", ".stderr", ".exit"} {
		if _, ok := files[prefix+s]; !ok {
			return o, fmt.Errorf("no %s%s", prefix, s)
		}
	}
	exit, err := strconv.Atoi(strings.TrimSpace(string(files[prefix+".exit"])))
	if err != nil {
		return o, fmt.Errorf("%s.exit: %w", prefix, err)
	}
	return output{stdout: string(files[prefix+".stdout"]), stderr: string(files[prefix+".stderr"]), exit: exit}, nil
}

// needTools finds the host programs the test needs and skips when one is
// missing: then this machine cannot run VMs this way at all. `make test`
// installs all of them, so under CI (CI set) a missing one fails the test.
func needTools(t *testing.T) map[string]string {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM; skipped with -short")
	}
	tools := map[string]string{}
	for _, name := range []string{"qemu-system-x86_64", "busybox", "mdadm", "apt-get", "apt-cache", "dpkg-deb", "ldd", "go"} {
		p, err := exec.LookPath(name)
		if err != nil {
			// mdadm lives in /sbin, outside a normal user's PATH; go may
			// be run by its full path.
			for _, alt := range []string{"/sbin/" + name, filepath.Join(runtime.GOROOT(), "bin", name)} {
				if _, serr := os.Stat(alt); serr == nil {
					p, err = alt, nil
					break
				}
			}
		}
		if err != nil {
			msg := fmt.Sprintf("%s not found: cannot build or boot the test VM here (on Debian: make deps)", name)
			if os.Getenv("CI") != "" {
				t.Fatal(msg) // CI installs everything: a missing tool is a broken set-up, not a skip
			}
			t.Skip(msg)
		}
		tools[name] = p
	}
	return tools
}

// buildMdadmGo builds cmd/mdadm-go as a static binary for the guest.
func buildMdadmGo(t *testing.T, goTool, dir string) string {
	t.Helper()
	out := filepath.Join(dir, "mdadm-go")
	cmd := exec.Command(goTool, "build", "-o", out, "github.com/mdcluster/mdcluster/cmd/mdadm-go")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building mdadm-go: %v\n%s", err, b)
	}
	return out
}

// lineDiff shows a minimal line diff of a and b ("-" lines only in a,
// "+" only in b, " " in both).
func lineDiff(a, b string) string {
	x, y := strings.SplitAfter(a, "\n"), strings.SplitAfter(b, "\n")
	// lcs[i][j] = length of the longest common subsequence of x[i:], y[j:].
	lcs := make([][]int, len(x)+1)
	for i := range lcs {
		lcs[i] = make([]int, len(y)+1)
	}
	for i := len(x) - 1; i >= 0; i-- {
		for j := len(y) - 1; j >= 0; j-- {
			if x[i] == y[j] {
				lcs[i][j] = lcs[i+1][j+1] + 1
			} else {
				lcs[i][j] = max(lcs[i+1][j], lcs[i][j+1])
			}
		}
	}
	var out strings.Builder
	line := func(prefix, s string) {
		q := strconv.Quote(strings.TrimSuffix(s, "\n"))
		out.WriteString(prefix + q[1:len(q)-1] + "\n")
	}
	i, j := 0, 0
	for i < len(x) || j < len(y) {
		switch {
		case i < len(x) && j < len(y) && x[i] == y[j]:
			line(" ", x[i])
			i, j = i+1, j+1
		case j < len(y) && (i == len(x) || lcs[i][j+1] >= lcs[i+1][j]):
			line("+", y[j])
			j++
		default:
			line("-", x[i])
			i++
		}
	}
	return out.String()
}

// TestPlanNamesEveryCheckOnce guards the plan itself: ids are unique, so
// no check's output overwrites another's.
func TestPlanNamesEveryCheckOnce(t *testing.T) {
	_, checks := plan()
	var ids []string
	seen := map[string]bool{}
	for _, c := range checks {
		if seen[c.id] {
			t.Errorf("check id %s used twice", c.id)
		}
		seen[c.id] = true
		ids = append(ids, c.id)
	}
	sort.Strings(ids)
	if len(ids) == 0 {
		t.Fatal("no checks planned")
	}
}
