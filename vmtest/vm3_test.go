package vmtest

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/raid"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
	"github.com/mdcluster/mdcluster/vmtest/vm3pattern"
)

// The full cluster harness: three QEMU processes (TCG, 1 vCPU, 1 GiB),
// one per node, sharing raw disk images, on a socket network, driven over
// a serial control channel. docs/vmtest.md describes it.

// VM3Env turns the three-VM test on (it takes many minutes under TCG).
const VM3Env = "MDCLUSTER_VM3"

// VM3CutsEnv sets how many power cuts the test makes (default 10).
const VM3CutsEnv = "MDCLUSTER_VM3_CUTS"

// VM3ProfileEnv sets the daemons' profile ("vm", the default, "lan" or
// "storage-lan").
const VM3ProfileEnv = "MDCLUSTER_VM3_PROFILE"

// VM3LeaseEnv sets the I/O lease as "DURATION,WATCHDOG_TIMEOUT,MARGIN"
// (default "1s,2s,3s": a fence waits 4 s; the margin must be at least the
// watchdog timeout plus half the duration, and softdog counts whole
// seconds). A node whose stamp reads stall for longer than duration +
// watchdog timeout is reset by its watchdog: with "500ms,2s,2500ms" (a
// 3 s wait) a survivor was, on a host at load 10 (docs/vmtest.md).
const VM3LeaseEnv = "MDCLUSTER_VM3_LEASE"

// VM3SpeedMinEnv sets the daemons' raid.speed_limit_min in KiB/s (default
// 100000): the pace a resync keeps while the array has other I/O. md's
// default, 1000, held the dead slot's resync to 1 MB/s under the
// survivors' writers.
const VM3SpeedMinEnv = "MDCLUSTER_VM3_SPEED_MIN"

// VM3FenceEnv chooses the survivors' fencing: "stamp" (the default) is the
// storage generation stamp alone, which waits out the victim's lease;
// "switch" puts a power switch first (fence_vm3, a ClusterLabs-style agent
// in the guest that asks the test host to power the victim off, as
// fence_ipmilan asks a BMC), with the stamp as the second level.
const VM3FenceEnv = "MDCLUSTER_VM3_FENCE"

// vm3SwitchAgent is fence_vm3: it prints its request on the daemon's log
// serial (ttyS2, a file on the host) and waits for the host's answer, a
// file the host creates through the control agent (vm3Cluster.powerSwitch).
const vm3SwitchAgent = `#!/bin/sh
action=off port=
while read -r l; do
	case "$l" in
	action=*) action=${l#action=} ;;
	port=*) port=${l#port=} ;;
	esac
done
case "$action" in
off|reboot) ;;
monitor|list) exit 0 ;;
*) echo "fence_vm3: action $action not supported" >&2; exit 1 ;;
esac
[ -n "$port" ] || { echo "fence_vm3: no port" >&2; exit 1; }
id=$$-$(cut -d' ' -f1 /proc/uptime)
echo "@@FENCE $id $port" > /dev/ttyS2
i=0
while [ ! -e /tmp/fence.$id ]; do
	i=$((i+1))
	[ $i -ge 1500 ] && { echo "fence_vm3: no answer from the power switch" >&2; exit 1; }
	sleep 0.02
done
grep -qx off /tmp/fence.$id
`

// VM3LogEnv sets the daemons' log level (default "info"; "debug" shows
// every step of a change, with its time, in each node's daemon.log).
const VM3LogEnv = "MDCLUSTER_VM3_LOG"

// VM3SpareEnv sets how many spare additions are timed (default 5).
const VM3SpareEnv = "MDCLUSTER_VM3_SPARES"

// VM3StateEnv chooses where each node keeps its data_dir (the state
// store). Unset (or "disk"): on a small ext4 disk of the node's own
// (state-nN.img, attached to that VM only), so a node that is power-cut
// and boots again restarts from its persisted view, promises and journal,
// as a real node does. "tmpfs": on the guest's initramfs, lost at every
// power cut, like a node whose system disk was replaced.
const VM3StateEnv = "MDCLUSTER_VM3_STATE"

// vm3StateSize is each node's state disk: badger's files for a few small
// records fit many times over.
const vm3StateSize = 64 << 20

// vm3PersistentState reports whether the nodes keep data_dir on their own
// state disks (VM3StateEnv).
func vm3PersistentState(t *testing.T) bool {
	switch v := os.Getenv(VM3StateEnv); v {
	case "", "disk":
		return true
	case "tmpfs":
		return false
	default:
		t.Fatalf("%s=%q: want disk or tmpfs", VM3StateEnv, v)
		return false
	}
}

// vm3Disks are the shared images: vda, vdb, vdc hold md0 (raid1 over two,
// the third a spare), vdd, vde, vdf md1 (raid10 near=2 over three).
const (
	vm3Disks    = 6
	vm3DiskSize = 64 << 20
)

// Each node's writer region in either array: 8 MiB from 16 MiB on, 64 KiB
// per write.
const (
	vm3RegionStart = 16 << 20
	vm3RegionLen   = 8 << 20
	vm3Block       = 64 << 10
)

func vm3Region(node int, epoch int) vm3pattern.Region {
	return vm3pattern.Region{Node: uint32(node), Epoch: uint32(epoch),
		Start: uint64(vm3RegionStart + (node-1)*vm3RegionLen), Len: vm3RegionLen, Block: vm3Block}
}

// vm3Config is node n's configuration: storage fencing by the generation
// stamp with the watchdog armed (softdog), the kernel NBD client for both
// arrays' exports.
func vm3Config(n int) string {
	var seeds []string
	for j := 1; j <= 3; j++ {
		if j != n {
			seeds = append(seeds, fmt.Sprintf("\"169.254.0.%d:7946\"", j))
		}
	}
	profile := "vm"
	if p := os.Getenv(VM3ProfileEnv); p != "" {
		profile = p
	}
	lease := [3]string{"1s", "2s", "3s"}
	if l := strings.Split(os.Getenv(VM3LeaseEnv), ","); len(l) == 3 {
		copy(lease[:], l)
	}
	speedMin := "100000"
	if v := os.Getenv(VM3SpeedMinEnv); v != "" {
		speedMin = v
	}
	logLevel := "info"
	if v := os.Getenv(VM3LogEnv); v != "" {
		logLevel = v
	}
	power := ""
	if vm3Switch() {
		power = `[[fencing.level]]
[[fencing.level.agent]]
path = "/usr/sbin/fence_vm3"
timeout = "20s"
[fencing.level.agent.node_options]
"1" = { port = "1" }
"2" = { port = "2" }
"3" = { port = "3" }
`
	}
	return fmt.Sprintf(`node_id = %d
profile = %q
data_dir = "/var/lib/mdc"
cluster_key_file = "/etc/mdc/cluster.key"
[gossip]
bind_addr = "169.254.0.%d"
port = 7946
seeds = [%s]
[dlm]
listen_addr = "169.254.0.%d:7410"
[quorum]
data_nodes = [1, 2, 3]
m = 2
[fencing]
timeout = "60s"
%s[[fencing.level]]
stamp = true
[lease]
duration = %q
watchdog_timeout = %q
margin = %q
watchdog = "/dev/watchdog"
# Longer than a fence's pause (duration + margin, while the survivors
# wait for the new view): a survivor's requests wait, they do not fail.
stop_wait = "30s"
[raid]
speed_limit_min = %s
[devices]
search = ["/dev/vd[a-f]"]
[[array]]
name = "md0"
[array.export]
socket = "/run/mdc/md0.nbd"
nbd_device = "/dev/nbd0"
[[array]]
name = "md1"
[array.export]
socket = "/run/mdc/md1.nbd"
nbd_device = "/dev/nbd1"
[control]
socket = "/run/mdcluster/mdclusterd.sock"
[shutdown]
leave_timeout = "10s"
[log]
level = %q
`, n, profile, n, strings.Join(seeds, ", "), n, power, lease[0], lease[1], lease[2], speedMin, logLevel)
}

