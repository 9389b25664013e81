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

// The quick cluster harness: one VM, three mdclusterd in three network
// namespaces joined by veth pairs through the VM's root namespace (which
// routes between them), sharing loop devices over files on the VM's tmpfs
// as their "SAN", each with its array export attached to the kernel NBD
// client (/dev/nbd0 on node 1, /dev/nbd1 on node 2, /dev/nbd2 on node 3).
// docs/vmtest.md describes it.

// clusterMemberSize is each loop device's size; small because TCG is slow.
const clusterMemberSize = "16M"

// clusterNodes is how many daemons run.
const clusterNodes = 3

// clusterConfig is node n's configuration file.
func clusterConfig(n int) string {
	var seeds []string
	for j := 1; j <= clusterNodes; j++ {
		if j != n {
			seeds = append(seeds, fmt.Sprintf("%q", fmt.Sprintf("10.99.%d.2:7946", j)))
		}
	}
	// profile "lan": the slow failure detector, because three daemons
	// under TCG on a loaded host miss the storage profile's 0.5 s.
	return fmt.Sprintf(`node_id = %d
profile = "lan"
data_dir = "/var/lib/mdc/n%d"
cluster_key_file = "/etc/mdc/cluster.key"
[gossip]
bind_addr = "10.99.%d.2"
port = 7946
seeds = [%s]
[dlm]
listen_addr = "10.99.%d.2:7410"
[quorum]
data_nodes = [1, 2, 3]
m = 2
[fencing]
timeout = "10s"
[[fencing.level]]
[[fencing.level.agent]]
path = "/etc/mdc/fence"
[devices]
search = ["/dev/loop[0-2]"]
# Three nodes under one kernel share these loop devices: O_EXCL is system-wide.
shared_kernel = true
[[array]]
name = "md0"
[array.export]
socket = "/run/n%d/md0.nbd"
nbd_device = "/dev/nbd%d"
[control]
socket = "/run/n%d/mdclusterd.sock"
[shutdown]
leave_timeout = "2s"
`, n, n, n, strings.Join(seeds, ", "), n, n, n-1, n)
}

// clusterFence records its victim in /out/fence.log and refuses: no
// scenario here kills a node, so a fence is a finding.
const clusterFence = `#!/bin/sh
n=?
while read l; do case "$l" in nodename=*) n=${l#nodename=};; esac; done
echo "$(date) fence requested for node $n" >> /out/fence.log
exit 1
`

// clusterExamine are the -E/-X comparisons of scenario 5, run twice: on
// the members as the daemons left them (bitmap switched to internal by
// mdadm-go) and after real Linux md assembled and stopped the array.
func clusterExamine() (body string, checks []check) {
	var b strings.Builder
	for _, when := range []string{"ours", "md"} {
		var cs []check
		for i := 0; i < 3; i++ {
			dev := fmt.Sprintf("/dev/loop%d", i)
			p := fmt.Sprintf("s5.%s.loop%d", when, i)
			cs = append(cs, check{id: p + ".E", args: []string{"-E", dev}, mustRun: true},
				check{id: p + ".X", args: []string{"-X", dev}, mustRun: true})
		}
		for _, c := range cs {
			for _, tool := range []string{"mdadm", "mdadm-go"} {
				out := "/out/" + c.id + "." + tool
				fmt.Fprintf(&b, "%s %s </dev/null >%s.stdout 2>%s.stderr; echo $? >%s.exit\n",
					tool, strings.Join(c.args, " "), out, out, out)
			}
		}
		checks = append(checks, cs...)
		if when == "ours" {
			b.WriteString("{MD}\n")
		}
	}
	return b.String(), checks
}

