package vmtest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// raidArrays are the arrays TestRAIDEngineMatchesKernelMD has real mdadm
// create: raid1 and every raid10 layout md has (near, far, offset), with
// an odd number of members where that changes the placement.
var raidArrays = []struct {
	name    string
	members int
	create  string // mdadm --create options after the device
}{
	{"r1-2", 2, "--level=1 --raid-devices=2"},
	{"r10-n2-4", 4, "--level=10 --layout=n2 --chunk=64 --raid-devices=4"},
	{"r10-n2-3", 3, "--level=10 --layout=n2 --chunk=32 --raid-devices=3"},
	{"r10-n3-3", 3, "--level=10 --layout=n3 --chunk=64 --raid-devices=3"},
	{"r10-f2-3", 3, "--level=10 --layout=f2 --chunk=64 --raid-devices=3"},
	{"r10-f3-4", 4, "--level=10 --layout=f3 --chunk=16 --raid-devices=4"},
	{"r10-o2-3", 3, "--level=10 --layout=o2 --chunk=64 --raid-devices=3"},
	{"r10-o3-4", 4, "--level=10 --layout=o3 --chunk=128 --raid-devices=4"},
}

// oursArrays are the arrays TestRAIDEngineMatchesKernelMD has our own
// code create, with a clustered bitmap, write through our engine and
// switch to an internal bitmap (raidcheck ours), for the kernel to
// assemble and read: raid1, and raid10 (near copies only: md-cluster runs
// no other raid10 layout) over an odd number of members.
var oursArrays = []struct {
	name    string
	members int
	shape   string // raidcheck ours LEVEL[:LAYOUT:CHUNK_KIB]
}{
	{"ours-r1-2", 2, "1"},
	{"ours-r10-n2-3", 3, "10:n2:64"},
}

// raidMemberSize is each member image's size: small, because TCG is slow.
const raidMemberSize = "12M"