// vm3Switch reports whether the survivors fence through the power switch
// first (VM3FenceEnv).
func vm3Switch() bool { return os.Getenv(VM3FenceEnv) == "switch" }

// vm3Init is every guest's /init: the node number comes from the kernel
// command line (mdcnode=N); the control agent runs on ttyS1, the daemon's
// log goes to ttyS2 and the writers' acknowledgements to ttyS3 (host
// files, so they survive a power cut).
const vm3Init = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run/mdc /var/lib/mdc /sbin /usr/bin /usr/sbin
/bin/busybox --install -s /bin
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Errors and worse reach the console (a softdog reset says so there).
echo 3 > /proc/sys/kernel/printk
n=$(sed -n 's/.*mdcnode=\([0-9]*\).*/\1/p' /proc/cmdline)
hostname n$n
echo $n > /etc/node
%s
# The node's own state disk (serial mdc-state, absent with
# MDCLUSTER_VM3_STATE=tmpfs) holds data_dir; ext4 replays its journal here
# after a power cut.
for b in /sys/block/vd*; do
  if [ "$(cat $b/serial 2>/dev/null)" = mdc-state ]; then
    mount -t ext4 /dev/${b##*/} /var/lib/mdc && echo "state disk ${b##*/} mounted on /var/lib/mdc" || echo "state disk ${b##*/}: mount failed"
  fi
done
ip link set lo up
ip addr add 169.254.0.$n/16 dev eth0
ip link set eth0 up
echo "node $n up; agent on ttyS1"
while true; do vm3guest agent /dev/ttyS1; echo "agent exited $?"; sleep 1; done
`

// vm3Hub is the guests' Ethernet: QEMU's UDP socket backend sends each
// guest's frames to its own hub port on 127.0.0.1, and the hub repeats
// them to every other guest. (A multicast socket network needs multicast
// routing on the host's loopback, which containers often lack; the hub
// needs nothing and can cut a guest off.)
type vm3Hub struct {
	in   [3]*net.UDPConn // the hub's port for guest i
	out  [3]*net.UDPAddr // where guest i listens
	stop chan struct{}
}

func newVM3Hub() (*vm3Hub, error) {
	h := &vm3Hub{stop: make(chan struct{})}
	for i := range h.in {
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return nil, err
		}
		h.in[i] = c
		// The guest's own port: picked free now, bound by QEMU later.
		p, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return nil, err
		}
		h.out[i] = p.LocalAddr().(*net.UDPAddr)
		p.Close()
	}
	for i := range h.in {
		go func(i int) {
			buf := make([]byte, 65536)
			for {
				n, _, err := h.in[i].ReadFromUDP(buf)
				if err != nil {
					return
				}
				for j := range h.out {
					if j != i {
						h.in[j].WriteToUDP(buf[:n], h.out[j])
					}
				}
			}
		}(i)
	}
	return h, nil
}

func (h *vm3Hub) Close() {
	for _, c := range h.in {
		c.Close()
	}
}

// vm3VM is one node's QEMU process and its control channel.
type vm3VM struct {
	n      int
	dir    string // console.log, daemon.log, acks.log of the current boot
	boot   int
	cmd    *exec.Cmd
	exited chan struct{}
	conn   net.Conn
	rd     *bufio.Reader
	seq    int
	mu     sync.Mutex
	// offset is the guest's clock minus the host's (from the last
	// measurement), err its bound (half the best round trip).
	offset, offErr time.Duration
}

// vm3Cluster is the harness.
type vm3Cluster struct {
	t *testing.T
	// powerMu guards the VMs' boot directory and QEMU process between the
	// test and the power switch (powerSwitch); switchKilled lists the
	// nodes the switch powered off while they ran.
	powerMu      sync.Mutex
	switchKilled []int
	work         string // kept on failure
	kernel       *Kernel
	initrd       string
	images       []string
	state        [3]string // each node's own state disk ("" with VM3StateEnv=tmpfs)
	hub          *vm3Hub
	vms          [3]*vm3VM
	clocks       []string           // every clock measurement, for the report
	clockLog     [][2]time.Duration // offset, error bound of each
}

func (c *vm3Cluster) logf(format string, args ...any) {
	c.t.Helper()
	c.t.Logf("%s "+format, append([]any{time.Now().UTC().Format("15:04:05.000")}, args...)...)
}

// start boots node n (1-based) and waits for its agent.
func (c *vm3Cluster) start(n int) *vm3VM {
	c.t.Helper()
	c.launch(n)
	return c.ready(n)
}

// launch starts node n's QEMU process and connects to its control channel.
func (c *vm3Cluster) launch(n int) {
	c.t.Helper()
	v := c.vms[n-1]
	if v == nil {
		v = &vm3VM{n: n}
		c.vms[n-1] = v
	}
	c.powerMu.Lock()
	v.boot++
	v.dir = filepath.Join(c.work, fmt.Sprintf("n%d.boot%d", n, v.boot))
	c.powerMu.Unlock()
	if err := os.MkdirAll(v.dir, 0o755); err != nil {
		c.t.Fatal(err)
	}
	sock := filepath.Join(v.dir, "ctl.sock")
	args := []string{
		"-accel", "tcg", "-m", "1024", "-smp", "1", "-nodefaults", "-no-reboot", "-display", "none",
		"-kernel", c.kernel.Image, "-initrd", c.initrd,
		"-append", fmt.Sprintf("console=ttyS0 panic=-1 quiet mdcnode=%d", n),
		"-serial", "file:" + filepath.Join(v.dir, "console.log"),
		"-chardev", "socket,id=ctl,path=" + sock + ",server=on,wait=off",
		"-serial", "chardev:ctl",
		"-serial", "file:" + filepath.Join(v.dir, "daemon.log"),
		"-serial", "file:" + filepath.Join(v.dir, "acks.log"),
		"-netdev", fmt.Sprintf("socket,id=n0,udp=%s,localaddr=%s", c.hub.in[n-1].LocalAddr(), c.hub.out[n-1]),
		"-device", fmt.Sprintf("virtio-net-pci,netdev=n0,mac=52:54:00:00:00:%02x,addr=0x3", n),
	}
	for i, img := range c.images {
		args = append(args,
			"-drive", fmt.Sprintf("file=%s,format=raw,cache=none,aio=threads,file.locking=off,if=none,id=d%d", img, i),
			"-device", fmt.Sprintf("virtio-blk-pci,drive=d%d,share-rw=on,serial=mdc-d%d,addr=0x%x", i, i, 8+i))
	}
	if st := c.state[n-1]; st != "" {
		// This node's alone (QEMU's image locking stays on): cache=none
		// and no cache in QEMU, so what the guest flushed is in the host
		// file when QEMU is killed.
		args = append(args,
			"-drive", fmt.Sprintf("file=%s,format=raw,cache=none,aio=threads,if=none,id=state", st),
			"-device", "virtio-blk-pci,drive=state,serial=mdc-state,addr=0x10")
	}
	cmd := exec.Command("qemu-system-x86_64", args...)
	qlog, err := os.Create(filepath.Join(v.dir, "qemu.log"))
	if err != nil {
		c.t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = qlog, qlog
	if err := cmd.Start(); err != nil {
		c.t.Fatalf("starting QEMU for node %d: %v", n, err)
	}
	c.powerMu.Lock()
	v.cmd = cmd
	v.exited = make(chan struct{})
	c.powerMu.Unlock()
	go func() { cmd.Wait(); qlog.Close(); close(v.exited) }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		conn, err := net.Dial("unix", sock)
		if err == nil {
			v.conn, v.rd = conn, bufio.NewReaderSize(conn, 1<<20)
			break
		}
		if time.Now().After(deadline) {
			c.fatalf("node %d: QEMU's control socket never appeared: %v", n, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// ready waits for node n's agent, sets the guest's clock and measures
// its offset.
func (c *vm3Cluster) ready(n int) *vm3VM {
	c.t.Helper()
	v := c.vms[n-1]
	// The agent prints @@READY when it starts; a ping tells us it is there.
	deadline := time.Now().Add(5 * time.Minute)
	for {
		if _, err := c.try(v, 20*time.Second, "true"); err == nil {
			break
		}
		select {
		case <-v.exited:
			c.fatalf("node %d: QEMU exited during boot", n)
		default:
		}
		if time.Now().After(deadline) {
			c.fatalf("node %d: the agent did not answer within 5 minutes of boot", n)
		}
	}
	// Set the guest's clock from the host's, then measure what is left.
	v.mu.Lock()
	v.seq++
	fmt.Fprintf(v.conn, "%d S %d\n", v.seq, time.Now().UnixNano())
	_, err := v.readLine("@@S", strconv.Itoa(v.seq), 20*time.Second)
	v.mu.Unlock()
	if err != nil {
		c.fatalf("node %d: setting the clock: %v", n, err)
	}
	c.measureClock(v)
	return v
}

// readLine reads until a line "PREFIX ID ..." arrives (v.mu held).
func (v *vm3VM) readLine(prefix, id string, timeout time.Duration) ([]string, error) {
	v.conn.SetReadDeadline(time.Now().Add(timeout))
	for {
		line, err := v.rd.ReadString('\n')
		if err != nil {
			return nil, err
		}
		f := strings.Fields(line)
		if len(f) >= 2 && f[0] == prefix && f[1] == id {
			return f, nil
		}
	}
}

// measureClock asks the guest for its clock a few times and keeps the
// estimate with the smallest round trip: offset = guest − midpoint of the
// host's send and receive times, error bound = half the round trip.
func (c *vm3Cluster) measureClock(v *vm3VM) {
	c.t.Helper()
	v.mu.Lock()
	defer v.mu.Unlock()
	best := time.Duration(-1)
	for i := 0; i < 7; i++ {
		v.seq++
		id := strconv.Itoa(v.seq)
		t0 := time.Now()
		fmt.Fprintf(v.conn, "%s T\n", id)
		f, err := v.readLine("@@T", id, 20*time.Second)
		t1 := time.Now()
		if err != nil || len(f) < 3 {
			c.fatalf("node %d: clock: %v", v.n, err)
		}
		g, _ := strconv.ParseInt(f[2], 10, 64)
		rtt := t1.Sub(t0)
		if best < 0 || rtt < best {
			best = rtt
			mid := t0.Add(rtt / 2)
			v.offset = time.Unix(0, g).Sub(mid)
			v.offErr = rtt / 2
		}
	}
	msg := fmt.Sprintf("node %d boot %d: clock offset %v ± %v", v.n, v.boot, v.offset.Round(time.Microsecond), v.offErr.Round(time.Microsecond))
	c.clocks = append(c.clocks, msg)
	c.clockLog = append(c.clockLog, [2]time.Duration{v.offset, v.offErr})
	c.logf("%s", msg)
}

type vm3Result struct {
	out        string
	code       int
	start, end time.Time // guest clock
}

// try runs a shell command on node v and returns its result; err only for
// a channel failure or timeout.
func (c *vm3Cluster) try(v *vm3VM, timeout time.Duration, cmd string) (vm3Result, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.seq++
	id := strconv.Itoa(v.seq)
	if v.conn == nil {
		return vm3Result{}, fmt.Errorf("node %d: no control channel", v.n)
	}
	if _, err := fmt.Fprintf(v.conn, "%s C %s\n", id, base64.StdEncoding.EncodeToString([]byte(cmd))); err != nil {
		return vm3Result{}, err
	}
	f, err := v.readLine("@@R", id, timeout)
	if err != nil {
		return vm3Result{}, fmt.Errorf("node %d: %q: %w", v.n, cmd, err)
	}
	if len(f) < 5 {
		return vm3Result{}, fmt.Errorf("node %d: short reply %q", v.n, f)
	}
	var r vm3Result
	r.code, _ = strconv.Atoi(f[2])
	s, _ := strconv.ParseInt(f[3], 10, 64)
	e, _ := strconv.ParseInt(f[4], 10, 64)
	r.start, r.end = time.Unix(0, s), time.Unix(0, e)
	if len(f) > 5 {
		b, _ := base64.StdEncoding.DecodeString(f[5])
		r.out = string(b)
	}
	return r, nil
}

// run runs cmd on node n and fails the test unless it exits 0.
func (c *vm3Cluster) run(n int, timeout time.Duration, cmd string) vm3Result {
	c.t.Helper()
	r, err := c.try(c.vms[n-1], timeout, cmd)
	if err != nil {
		c.fatalf("%v", err)
	}
	if r.code != 0 {
		c.fatalf("node %d: %s: exit %d:\n%s", n, cmd, r.code, r.out)
	}
	return r
}

// waitFor retries cmd on node n until it exits 0 or the deadline passes.
func (c *vm3Cluster) waitFor(n int, timeout time.Duration, what, cmd string) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	start := time.Now()
	for {
		c.alive()
		r, err := c.try(c.vms[n-1], timeout, cmd)
		if err == nil && r.code == 0 {
			c.logf("node %d: %s (after %v)", n, what, time.Since(start).Round(time.Millisecond))
			return
		}
		if time.Now().After(deadline) {
			c.fatalf("node %d: timed out after %v waiting for: %s\nlast: %v %q", n, timeout, what, err, r.out)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// alive fails the test at once if a VM that should run has exited: a
// guest that resets (softdog, a panic) ends its QEMU (-no-reboot).
func (c *vm3Cluster) alive() {
	c.t.Helper()
	for _, v := range c.vms {
		if v == nil || v.conn == nil {
			continue // not started, or its power was cut on purpose
		}
		select {
		case <-v.exited:
			c.powerMu.Lock()
			killed := slices.Contains(c.switchKilled, v.n)
			c.powerMu.Unlock()
			if killed {
				c.fatalf("node %d was powered off by the power switch at another node's request while it ran (a false failure suspicion)", v.n)
			}
			c.fatalf("node %d's QEMU exited: the guest reset or powered off (a watchdog reset shows as \"softdog\" in %s)", v.n, filepath.Join(v.dir, "console.log"))
		default:
		}
	}
}

// powerSwitch is the host end of fence_vm3, a power switch: every 20 ms
// it reads what each VM's daemon log (the current boot's) has gained, and
// for every "@@FENCE ID PORT" request powers node PORT off (SIGKILL to its
// QEMU, unless it is off already) and answers on the requester's control
// channel by creating /tmp/fence.ID holding "off", as a BMC confirms a
// power-off. A node powered off while it ran makes the test fail (alive).
func (c *vm3Cluster) powerSwitch(stop <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	var answers sync.WaitGroup // the answers in flight end before the test does
	defer answers.Wait()
	type pos struct {
		dir string
		off int64
	}
	seen := map[int]pos{}
	re := regexp.MustCompile(`@@FENCE (\S+) ([1-3])\b`)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-stop:
			return
		case <-tick.C:
		}
		for n := 1; n <= 3; n++ {
			c.powerMu.Lock()
			dir := ""
			if v := c.vms[n-1]; v != nil {
				dir = v.dir
			}
			c.powerMu.Unlock()
			if dir == "" {
				continue
			}
			p := seen[n]
			if p.dir != dir {
				p = pos{dir: dir}
			}
			f, err := os.Open(filepath.Join(dir, "daemon.log"))
			if err != nil {
				continue
			}
			b, _ := io.ReadAll(io.NewSectionReader(f, p.off, 1<<40))
			f.Close()
			if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
				b = b[:i+1] // whole lines only
			} else {
				b = nil
			}
			p.off += int64(len(b))
			seen[n] = p
			for _, m := range re.FindAllSubmatch(b, -1) {
				id, victim := string(m[1]), int(m[2][0]-'0')
				c.logf("power switch: node %d asks to power node %d off: %s", n, victim, c.powerOff(victim))
				answers.Go(func() {
					v := c.vms[n-1]
					if _, err := c.try(v, 20*time.Second, "echo off > /tmp/fence."+id); err != nil {
						c.logf("power switch: answering node %d: %v", v.n, err)
					}
				})
			}
		}
	}
}

// powerOff powers node n off if it runs, and says what it found.
func (c *vm3Cluster) powerOff(n int) string {
	c.powerMu.Lock()
	defer c.powerMu.Unlock()
	v := c.vms[n-1]
	if v == nil || v.cmd == nil {
		return "no such VM"
	}
	select {
	case <-v.exited:
		return "it was off already"
	default:
	}
	v.cmd.Process.Kill()
	<-v.exited
	c.switchKilled = append(c.switchKilled, n)
	return "powered off (it was running)"
}

// fatalf saves every VM's logs, names the directory and fails.
func (c *vm3Cluster) fatalf(format string, args ...any) {
	c.t.Helper()
	c.collect()
	c.t.Fatalf(format+"\n(every VM's console, daemon log, writer acknowledgements and QEMU output are kept in %s)", append(args, c.work)...)
}

// collect asks each live guest for what only it has (dmesg, mdstat).
func (c *vm3Cluster) collect() {
	for _, v := range c.vms {
		if v == nil || v.conn == nil {
			continue
		}
		select {
		case <-v.exited:
			continue
		default:
		}
		if r, err := c.try(v, 20*time.Second, "dmesg; echo; cat /proc/mdstat"); err == nil {
			os.WriteFile(filepath.Join(v.dir, "dmesg.txt"), []byte(r.out), 0o644)
		}
	}
}

// kill cuts node n's power: SIGKILL to its QEMU. It returns the host time.
func (c *vm3Cluster) kill(n int) time.Time {
	v := c.vms[n-1]
	c.powerMu.Lock()
	at := time.Now()
	v.cmd.Process.Kill()
	<-v.exited
	c.powerMu.Unlock()
	v.conn.Close()
	v.conn = nil
	return at
}

// vm3LogLine is one daemon log line, with its time in host time.
type vm3LogLine struct {
	at   time.Time
	msg  string
	line string
}

var vm3LogRE = regexp.MustCompile(`time=(\S+) level=\S+ msg=("(?:[^"\\]|\\.)*"|\S+)`)