// clusterBody is the guest's script. Each scenario ends by writing
// /out/sN.ok; the host reports which ones did.
func clusterBody() (string, []check) {
	exam, checks := clusterExamine()
	parts := strings.SplitN(exam, "{MD}\n", 2)
	return `
mg() { n=$1; shift; mdadm-go --socket=/run/n$n/mdclusterd.sock "$@"; }
# waitfor SECONDS WHAT CMD: retry CMD every half second until it succeeds.
waitfor() {
	t=$1; what=$2; shift 2; i=0
	while ! eval "$@" >/dev/null 2>&1; do
		if [ -f /out/fence.log ]; then echo "a node asked for a fence (a false failure suspicion?), giving up on: $what"; cat /out/fence.log; return 1; fi
		i=$((i+1))
		if [ $i -ge $((t*2)) ]; then echo "TIMEOUT after $t s: $what"; eval "$@"; return 1; fi
		sleep 0.5
	done
	echo "ok after $((i/2)) s: $what"
}
# low CMD ARGS: run CMD at a lower priority (busybox has renice, no nice).
low() { sh -c 'renice -n 10 -p $$ >/dev/null && exec "$@"' low "$@"; }
# must CMD ARGS: like run, without eval (arguments keep their quoting).
must() { "$@" || { echo "FAILED ($?): $*"; exit 1; }; }
same() { [ "$1" = "$2" ] || { echo "differ: $1 vs $2"; return 1; }; }
T0=$(cut -d. -f1 /proc/uptime)
elapsed() { echo "--- $(( $(cut -d. -f1 /proc/uptime) - T0 )) s: $*"; }

run mkdir -p /img /var/lib/mdc
for i in 0 1 2; do run truncate -s ` + clusterMemberSize + ` /img/d$i.img; run losetup /dev/loop$i /img/d$i.img; done
run 'echo 1 > /proc/sys/net/ipv4/ip_forward'
run ip link set lo up
for n in 1 2 3; do
	unshare -n sleep 100000 </dev/null >/dev/null 2>&1 &
	pid=$!
	echo $pid > /tmp/ns$n
	must waitfor 5 "namespace $n" "[ \"\$(readlink /proc/$pid/ns/net)\" != \"\$(readlink /proc/self/ns/net)\" ]"
	# The kernel names the peer veth0: the first free vethN, and the
	# previous node's veth0 has moved to its namespace.
	run ip link add h$n type veth
	run ip link set veth0 netns $pid
	run ip addr add 10.99.$n.1/24 dev h$n
	run ip link set h$n up
	run nsenter -t $pid -n ip link set lo up
	run nsenter -t $pid -n ip link set veth0 name eth0
	run nsenter -t $pid -n ip addr add 10.99.$n.2/24 dev eth0
	run nsenter -t $pid -n ip link set eth0 up
	run nsenter -t $pid -n ip route add default via 10.99.$n.1
done
run nsenter -t $(cat /tmp/ns1) -n ping -c 1 -W 5 10.99.3.2
echo '=== the kernel NBD attach on its own (mdcluster/export/nbd/kernel), from the root namespace and from node 1'"'"'s namespace'
run 'nbdkerneltest -test.run TestAttachRealKernel -test.v > /out/kernel.root.txt 2>&1 || { cat /out/kernel.root.txt; false; }'
run 'grep -q "^--- PASS: TestAttachRealKernel" /out/kernel.root.txt'
run 'nsenter -t $(cat /tmp/ns1) -n nbdkerneltest -test.run TestAttachRealKernel -test.v > /out/kernel.ns1.txt 2>&1 || { cat /out/kernel.ns1.txt; false; }'
run 'grep -q "^--- PASS: TestAttachRealKernel" /out/kernel.ns1.txt'
echo ok > /out/s0.ok
for n in 1 2 3; do
	# One kernel for three nodes: their writable opens of the shared
	nsenter -F -t $(cat /tmp/ns$n) -n mdclusterd -c /etc/mdc/n$n.toml </dev/null >/out/n$n.log 2>&1 &
	echo $! > /tmp/d$n
done
# A guard against a hang: past it the daemons are killed, so that any
# command waiting on them fails and the logs are still saved.
( sleep 300; echo "guest watchdog: killing the daemons"; for n in 1 2 3; do kill -9 $(cat /tmp/d$n); done ) </dev/null >/dev/console 2>&1 &
echo $! > /tmp/watchdog
for n in 1 2 3; do
	must waitfor 120 "node $n quorate, 3 votes, DLM connected to both others" "mg $n --cluster > /tmp/c$n && grep -q 'Quorate: *Yes' /tmp/c$n && grep -q 'Total votes: *3' /tmp/c$n && [ \$(grep -c '(connected)' /tmp/c$n) = 2 ]"
done
elapsed "cluster up"
run 'mg 1 --cluster'

echo '=== scenario 1: bring-up'
run mg 1 --create /dev/md0 --level=1 --raid-devices=2 --bitmap=clustered --nodes=4 --bitmap-chunk=1M /dev/loop0 /dev/loop1
run mg 2 --assemble /dev/md0
echo '=== scenario 3: a spare added from node 1 right after node 2 assembled'
run mg 1 /dev/md0 --add /dev/loop2
elapsed "spare added"
run mg 3 --assemble /dev/md0
for n in 1 2 3; do
	run "mg $n --detail /dev/md0 > /out/detail.n$n.spare"
	run "grep -q ' spare   /dev/loop2' /out/detail.n$n.spare"
done
elapsed "assembled on every node"
size=$(mg 1 --detail /dev/md0 | sed -n 's/.*Array Size : \([0-9]*\).*/\1/p')
run '[ -n "$size" ]'
for i in 0 1 2; do
	run "[ -f /sys/block/nbd$i/pid ]"
	run "grep -q '^mdcluster ' /sys/block/nbd$i/backend"
	run "same \$(blockdev --getsize64 /dev/nbd$i) $((size*1024))"
done
run 'cat /sys/block/nbd0/backend'
# By full path: busybox's shell runs its own mke2fs applet for a bare
# name, whatever PATH says.
run low /usr/sbin/mke2fs -q -F -t ext4 -L vmtest /dev/nbd0
run sync
run blockdev --flushbufs /dev/nbd0
elapsed "mkfs.ext4 on node 1"
# Node 2's and 3's page caches hold what they read of their devices
# before node 1 wrote (the partition scan): drop them, as a shared-disk
# user would.
run 'echo 3 > /proc/sys/vm/drop_caches'
run blockdev --flushbufs /dev/nbd1
run low /usr/sbin/e2fsck -fn /dev/nbd1
run blockdev --flushbufs /dev/nbd2
run low /usr/sbin/e2fsck -fn /dev/nbd2
sum=$(low md5sum < /dev/nbd0 | cut -d' ' -f1)
run "same $sum \$(low md5sum < /dev/nbd1 | cut -d' ' -f1)"
run "same $sum \$(low md5sum < /dev/nbd2 | cut -d' ' -f1)"
echo $sum > /out/data.md5
elapsed "fsck clean on nodes 2 and 3"
echo ok > /out/s1.ok

echo '=== scenario 3 (cont.): fail a member, recovery onto the spare'
try mg 1 --wait /dev/md0
must waitfor 120 "initial resync done" "! mg 1 --detail /dev/md0 | grep -q 'Resync Status'"
run mg 1 /dev/md0 --fail /dev/loop1
# Whichever node runs the recovery logs its end; --detail alone could
# show a remote recovery's member as in sync early.
must waitfor 150 "a node logged the recovery onto loop2 complete" "grep -q 'recovery complete: member in sync' /out/n1.log /out/n2.log /out/n3.log"
for n in 1 2 3; do
	must waitfor 150 "node $n: loop2 active and in sync" "mg $n --detail /dev/md0 | grep -q 'active sync   /dev/loop2' && ! mg $n --detail /dev/md0 | grep -q 'Rebuild Status'"
	run "mg $n --detail /dev/md0 > /out/detail.n$n.recovered"
done
elapsed "recovery onto loop2 complete"
run 'echo 3 > /proc/sys/vm/drop_caches'
run "same $sum \$(low md5sum < /dev/nbd2 | cut -d' ' -f1)"
echo '=== scenario 3 (cont.): the failed member reused: removed, wiped, added back from node 2'
run mg 1 /dev/md0 --remove /dev/loop1
for n in 1 2 3; do
	must waitfor 60 "node $n: loop1 no longer a member" "! mg $n --detail /dev/md0 | grep -q /dev/loop1"
done
# Still carrying its old md0 superblock, --add is refused (re-add it)...
run "! mg 2 /dev/md0 --add /dev/loop1 2>/out/readd.refused"
run "grep -q 'of this array' /out/readd.refused"
# ...and accepted once wiped.
run mg 1 --zero-superblock /dev/loop1
run "! mg 1 -E /dev/loop1"
run mg 2 /dev/md0 --add /dev/loop1
for n in 1 2 3; do
	must waitfor 60 "node $n: loop1 a spare" "mg $n --detail /dev/md0 | grep -q ' spare   /dev/loop1'"
done
elapsed "loop1 wiped and added back as a spare"
echo ok > /out/s3.ok

echo '=== scenario 5: interop with Linux md'
# Stopping the array detaches the node's /dev/nbdN (DISCONNECT).
run mg 3 --stop /dev/md0
run "[ ! -f /sys/block/nbd2/pid ] && same \$(cat /sys/block/nbd2/size) 0"
run mg 2 --stop /dev/md0
run "[ ! -f /sys/block/nbd1/pid ] && same \$(cat /sys/block/nbd1/size) 0"
run "[ -f /sys/block/nbd0/pid ]"
run mg 1 --grow /dev/md0 --bitmap=internal
# The switch restarts the array under the export: /dev/nbd0 still reads the data.
run 'echo 3 > /proc/sys/vm/drop_caches'
run "same $sum \$(low md5sum < /dev/nbd0 | cut -d' ' -f1)"
run mg 1 --stop /dev/md0
run "[ ! -f /sys/block/nbd0/pid ] && same \$(cat /sys/block/nbd0/size) 0"
for n in 1 2 3; do kill -TERM $(cat /tmp/d$n); done
for n in 1 2 3; do wait $(cat /tmp/d$n); echo "node $n exit status $?"; done
elapsed "cluster stopped"
` + parts[0] + `
run mdadm --assemble /dev/md0 --run /dev/loop0 /dev/loop2
run cat /proc/mdstat
run "same $sum \$(low md5sum < /dev/md0 | cut -d' ' -f1)"
run low /usr/sbin/e2fsck -fn /dev/md0
run mdadm --stop /dev/md0
` + parts[1] + `
echo ok > /out/s5.ok
elapsed "done"
`, checks
}