// raidPlan returns the guest body: for each array, real mdadm creates it
// on loop devices and the kernel writes random data through /dev/mdN;
// with the array stopped, raidcheck must read exactly that data from the
// members with our geometry (and find every copy where it says). Then
// the other way: raidcheck writes a pattern through our engine, the
// kernel assembles the array and must read exactly that pattern, and
// md's own "check" must find every copy identical (mismatch_cnt 0).
func raidPlan() string {
	var b strings.Builder
	loop := 0
	for i, a := range raidArrays {
		md := fmt.Sprintf("/dev/md%d", i)
		mdname := filepath.Base(md)
		var devs []string
		fmt.Fprintf(&b, "\necho '=== %s'\n", a.name)
		for m := 0; m < a.members; m++ {
			img := fmt.Sprintf("/img/%s-%d.img", a.name, m)
			dev := fmt.Sprintf("/dev/loop%d", loop)
			loop++
			fmt.Fprintf(&b, "run truncate -s %s %s\nrun losetup %s %s\n", raidMemberSize, img, dev, img)
			devs = append(devs, dev)
		}
		all := strings.Join(devs, " ")
		out := "/out/" + a.name
		pat := "/img/" + a.name
		fmt.Fprintf(&b, "run mdadm --create %s --run --metadata=1.2 --assume-clean %s %s\n", md, a.create, all)
		fmt.Fprintf(&b, "run 'blockdev --getsize64 %s > %s.size'\n", md, out)
		// md writes: random data through the kernel's raid10/raid1
		fmt.Fprintf(&b, "run 'head -c $(cat %s.size) /dev/urandom > %s.kernel'\n", out, pat)
		fmt.Fprintf(&b, "run 'dd if=%s.kernel of=%s bs=1M conv=fsync 2>/dev/null'\n", pat, md)
		fmt.Fprintf(&b, "run 'dd if=%s of=%s.back bs=1M 2>/dev/null'\n", md, pat)
		fmt.Fprintf(&b, "run cmp %s.kernel %s.back\n", pat, pat)
		fmt.Fprintf(&b, "run mdadm --stop %s\n", md)
		fmt.Fprintf(&b, "run 'raidcheck read %s.kernel %s > %s.read.txt 2>&1'\n", pat, all, out)
		// we write: a pattern through the engine, read by the kernel
		fmt.Fprintf(&b, "run 'raidcheck write %d %s.ours %s > %s.write.txt 2>&1'\n", 1000+i, pat, all, out)
		fmt.Fprintf(&b, "run mdadm --assemble %s %s\n", md, all)
		fmt.Fprintf(&b, "run 'dd if=%s of=%s.back bs=1M 2>/dev/null'\n", md, pat)
		fmt.Fprintf(&b, "run cmp %s.ours %s.back\n", pat, pat)
		fmt.Fprintf(&b, "run 'echo check > /sys/block/%s/md/sync_action'\n", mdname)
		fmt.Fprintf(&b, "try mdadm --wait %s\n", md)
		fmt.Fprintf(&b, "run 'while [ \"$(cat /sys/block/%s/md/sync_action)\" != idle ]; do sleep 0.2; done'\n", mdname)
		fmt.Fprintf(&b, "run 'cat /sys/block/%s/md/last_sync_action > %s.lastsync'\n", mdname, out)
		fmt.Fprintf(&b, "run 'cat /sys/block/%s/md/mismatch_cnt > %s.mismatch'\n", mdname, out)
		fmt.Fprintf(&b, "run 'cat /proc/mdstat'\n")
		fmt.Fprintf(&b, "run mdadm --stop %s\n", md)
		for _, d := range devs {
			fmt.Fprintf(&b, "run losetup -d %s\n", d)
		}
		fmt.Fprintf(&b, "run 'rm -f /img/%s*'\n", a.name)
		fmt.Fprintf(&b, "run 'echo ok > %s.done'\n", out)
	}
	// Arrays of ours: created with a clustered bitmap, written through the
	// engine, switched to internal; the kernel assembles them, must read
	// the pattern (same md5), resyncs the chunks the bitmap kept dirty,
	// and its check must find every copy identical.
	for j, a := range oursArrays {
		md := fmt.Sprintf("/dev/md%d", len(raidArrays)+j)
		mdname := filepath.Base(md)
		var devs []string
		fmt.Fprintf(&b, "\necho '=== %s'\n", a.name)
		for m := 0; m < a.members; m++ {
			img := fmt.Sprintf("/img/%s-%d.img", a.name, m)
			dev := fmt.Sprintf("/dev/loop%d", loop)
			loop++
			fmt.Fprintf(&b, "run truncate -s %s %s\nrun losetup %s %s\n", raidMemberSize, img, dev, img)
			devs = append(devs, dev)
		}
		all := strings.Join(devs, " ")
		out := "/out/" + a.name
		pat := "/img/" + a.name
		fmt.Fprintf(&b, "run 'raidcheck ours %d %s.ours %s %s > %s.ours.txt 2>&1'\n", 2000+j, pat, a.shape, all, out)
		fmt.Fprintf(&b, "run 'md5sum < %s.ours > %s.md5.ours'\n", pat, out)
		fmt.Fprintf(&b, "run mdadm --assemble %s %s\n", md, all)
		fmt.Fprintf(&b, "run 'mdadm --detail %s > %s.detail'\n", md, out)
		fmt.Fprintf(&b, "run 'dd if=%s bs=1M 2>/dev/null | md5sum > %s.md5.kernel'\n", md, out)
		fmt.Fprintf(&b, "run 'dd if=%s of=%s.back bs=1M 2>/dev/null'\n", md, pat)
		fmt.Fprintf(&b, "run cmp %s.ours %s.back\n", pat, pat)
		fmt.Fprintf(&b, "try mdadm --wait %s\n", md)
		fmt.Fprintf(&b, "run 'while [ \"$(cat /sys/block/%s/md/sync_action)\" != idle ]; do sleep 0.2; done'\n", mdname)
		fmt.Fprintf(&b, "run 'echo check > /sys/block/%s/md/sync_action'\n", mdname)
		fmt.Fprintf(&b, "try mdadm --wait %s\n", md)
		fmt.Fprintf(&b, "run 'while [ \"$(cat /sys/block/%s/md/sync_action)\" != idle ]; do sleep 0.2; done'\n", mdname)
		fmt.Fprintf(&b, "run 'cat /sys/block/%s/md/last_sync_action > %s.lastsync'\n", mdname, out)
		fmt.Fprintf(&b, "run 'cat /sys/block/%s/md/mismatch_cnt > %s.mismatch'\n", mdname, out)
		fmt.Fprintf(&b, "run 'dd if=%s bs=1M 2>/dev/null | md5sum > %s.md5.after'\n", md, out)
		fmt.Fprintf(&b, "run 'cat /proc/mdstat'\n")
		fmt.Fprintf(&b, "run mdadm --stop %s\n", md)
		for _, d := range devs {
			fmt.Fprintf(&b, "run losetup -d %s\n", d)
		}
		fmt.Fprintf(&b, "run 'rm -f /img/%s*'\n", a.name)
		fmt.Fprintf(&b, "run 'echo ok > %s.done'\n", out)
	}
	return b.String()
}