// daemonLog reads node n's daemon log (current boot) with times converted
// to the host's clock with the node's measured offset.
func (c *vm3Cluster) daemonLog(n int) []vm3LogLine {
	v := c.vms[n-1]
	b, _ := os.ReadFile(filepath.Join(v.dir, "daemon.log"))
	var out []vm3LogLine
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimRight(l, "\r")
		m := vm3LogRE.FindStringSubmatch(l)
		if m == nil {
			continue
		}
		at, err := time.Parse(time.RFC3339Nano, m[1])
		if err != nil {
			continue
		}
		msg := m[2]
		if s, err := strconv.Unquote(msg); err == nil {
			msg = s
		}
		out = append(out, vm3LogLine{at: at.Add(-v.offset), msg: msg, line: l})
	}
	return out
}

// firstLog finds the first line after t on node n whose message starts
// with msg and that contains every one of with.
func (c *vm3Cluster) firstLog(n int, after time.Time, msg string, with ...string) (vm3LogLine, bool) {
next:
	for _, l := range c.daemonLog(n) {
		if l.at.Before(after) || !strings.HasPrefix(l.msg, msg) {
			continue
		}
		for _, w := range with {
			if !strings.Contains(l.line, w) {
				continue next
			}
		}
		return l, true
	}
	return vm3LogLine{}, false
}