// TestClusterQuick is the quick cluster harness (docs/vmtest.md): three
// mdclusterd in network namespaces of one VM, the kernel NBD client on
// each, and scenarios 1 (bring-up, mkfs on node 1, fsck on node 2), 3 (a
// spare added right after node 2 assembled, then recovery onto it) and 5
// (interop: bitmap switched to internal, real md assembles the members,
// same data; mdadm -E/-X of every member match ours).
func TestClusterQuick(t *testing.T) {
	tools := needTools(t)
	for _, name := range []string{"mke2fs", "e2fsck"} {
		p, err := exec.LookPath(name)
		if err != nil {
			p = "/sbin/" + name
			if _, serr := os.Stat(p); serr != nil {
				msg := name + " not found (Debian e2fsprogs)"
				if os.Getenv("CI") != "" {
					t.Fatal(msg)
				}
				t.Skip(msg)
			}
		}
		tools[name] = p
	}
	cache, err := CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	k, err := FetchKernel(cache, []string{"md-mod", "raid1", "raid10", "loop", "nbd", "veth", "virtio_pci", "virtio_blk"})
	if err != nil {
		t.Fatalf("kernel: %v", err)
	}
	work := t.TempDir()
	g, err := NewGuest(tools["busybox"], k)
	if err != nil {
		t.Fatal(err)
	}
	g.ModuleArgs("loop", "max_loop=8")
	g.ModuleArgs("nbd", "nbds_max=4")
	for _, pkg := range []string{"mdclusterd", "mdadm-go"} {
		out := filepath.Join(work, pkg)
		cmd := exec.Command(tools["go"], "build", "-o", out, "github.com/mdcluster/mdcluster/cmd/"+pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", pkg, err, b)
		}
		if err := g.AddHostFile("bin/"+pkg, out, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	kt := filepath.Join(work, "nbdkerneltest")
	cmd := exec.Command(tools["go"], "test", "-c", "-o", kt, "github.com/mdcluster/mdcluster/mdcluster/export/nbd/kernel")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building the kernel package's tests: %v\n%s", err, b)
	}
	if err := g.AddHostFile("bin/nbdkerneltest", kt, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, b := range []struct{ name, src string }{{"sbin/mdadm", tools["mdadm"]}, {"usr/sbin/mke2fs", tools["mke2fs"]}, {"usr/sbin/e2fsck", tools["e2fsck"]}} {
		if err := g.AddBinary(b.name, b.src); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat("/etc/mke2fs.conf"); err == nil {
		if err := g.AddHostFile("etc/mke2fs.conf", "/etc/mke2fs.conf", 0o644); err != nil {
			t.Fatal(err)
		}
	}
	g.AddFile("etc/mdc/cluster.key", []byte("766d74657374206b657920666f72207468726565206d64636c7573746572642e\n"), 0o600)
	g.AddFile("etc/mdc/fence", []byte(clusterFence), 0o755)
	for n := 1; n <= clusterNodes; n++ {
		g.AddFile(fmt.Sprintf("etc/mdc/n%d.toml", n), []byte(clusterConfig(n)), 0o600)
	}
	// After a failure: stop whatever still runs (the pipe to the console
	// log stays open while anything holds it), keep the logs.
	g.ConsoleCopy = true
	g.Finally = `for f in /tmp/watchdog /tmp/d1 /tmp/d2 /tmp/d3 /tmp/ns1 /tmp/ns2 /tmp/ns3; do [ -f $f ] && kill -9 $(cat $f) 2>/dev/null; done
dmesg > /out/dmesg.txt
cat /proc/mdstat > /out/mdstat.txt 2>&1`
	body, checks := clusterBody()
	initrd := filepath.Join(work, "initrd.cpio")
	if err := g.Write(initrd, body); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	verdict, files, err := Boot(BootOptions{
		// Two virtual CPUs: three daemons' failure detectors and the
		// workload (mke2fs, e2fsck, md5sum, run at a lower priority) share
		// them.
		Kernel: k, Initramfs: initrd, WorkDir: work, MemoryMiB: 1536, CPUs: 2,
		ConsoleLog: filepath.Join(work, "console.log"),
		Timeout:    6 * time.Minute, // a guard against a hung guest (it has its own watchdog), not a speed check
		Verbose:    testing.Verbose(),
	})
	t.Logf("VM run (%s) took %v", k.Package, time.Since(start).Round(time.Millisecond))
	keep := func() {
		dir := os.Getenv(OutEnv)
		if dir == "" {
			dir = filepath.Join(os.TempDir(), fmt.Sprintf("mdcluster-vmtest-cluster-%d", time.Now().Unix()))
		}
		if err := saveFiles(dir, files); err != nil {
			t.Error(err)
			return
		}
		// The console copy survives a guest that never saved /out.
		if b, err := os.ReadFile(filepath.Join(work, "console.log")); err == nil {
			os.WriteFile(filepath.Join(dir, "console.log"), b, 0o644)
		}
		t.Logf("the guest's log (guest.log; console.log is the copy it wrote to its second serial port as it went), dmesg and every daemon's log (n1.log, n2.log, n3.log) are in %s", dir)
	}
	if err != nil {
		keep()
		t.Fatal(err)
	}
	kept := false
	if os.Getenv(OutEnv) != "" {
		keep()
		kept = true
	}
	if _, ok := files["s0.ok"]; ok {
		t.Logf("kernel NBD attach test (root namespace, node 1's namespace): passed")
	} else {
		t.Errorf("kernel NBD attach test: did not pass:\n%s%s", files["kernel.root.txt"], files["kernel.ns1.txt"])
	}
	for _, s := range []string{"s1", "s3", "s5"} {
		if _, ok := files[s+".ok"]; ok {
			t.Logf("scenario %s: passed", s[1:])
		} else {
			t.Errorf("scenario %s: did not pass", s[1:])
		}
	}
	if _, ok := files["fence.log"]; ok {
		t.Errorf("a node asked for a fence although no node failed:\n%s", files["fence.log"])
	}
	compared := 0
	if _, ok := files["s5.ok"]; ok {
		for _, c := range checks {
			want, err1 := result(files, c.id+".mdadm")
			got, err2 := result(files, c.id+".mdadm-go")
			if err1 != nil || err2 != nil {
				t.Errorf("%s: missing output (%v, %v)", c.id, err1, err2)
				continue
			}
			what := c.id + ": mdadm " + strings.Join(c.args, " ")
			if c.mustRun && want.exit != 0 {
				t.Errorf("%s: real mdadm failed (exit %d):\n%s", what, want.exit, want.stderr)
			}
			if got.stdout != want.stdout {
				t.Errorf("%s: stdout differs from real mdadm (- mdadm, + mdadm-go):\n%s", what, lineDiff(want.stdout, got.stdout))
			}
			if wantErr := strings.ReplaceAll(want.stderr, "mdadm: ", "mdadm-go: "); got.stderr != wantErr {
				t.Errorf("%s: stderr differs from real mdadm (- mdadm, + mdadm-go):\n%s", what, lineDiff(wantErr, got.stderr))
			}
			if got.exit != want.exit {
				t.Errorf("%s: exit status %d, real mdadm %d", what, got.exit, want.exit)
			}
			compared++
		}
		t.Logf("compared %d mdadm -E/-X invocations with mdadm-go's", compared)
	}
	if verdict != "ok" || t.Failed() {
		if !kept {
			keep()
		}
		t.Fatalf("guest verdict %q; the end of its log:\n%s", verdict, tail(string(files["guest.log"]), 60))
	}
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n") + "\n"
}