// TestRAIDEngineMatchesKernelMD is the ground truth for the RAID engine's
// geometry: the real kernel md driver and our engine must put and find
// every block in the same places, both ways, for raid1 and each raid10
// layout. See raidPlan and vmtest/raidcheck.
func TestRAIDEngineMatchesKernelMD(t *testing.T) {
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
	check := filepath.Join(work, "raidcheck")
	cmd := exec.Command(tools["go"], "build", "-o", check, "github.com/mdcluster/mdcluster/vmtest/raidcheck")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building raidcheck: %v\n%s", err, b)
	}
	g, err := NewGuest(tools["busybox"], k)
	if err != nil {
		t.Fatal(err)
	}
	g.ModuleArgs("loop", "max_loop=32")
	if err := g.AddBinary("sbin/mdadm", tools["mdadm"]); err != nil {
		t.Fatal(err)
	}
	if err := g.AddHostFile("bin/raidcheck", check, 0o755); err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(work, "initrd.cpio")
	if err := g.Write(initrd, "run mkdir -p /img\n"+raidPlan()); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	verdict, files, err := Boot(BootOptions{
		Kernel: k, Initramfs: initrd, WorkDir: work, MemoryMiB: 1024,
		Timeout: 10 * time.Minute, // a guard against a hung guest, not a speed check
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
	for _, a := range raidArrays {
		p := a.name
		if _, ok := files[p+".done"]; !ok {
			t.Errorf("%s: not finished; raidcheck said:\n%s%s", a.name, files[p+".read.txt"], files[p+".write.txt"])
			continue
		}
		if act := strings.TrimSpace(string(files[p+".lastsync"])); act != "check" {
			t.Errorf("%s: md's last sync action was %q, not the check", p, act)
		}
		if m := strings.TrimSpace(string(files[p+".mismatch"])); m != "0" {
			t.Errorf("%s: md's check found %s mismatched sectors among the copies we wrote", a.name, m)
		}
		t.Logf("%s (%s bytes): %s  %s", a.name, strings.TrimSpace(string(files[p+".size"])),
			lastLine(files[p+".read.txt"]), lastLine(files[p+".write.txt"]))
	}
	for _, a := range oursArrays {
		p := a.name
		if _, ok := files[p+".done"]; !ok {
			t.Errorf("%s: not finished; raidcheck said:\n%s", a.name, files[p+".ours.txt"])
			continue
		}
		sum := func(f string) string { return strings.Fields(string(files[p+f]) + " -")[0] }
		if want, got, after := sum(".md5.ours"), sum(".md5.kernel"), sum(".md5.after"); got != want || after != want {
			t.Errorf("%s: the kernel reads md5 %s (after its resync and check %s), our engine wrote %s", a.name, got, after, want)
		}
		detail := string(files[p+".detail"])
		if !strings.Contains(detail, "Intent Bitmap : Internal") || strings.Contains(detail, "Cluster Name") {
			t.Errorf("%s: mdadm --detail does not show a plain internal bitmap:\n%s", a.name, detail)
		}
		if act := strings.TrimSpace(string(files[p+".lastsync"])); act != "check" {
			t.Errorf("%s: md's last sync action was %q, not the check", p, act)
		}
		if m := strings.TrimSpace(string(files[p+".mismatch"])); m != "0" {
			t.Errorf("%s: md's check found %s mismatched sectors among the copies we wrote", a.name, m)
		}
		t.Logf("%s: %s; kernel md5 %s", a.name, lastLine(files[p+".ours.txt"]), sum(".md5.kernel"))
	}
	if verdict != "ok" {
		t.Fatalf("guest verdict %q; its log:\n%s", verdict, files["guest.log"])
	}
}

func lastLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return s
}