// median is the middle value of v (the mean of the two middle ones for an
// even count); 0 for none.
func median[T time.Duration | float64](v []T) T {
	s := slices.Clone(v)
	slices.Sort(s)
	n := len(s)
	if n == 0 {
		return 0
	}
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// hostCheck opens the member images of the array whose members are devs
// (guest names vda..vdf), and checks from the host, straight from the
// images, that every copy of every block of the whole array is identical
// and that every writer region passes its check with what was
// acknowledged. It returns the number of divergent extents.
func (c *vm3Cluster) hostCheck(devs []int, regions []vm3pattern.Region, acked []uint64) (divergent int, err error) {
	var g raid.Geometry
	files := map[int]*os.File{}
	offs := map[int]int64{}
	events := map[int]uint64{}
	for _, d := range devs {
		f, err := os.Open(c.images[d])
		if err != nil {
			return 0, err
		}
		defer f.Close()
		sb, err := superblock.Probe(f, uint64(vm3DiskSize/512))
		if err != nil {
			continue // not a member (yet)
		}
		if g.Disks() == 0 {
			if g, err = raid.FromSuperblock(sb); err != nil {
				return 0, err
			}
		}
		role := int(sb.Role())
		if role >= g.Disks() || (files[role] != nil && events[role] >= sb.Events) {
			continue // a spare, or a removed member's stale superblock
		}
		files[role], events[role] = f, sb.Events
		offs[role] = int64(sb.DataOffset) * 512
	}
	if len(files) != g.Disks() {
		return 0, fmt.Errorf("found %d active members, want %d", len(files), g.Disks())
	}
	var ferr error
	var first []string
	g.Extents(0, g.Size(), func(x raid.Extent) bool {
		var ref []byte
		for i, l := range x.Copies {
			b := make([]byte, x.Len)
			if _, err := files[l.Member].ReadAt(b, offs[l.Member]+l.Off); err != nil {
				ferr = err
				return false
			}
			if i == 0 {
				ref = b
				for ri, r := range regions {
					for s := int64(0); s < x.Len; s += vm3pattern.Sector {
						off := uint64(x.Off + s)
						if off >= r.Start && off < r.Start+r.Len {
							if err := r.Check(b[s:s+vm3pattern.Sector], off, acked[ri]); err != nil && len(first) < 10 {
								first = append(first, err.Error())
							}
						}
					}
				}
				continue
			}
			if !bytes.Equal(b, ref) {
				if divergent < 5 {
					first = append(first, fmt.Sprintf("array bytes %d+%d: copy on role %d differs from role %d's", x.Off, x.Len, l.Member, x.Copies[0].Member))
				}
				divergent++
			}
		}
		return true
	})
	if ferr != nil {
		return divergent, ferr
	}
	if len(first) > 0 {
		return divergent, fmt.Errorf("%s", strings.Join(first, "\n"))
	}
	return divergent, nil
}

// lastAck is the last acknowledgement node n's writer sent for epoch.
func (c *vm3Cluster) lastAck(n, epoch int) uint64 {
	b, _ := os.ReadFile(filepath.Join(c.vms[n-1].dir, "acks.log"))
	var k uint64
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 4 && f[0] == "A" && f[1] == strconv.Itoa(n) && f[2] == strconv.Itoa(epoch) {
			if v, err := strconv.ParseUint(f[3], 10, 64); err == nil && v > k {
				k = v
			}
		}
	}
	return k
}

// TestCluster3VM is the full cluster test (docs/vmtest.md): three VMs,
// scenarios 1 (bring-up), 3 (a spare added right after node 2 assembled,
// recovery onto it), 2 (power cuts of node 2 while all three write, on
// raid1 and raid10 in turn), 4 (node 2 boots again and rejoins, after
// every cut) and 5 (interop with Linux md), with the figures of
// BENCHMARKS.md. Behind MDCLUSTER_VM3=1.
func TestCluster3VM(t *testing.T) {
	if os.Getenv(VM3Env) == "" {
		t.Skipf("the three-VM cluster test runs only with %s=1 (it takes many minutes under TCG)", VM3Env)
	}
	tools := needTools(t)
	for _, name := range []string{"mke2fs", "e2fsck"} {
		p, err := exec.LookPath(name)
		if err != nil {
			p = "/sbin/" + name
		}
		tools[name] = p
	}
	cache, err := CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	k, err := FetchKernel(cache, []string{"md-mod", "raid1", "raid10", "loop", "nbd", "softdog", "virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4"})
	if err != nil {
		t.Fatalf("kernel: %v", err)
	}
	work := os.Getenv(OutEnv)
	if work == "" {
		work, err = os.MkdirTemp("", "mdcluster-vm3-")
		if err != nil {
			t.Fatal(err)
		}
	}
	c := &vm3Cluster{t: t, work: work, kernel: k}
	ok := false
	defer func() {
		for _, v := range c.vms {
			if v != nil && v.cmd != nil {
				v.cmd.Process.Kill()
				<-v.exited
			}
		}
		if c.hub != nil {
			c.hub.Close()
		}
		if ok && os.Getenv(OutEnv) == "" {
			os.RemoveAll(work)
		} else {
			t.Logf("every VM's console, daemon log, writer acknowledgements and QEMU output: %s", work)
		}
	}()

	// The guest image, the same for all three.
	g, err := NewGuest(tools["busybox"], k)
	if err != nil {
		t.Fatal(err)
	}
	g.ModuleArgs("nbd", "nbds_max=4")
	g.ModuleArgs("loop", "max_loop=4")
	bin := filepath.Join(work, "bin")
	for _, pkg := range []string{"cmd/mdclusterd", "cmd/mdadm-go", "vmtest/vm3guest"} {
		out := filepath.Join(bin, filepath.Base(pkg))
		cmd := exec.Command(tools["go"], "build", "-o", out, "github.com/mdcluster/mdcluster/"+pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("building %s: %v\n%s", pkg, err, b)
		}
		if err := g.AddHostFile("bin/"+filepath.Base(pkg), out, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, b := range []struct{ name, src string }{{"sbin/mdadm", tools["mdadm"]}, {"usr/sbin/mke2fs", tools["mke2fs"]}, {"usr/sbin/e2fsck", tools["e2fsck"]}} {
		if err := g.AddBinary(b.name, b.src); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := os.Stat("/etc/mke2fs.conf"); err == nil {
		g.AddHostFile("etc/mke2fs.conf", "/etc/mke2fs.conf", 0o644)
	}
	g.AddFile("usr/sbin/fence_vm3", []byte(vm3SwitchAgent), 0o755)
	g.AddFile("etc/mdc/cluster.key", []byte("766d74657374206b657920666f72207468726565206d64636c7573746572642e\n"), 0o600)
	for n := 1; n <= 3; n++ {
		g.AddFile(fmt.Sprintf("etc/mdc/n%d.toml", n), []byte(vm3Config(n)), 0o600)
	}
	var ins strings.Builder
	for _, m := range g.modules {
		fmt.Fprintf(&ins, "insmod /lib/modules/%s.ko %s\n", m, g.moduleArgs[m])
	}
	g.AddFile("init", []byte(fmt.Sprintf(vm3Init, ins.String())), 0o755)
	c.initrd = filepath.Join(work, "initrd.cpio")
	f, err := os.Create(c.initrd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.WriteTo(f); err != nil {
		t.Fatal(err)
	}
	f.Close()
	for i := 0; i < vm3Disks; i++ {
		img := filepath.Join(work, fmt.Sprintf("disk%d.img", i))
		if err := os.WriteFile(img, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, vm3DiskSize); err != nil {
			t.Fatal(err)
		}
		c.images = append(c.images, img)
	}
	if vm3PersistentState(t) {
		// Formatted once here; every later boot of the node mounts it.
		for n := 1; n <= 3; n++ {
			img := filepath.Join(work, fmt.Sprintf("state-n%d.img", n))
			if err := os.WriteFile(img, nil, 0o644); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(img, vm3StateSize); err != nil {
				t.Fatal(err)
			}
			if b, err := exec.Command(tools["mke2fs"], "-q", "-F", "-t", "ext4", "-L", fmt.Sprintf("mdc-state-n%d", n), img).CombinedOutput(); err != nil {
				t.Fatalf("formatting node %d's state disk: %v\n%s", n, err, b)
			}
			c.state[n-1] = img
		}
	}
	if c.hub, err = newVM3Hub(); err != nil {
		t.Fatal(err)
	}

	if vm3Switch() {
		stop, done := make(chan struct{}), make(chan struct{})
		go c.powerSwitch(stop, done)
		defer func() { close(stop); <-done }()
	}
	t0 := time.Now()
	for n := 1; n <= 3; n++ {
		c.launch(n)
	}
	for n := 1; n <= 3; n++ {
		c.ready(n)
		// The disks must be the same on every node: vda..vdf in image order.
		r := c.run(n, time.Minute, "for d in a b c d e f; do echo vd$d $(cat /sys/block/vd$d/serial); done")
		want := "vda mdc-d0\nvdb mdc-d1\nvdc mdc-d2\nvdd mdc-d3\nvde mdc-d4\nvdf mdc-d5\n"
		if r.out != want {
			c.fatalf("node %d sees the disks as\n%s\nwant\n%s", n, r.out, want)
		}
		c.checkStateDisk(n)
	}
	c.logf("three VMs booted in %v", time.Since(t0).Round(time.Millisecond))
	for n := 1; n <= 3; n++ {
		c.startDaemon(n)
	}
	for n := 1; n <= 3; n++ {
		c.waitQuorate(n)
	}
	c.logf("cluster up %v after the VMs started", time.Since(t0).Round(time.Millisecond))

	// Scenario 1: bring-up; scenario 3's spare right after node 2's assemble.
	c.run(1, 3*time.Minute, "mdadm-go --create /dev/md0 --level=1 --raid-devices=2 --bitmap=clustered --nodes=4 --bitmap-chunk=1M /dev/vda /dev/vdb")
	c.run(2, 3*time.Minute, "mdadm-go --assemble /dev/md0")
	var spares []time.Duration
	r := c.run(1, 3*time.Minute, "mdadm-go /dev/md0 --add /dev/vdc")
	spares = append(spares, r.end.Sub(r.start))
	c.logf("scenario 3: spare added right after node 2 assembled, confirmed on every node in %v", r.end.Sub(r.start).Round(time.Millisecond))
	c.run(3, 3*time.Minute, "mdadm-go --assemble /dev/md0")
	for n := 1; n <= 3; n++ {
		c.run(n, time.Minute, "mdadm-go --detail /dev/md0 | grep ' spare   /dev/vdc'")
	}
	c.run(1, 3*time.Minute, "mdadm-go --create /dev/md1 --level=10 --layout=n2 --raid-devices=3 --bitmap=clustered --nodes=4 --bitmap-chunk=1M --assume-clean /dev/vdd /dev/vde /dev/vdf")
	c.run(2, 3*time.Minute, "mdadm-go --assemble /dev/md1")
	c.run(3, 3*time.Minute, "mdadm-go --assemble /dev/md1")
	uuid := map[string]string{}
	for _, md := range []string{"md0", "md1"} {
		r := c.run(1, time.Minute, "mdadm-go --detail /dev/"+md+" | sed -n 's/^ *UUID : //p'")
		uuid[md] = strings.TrimSpace(r.out)
	}
	for n := 1; n <= 3; n++ {
		c.waitFor(n, 2*time.Minute, "/dev/nbd0 and /dev/nbd1 attached", "[ -f /sys/block/nbd0/pid ] && [ -f /sys/block/nbd1/pid ] && [ $(cat /sys/block/nbd0/size) != 0 ]")
	}
	c.run(1, 5*time.Minute, "/usr/sbin/mke2fs -q -F -t ext4 -L vm3 /dev/nbd0 && sync && blockdev --flushbufs /dev/nbd0")
	c.run(2, 5*time.Minute, "echo 3 > /proc/sys/vm/drop_caches; blockdev --flushbufs /dev/nbd0; /usr/sbin/e2fsck -fn /dev/nbd0")
	c.logf("scenario 1: passed (clustered raid1 created on node 1, assembled on 2 and 3, /dev/nbd0 on every node, mkfs.ext4 on node 1, e2fsck -fn clean on node 2)")
	c.waitFor(1, 10*time.Minute, "md0's initial resync done", "! mdadm-go --detail /dev/md0 | grep -q 'Resync Status'")

	// More spare additions for the figure: remove the spare, add it again.
	for i := len(spares); i < envInt(t, VM3SpareEnv, 5, 1, 100); i++ {
		c.run(1, 3*time.Minute, "mdadm-go /dev/md0 --remove /dev/vdc")
		for n := 1; n <= 3; n++ {
			c.waitFor(n, time.Minute, "spare removed", "! mdadm-go --detail /dev/md0 | grep -q /dev/vdc")
		}
		r := c.run(1, 3*time.Minute, "mdadm-go /dev/md0 --add /dev/vdc")
		spares = append(spares, r.end.Sub(r.start))
		for n := 1; n <= 3; n++ {
			c.run(n, time.Minute, "mdadm-go --detail /dev/md0 | grep ' spare   /dev/vdc'")
		}
	}
	c.logf("FIGURE add a spare, confirmed on every node (mdadm-go --add on node 1, in node 1's clock): median %v of %d: %v", median(spares).Round(time.Millisecond), len(spares), spares)

	// Scenario 3 (cont.): fail vdb, recovery onto the spare vdc.
	fail := time.Now()
	c.run(1, 3*time.Minute, "mdadm-go /dev/md0 --fail /dev/vdb")
	c.waitLog(10*time.Minute, "recovery onto vdc complete", func() bool {
		for n := 1; n <= 3; n++ {
			if _, ok := c.firstLog(n, fail.Add(-time.Second), "recovery complete: member in sync"); ok {
				return true
			}
		}
		return false
	})
	for n := 1; n <= 3; n++ {
		c.waitFor(n, 3*time.Minute, "vdc active and in sync", "mdadm-go --detail /dev/md0 | grep -q 'active sync   /dev/vdc' && ! mdadm-go --detail /dev/md0 | grep -q 'Rebuild Status'")
	}
	c.run(1, 3*time.Minute, "mdadm-go /dev/md0 --remove /dev/vdb")
	// vdb stays out: it held a slot (so only a re-add takes it back); the
	// daemons close it on removal, but this test does not reuse it.
	c.logf("scenario 3: passed (spare confirmed on every node; recovery onto it complete on every node)")

	// Scenario 2 with scenario 4 after each cut.
	cuts := envInt(t, VM3CutsEnv, 10, 1, 1000)
	var held, resynced []time.Duration
	var steps [][vm3Steps]time.Duration
	divergentTotal, lostTotal := 0, 0
	for epoch := 1; epoch <= cuts; epoch++ {
		md, dev, devs := "md0", "/dev/nbd0", []int{0, 1, 2}
		if epoch%2 == 0 {
			md, dev, devs = "md1", "/dev/nbd1", []int{3, 4, 5}
		}
		h, rs, st := c.powerCut(epoch, md, uuid[md], dev, devs, &divergentTotal, &lostTotal)
		held = append(held, h)
		resynced = append(resynced, rs)
		steps = append(steps, st)
	}
	for i, name := range vm3StepNames {
		var v []time.Duration
		for _, st := range steps {
			v = append(v, st[i])
		}
		c.logf("FIGURE power cut step %q: median %v of %d: %v", name, median(v).Round(time.Millisecond), len(v), v)
	}
	c.logf("FIGURE power cut of node 2 -> a survivor holds its slot, fenced and recovered: median %v of %d: %v", median(held).Round(time.Millisecond), len(held), held)
	c.logf("FIGURE power cut of node 2 -> its dirty chunks resynced: median %v of %d: %v", median(resynced).Round(time.Millisecond), len(resynced), resynced)
	c.logf("power cuts: %d, acknowledged writes lost: %d, divergent extents: %d", cuts, lostTotal, divergentTotal)
	var worst, worstErr time.Duration
	for _, v := range c.clockLog {
		worst, worstErr = max(worst, v[0], -v[0]), max(worstErr, v[1])
	}
	c.logf("clock offsets (guest - host): %d measurements, largest |offset| %v, largest error bound %v", len(c.clockLog), worst.Round(time.Microsecond), worstErr.Round(time.Microsecond))

	c.interop()
	ok = true
}

// checkStateDisk fails the test unless node n's data_dir is its own
// state disk (when the harness gave it one): a mount that failed at boot
// would leave the daemon on the initramfs and the test unaware.
func (c *vm3Cluster) checkStateDisk(n int) {
	c.t.Helper()
	if c.state[n-1] == "" {
		return
	}
	r := c.run(n, time.Minute, "grep ' /var/lib/mdc ext4 ' /proc/mounts")
	c.logf("node %d: data_dir on its state disk: %s", n, strings.TrimSpace(r.out))
}

// startDaemon starts mdclusterd on node n from its configuration file, its
// log on ttyS2.
func (c *vm3Cluster) startDaemon(n int) {
	c.t.Helper()
	c.run(n, time.Minute, "mdclusterd -c /etc/mdc/n$(cat /etc/node).toml </dev/null >/dev/ttyS2 2>&1 & echo $! > /tmp/daemon.pid")
}

func (c *vm3Cluster) waitQuorate(n int) {
	c.t.Helper()
	c.waitFor(n, 5*time.Minute, "quorate, 3 votes, DLM connected to both others",
		"mdadm-go --cluster > /tmp/c && grep -q 'Quorate: *Yes' /tmp/c && grep -q 'Total votes: *3' /tmp/c && [ $(grep -c '(connected)' /tmp/c) = 2 ]")
}

// waitLog polls the host-side logs until cond holds.
func (c *vm3Cluster) waitLog(timeout time.Duration, what string, cond func() bool) {
	c.t.Helper()
	c.waitLogf(timeout, func() string { return what }, cond)
}

// waitLogf is waitLog with the description made at the failure.
func (c *vm3Cluster) waitLogf(timeout time.Duration, what func() string, cond func() bool) {
	c.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		c.alive()
		if time.Now().After(deadline) {
			c.fatalf("timed out after %v waiting for: %s", timeout, what())
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// powerCut is one round of scenario 2 and 4 on array md: all three nodes
// write their regions through dev; node 2's QEMU is killed; the survivors'
// logs must show the fence, the slot taken over and its chunks resynced;
// every write acknowledged must read back, through node 1 and from the
// images, whose copies must all be identical; node 2 boots again and
// rejoins. It returns the two figures.
// vm3StepNames name the steps from a power cut to the resync, in order;
// powerCut returns each one's duration (from the end of the previous).
var vm3StepNames = [...]string{
	"cut -> declared dead (failure detector)",
	"-> generation stamped (view agreed, fence began)",
	"-> fenced (the fence's wait)",
	"-> slot held (lock recovery, slot merged)",
	"-> resynced",
}

const vm3Steps = len(vm3StepNames)

func (c *vm3Cluster) powerCut(epoch int, md, uuid, dev string, devs []int, divergentTotal, lostTotal *int) (held, resynced time.Duration, steps [vm3Steps]time.Duration) {
	c.t.Helper()
	for n := 1; n <= 3; n++ {
		r := vm3Region(n, epoch)
		c.run(n, time.Minute, fmt.Sprintf("rm -f /tmp/stop /tmp/w.out; vm3guest write %s %d %d %d %d %d /dev/ttyS3 /tmp/stop >/tmp/w.out 2>&1 &", dev, n, epoch, r.Start, r.Len, r.Block))
	}
	c.waitLog(3*time.Minute, "every writer acknowledged 24 writes", func() bool {
		for n := 1; n <= 3; n++ {
			if c.lastAck(n, epoch) < 24 {
				return false
			}
		}
		return true
	})
	// Fresh clock offsets of the survivors: their log times are converted
	// with them.
	c.measureClock(c.vms[0])
	c.measureClock(c.vms[2])
	cut := c.kill(2)
	acked2 := c.lastAck(2, epoch)
	c.logf("cut %d (%s): node 2's power cut after %d acknowledged writes", epoch, md, acked2)
	arr := "array=" + uuid
	var fenced, merged, rsync vm3LogLine
	var rec [2]vm3LogLine
	c.waitLogf(5*time.Minute, func() string {
		return fmt.Sprintf("the survivors fenced node 2, recovered, took its slot over and resynced its chunks; seen: fenced %q, lock recovery %q / %q, merged %q, resynced %q",
			fenced.line, rec[0].line, rec[1].line, merged.line, rsync.line)
	}, func() bool {
		var ok bool
		if fenced.msg == "" {
			if fenced, ok = c.firstLog(1, cut, "node fenced", "victim=2"); !ok {
				fenced, _ = c.firstLog(3, cut, "node fenced", "victim=2")
			}
		}
		for i, n := range []int{1, 3} {
			if rec[i].msg == "" {
				rec[i], _ = c.firstLog(n, cut, "lock recovery done", arr)
			}
		}
		mergedOn := 0
		for _, n := range []int{1, 3} {
			if merged.msg == "" {
				if merged, ok = c.firstLog(n, cut, "dead slot's dirty bits merged", arr); ok {
					mergedOn = n
				}
			}
		}
		if merged.msg != "" && rsync.msg == "" {
			for _, n := range []int{1, 3} {
				if mergedOn != 0 && n != mergedOn {
					continue
				}
				if l, ok := c.firstLog(n, merged.at, "resynced the chunks a bitmap slot marked", arr); ok {
					rsync = l
				}
			}
		}
		return fenced.msg != "" && rec[0].msg != "" && rec[1].msg != "" && merged.msg != "" && rsync.msg != ""
	})
	last := fenced.at
	for _, l := range append(rec[:], merged) {
		if l.at.After(last) {
			last = l.at
		}
	}
	held, resynced = last.Sub(cut), rsync.at.Sub(cut)
	// The breakdown: the first survivor to declare node 2 dead, the
	// fencer's stamp (the fence's wait runs from it).
	dead, stamped := fenced.at, fenced.at
	for _, n := range []int{1, 3} {
		if l, ok := c.firstLog(n, cut, "failure detector", "peer=2", "alive=false"); ok && l.at.Before(dead) {
			dead = l.at
		}
		if l, ok := c.firstLog(n, cut, "storage fence: generation stamped"); ok && l.at.Before(stamped) {
			stamped = l.at
		}
	}
	if stamped.Before(dead) {
		stamped = dead
	}
	steps = [vm3Steps]time.Duration{dead.Sub(cut), stamped.Sub(dead), fenced.at.Sub(stamped), last.Sub(fenced.at), rsync.at.Sub(last)}
	c.logf("cut %d: declared dead +%v, stamped +%v, fenced +%v, lock recovery done +%v/+%v, slot merged +%v (%s), resynced +%v",
		epoch, dead.Sub(cut).Round(time.Millisecond), stamped.Sub(cut).Round(time.Millisecond), fenced.at.Sub(cut).Round(time.Millisecond),
		rec[0].at.Sub(cut).Round(time.Millisecond), rec[1].at.Sub(cut).Round(time.Millisecond),
		merged.at.Sub(cut).Round(time.Millisecond), merged.line, resynced.Round(time.Millisecond))

	// Stop the survivors' writers; what they acknowledged.
	acked := []uint64{0, acked2, 0}
	for _, n := range []int{1, 3} {
		r := c.run(n, 3*time.Minute, "touch /tmp/stop; i=0; while ! grep -q acked /tmp/w.out; do sleep 0.2; i=$((i+1)); [ $i -lt 600 ] || break; done; cat /tmp/w.out; ! grep -q vm3guest: /tmp/w.out")
		f := strings.Fields(r.out)
		if len(f) < 2 || f[0] != "acked" {
			c.fatalf("node %d's writer: %q", n, r.out)
		}
		acked[n-1], _ = strconv.ParseUint(f[1], 10, 64)
	}
	var regions []vm3pattern.Region
	for n := 1; n <= 3; n++ {
		r := vm3Region(n, epoch)
		regions = append(regions, r)
		// Through node 1's device (node 3's for node 1's region: reads
		// of another node's writes).
		reader := 1
		if n == 1 {
			reader = 3
		}
		c.run(reader, 5*time.Minute, fmt.Sprintf("echo 3 > /proc/sys/vm/drop_caches; vm3guest verify %s %d %d %d %d %d %d", dev, n, epoch, r.Start, r.Len, r.Block, acked[n-1]))
	}
	div, err := c.hostCheck(devs, regions, acked)
	*divergentTotal += div
	if err != nil {
		*lostTotal++
		c.fatalf("cut %d: the member images: %v", epoch, err)
	}
	c.logf("cut %d: acknowledged writes %v all read back (through the survivors and from every copy on the images); no divergent copies", epoch, acked)

	// Scenario 4: node 2 boots again and rejoins.
	back := time.Now()
	c.start(2)
	c.checkStateDisk(2)
	c.startDaemon(2)
	c.waitQuorate(2)
	if c.state[1] != "" {
		// It restarted from what it persisted before the cut, not as a
		// node that never ran.
		l, ok := c.firstLog(2, back.Add(-time.Second), "loaded persisted membership state")
		if !ok {
			c.fatalf("cut %d: node 2 rebooted with its state disk but did not load its persisted membership state", epoch)
		}
		c.logf("cut %d: node 2 restarted from its state disk: %s", epoch, l.line)
	}
	for _, m := range []string{"md0", "md1"} {
		c.waitFor(2, 5*time.Minute, m+" running on node 2, clean", "mdadm-go --detail /dev/"+m+" > /tmp/d && grep -q 'State : clean' /tmp/d && ! grep -q 'Resync Status\\|Rebuild Status' /tmp/d")
	}
	c.waitFor(2, 2*time.Minute, "/dev/nbd0 and /dev/nbd1 attached on node 2", "[ -f /sys/block/nbd0/pid ] && [ -f /sys/block/nbd1/pid ]")
	r := vm3Region(2, epoch)
	c.run(2, 5*time.Minute, fmt.Sprintf("vm3guest verify %s 2 %d %d %d %d %d", dev, epoch, r.Start, r.Len, r.Block, acked[1]))
	c.logf("cut %d: node 2 rebooted and rejoined in %v; its acknowledged writes read back through its own device", epoch, time.Since(back).Round(time.Millisecond))
	return held, resynced, steps
}

// interop is scenario 5: stop the cluster, switch md0's bitmap to
// internal with mdadm-go, assemble with Linux md on node 1, same data;
// mdadm -E/-X of every member equal to mdadm-go's.
func (c *vm3Cluster) interop() {
	c.t.Helper()
	c.run(3, 3*time.Minute, "mdadm-go --stop /dev/md0")
	c.run(2, 3*time.Minute, "mdadm-go --stop /dev/md0")
	sum := strings.Fields(c.run(1, 5*time.Minute, "echo 3 > /proc/sys/vm/drop_caches; md5sum < /dev/nbd0").out)[0]
	c.run(1, 3*time.Minute, "mdadm-go --grow /dev/md0 --bitmap=internal")
	c.run(1, 3*time.Minute, "mdadm-go --stop /dev/md0")
	for n := 1; n <= 3; n++ {
		c.run(n, 3*time.Minute, "kill -TERM $(cat /tmp/daemon.pid); i=0; while kill -0 $(cat /tmp/daemon.pid) 2>/dev/null; do sleep 0.2; i=$((i+1)); [ $i -lt 300 ] || exit 1; done")
	}
	compared := 0
	for _, d := range []string{"vda", "vdb", "vdc"} {
		for _, op := range []string{"-E", "-X"} {
			a := c.run(1, time.Minute, fmt.Sprintf("mdadm %s /dev/%s 2>&1; echo exit=$?", op, d)).out
			b := c.run(1, time.Minute, fmt.Sprintf("mdadm-go %s /dev/%s 2>&1; echo exit=$?", op, d)).out
			if strings.ReplaceAll(a, "mdadm: ", "mdadm-go: ") != b {
				c.t.Errorf("mdadm %s /dev/%s differs from mdadm-go's (- mdadm, + mdadm-go):\n%s", op, d, lineDiff(a, b))
			}
			compared++
		}
	}
	c.run(1, 3*time.Minute, "mdadm --assemble /dev/md0 --run /dev/vda /dev/vdb /dev/vdc && cat /proc/mdstat")
	got := strings.Fields(c.run(1, 5*time.Minute, "md5sum < /dev/md0").out)[0]
	if got != sum {
		c.fatalf("Linux md reads md5 %s, the cluster read %s", got, sum)
	}
	c.run(1, 3*time.Minute, "mdadm --stop /dev/md0")
	if c.t.Failed() {
		c.fatalf("scenario 5: -E/-X differ")
	}
	c.logf("scenario 5: passed (bitmap switched to internal, Linux md reads the same md5 %s; %d mdadm -E/-X compared with mdadm-go's)", sum, compared)
}
