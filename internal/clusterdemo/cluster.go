// Package clusterdemo runs a three-node mdcluster on one machine: three
// mdclusterd processes on 127.0.0.1 with file-backed members, driven with
// mdadm-go and independent NBD clients (nbdcopy, fio). cmd/mdcluster-demo
// (make demo) runs the whole story; the package's test runs its core.
package clusterdemo

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/ctl"
)

// Cluster is three daemons in a directory.
type Cluster struct {
	Dir   string // everything lives here
	Bin   string // mdclusterd and mdadm-go
	Out   io.Writer
	Disks string // the member images' directory
	Nodes []*Daemon
	start time.Time
}

// Daemon is one mdclusterd process.
type Daemon struct {
	ID      int
	Config  string
	Socket  string // control socket
	Export  string // md0's NBD socket
	Log     string
	Gossip  int
	Metrics int // the /metrics port on 127.0.0.1
	cmd     *exec.Cmd
	done    chan error
	exitErr error
}

// freePort returns a port free for both TCP and UDP on 127.0.0.1.
func freePort() (int, error) {
	for i := 0; i < 50; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		p := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", p))
		l.Close()
		if err == nil {
			u.Close()
			return p, nil
		}
	}
	return 0, fmt.Errorf("no free port")
}

// Setup writes the key, the fence agent and three configuration files.
func Setup(dir, bin string, out io.Writer) (*Cluster, error) {
	c := &Cluster{Dir: dir, Bin: bin, Out: out, Disks: filepath.Join(dir, "disks"), start: time.Now()}
	if err := os.MkdirAll(c.Disks, 0o700); err != nil {
		return nil, err
	}
	key := filepath.Join(dir, "cluster.key")
	if err := os.WriteFile(key, []byte("6d64636c75737465722064656d6f206b657920666f722074687265652e2e2e2e\n"), 0o600); err != nil {
		return nil, err
	}
	// The fence agent records its victim and succeeds (a real cluster runs
	// fence_ipmilan or fence_scsi here; the process is already dead).
	agent := filepath.Join(dir, "fence_demo")
	script := "#!/bin/sh\nn=?\nwhile read l; do case \"$l\" in nodename=*) n=${l#nodename=};; esac; done\n" +
		"echo \"$(date -u +%Y-%m-%dT%H:%M:%S.%NZ) fenced node $n\" >> " + filepath.Join(dir, "fence.log") + "\nexit 0\n"
	if err := os.WriteFile(agent, []byte(script), 0o700); err != nil {
		return nil, err
	}
	ports := make([]int, 6) // gossip 1..3, then metrics 1..3
	for i := range ports {
		p, err := freePort()
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	for i := 1; i <= 3; i++ {
		d := &Daemon{ID: i, Gossip: ports[i-1], Metrics: ports[i+2],
			Config: filepath.Join(dir, fmt.Sprintf("node%d.toml", i)),
			Socket: filepath.Join(dir, fmt.Sprintf("run%d", i), "mdclusterd.sock"),
			Export: filepath.Join(dir, fmt.Sprintf("run%d", i), "md0.nbd"),
			Log:    filepath.Join(dir, fmt.Sprintf("node%d.log", i))}
		var seeds []string
		for j := 1; j <= 3; j++ {
			if j != i {
				seeds = append(seeds, fmt.Sprintf("%q", fmt.Sprintf("127.0.0.1:%d", ports[j-1])))
			}
		}
		cfg := fmt.Sprintf(`node_id = %d
profile = "storage-lan"
data_dir = %q
cluster_key_file = %q
[gossip]
bind_addr = "127.0.0.1"
port = %d
seeds = [%s]
[dlm]
listen_addr = "127.0.0.1:0"
[quorum]
data_nodes = [1, 2, 3]
m = 2
[fencing]
timeout = "10s"
[[fencing.level]]
[[fencing.level.agent]]
path = %q
[devices]
search = [%q]
[[array]]
name = "md0"
[array.export]
socket = %q
[control]
socket = %q
[metrics]
listen = "127.0.0.1:%d"
[shutdown]
leave_timeout = "2s"
`, i, filepath.Join(dir, fmt.Sprintf("data%d", i)), key, ports[i-1], strings.Join(seeds, ", "), agent,
			filepath.Join(c.Disks, "*.img"), d.Export, d.Socket, d.Metrics)
		if err := os.WriteFile(d.Config, []byte(cfg), 0o600); err != nil {
			return nil, err
		}
		c.Nodes = append(c.Nodes, d)
	}
	return c, nil
}

// Say prints a line with the time since the start.
func (c *Cluster) Say(format string, args ...any) {
	fmt.Fprintf(c.Out, "[%6.2fs] %s\n", time.Since(c.start).Seconds(), fmt.Sprintf(format, args...))
}

// Image creates a member image of size bytes.
func (c *Cluster) Image(name string, size int64) (string, error) {
	p := filepath.Join(c.Disks, name)
	f, err := os.Create(p)
	if err != nil {
		return "", err
	}
	defer f.Close()
	return p, f.Truncate(size)
}

// Start starts daemon d.
func (c *Cluster) Start(d *Daemon) error {
	lf, err := os.OpenFile(d.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	cmd := exec.Command(filepath.Join(c.Bin, "mdclusterd"), "-c", d.Config)
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		lf.Close()
		return err
	}
	d.cmd, d.done = cmd, make(chan error, 1)
	go func() { err := cmd.Wait(); lf.Close(); d.done <- err }()
	return nil
}

// Kill sends SIGKILL to daemon d and waits for it to die.
func (d *Daemon) Kill() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	d.cmd.Process.Signal(syscall.SIGKILL)
	d.exitErr = <-d.done
	d.cmd = nil
}

// Term sends SIGTERM and waits up to timeout for a graceful exit.
func (d *Daemon) Term(timeout time.Duration) error {
	if d.cmd == nil || d.cmd.Process == nil {
		return nil
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-d.done:
		d.cmd = nil
		return err
	case <-time.After(timeout):
		d.Kill()
		return fmt.Errorf("node %d did not stop within %v: killed", d.ID, timeout)
	}
}

// Metric scrapes daemon d's /metrics and returns the value of one series,
// written as in the exposition format (e.g.
// `mdcluster_array_running{array="md0"}`); false if the series is absent.
func (c *Cluster) Metric(ctx context.Context, d *Daemon, series string) (float64, bool, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/metrics", d.Metrics), nil)
	if err != nil {
		return 0, false, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, false, fmt.Errorf("node %d metrics: %w", d.ID, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return 0, false, fmt.Errorf("node %d metrics: %w", d.ID, err)
	}
	for _, line := range strings.Split(string(body), "\n") {
		v, ok := strings.CutPrefix(line, series+" ")
		if !ok {
			continue
		}
		f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
		if err != nil {
			return 0, false, fmt.Errorf("node %d metrics: %q: %w", d.ID, line, err)
		}
		return f, true, nil
	}
	return 0, false, nil
}

// Running reports whether the process runs.
func (d *Daemon) Running() bool { return d.cmd != nil }

// Stop stops every daemon still running, one at a time from the highest
// ID (SIGTERM: each leaves gracefully while the others keep quorum; the
// last one is alone in its view and skips the leave). It returns the
// first error.
func (c *Cluster) Stop() error {
	var first error
	for i := len(c.Nodes) - 1; i >= 0; i-- {
		d := c.Nodes[i]
		if !d.Running() {
			continue
		}
		t := time.Now()
		if err := d.Term(20 * time.Second); err != nil {
			c.Say("node %d: stop: %v (see %s)", d.ID, err, d.Log)
			if first == nil {
				first = fmt.Errorf("node %d: stop: %w", d.ID, err)
			}
			continue
		}
		c.Say("node %d: SIGTERM: exited 0 after a graceful stop (%v)", d.ID, time.Since(t).Round(time.Millisecond))
	}
	return first
}

// WaitView waits until every running daemon reports a quorate view of
// want members with its lock recovery done.
func (c *Cluster) WaitView(ctx context.Context, want int) error {
	for _, d := range c.Nodes {
		if !d.Running() {
			continue
		}
		for {
			st, err := c.Status(ctx, d)
			if err == nil && st.Quorum.Quorate && len(st.View.Members) == want && st.RecoveredGeneration == st.View.Generation {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("node %d: no quorate view of %d (last error %v; see %s)", d.ID, want, err, d.Log)
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

// Status asks daemon d for its status.
func (c *Cluster) Status(ctx context.Context, d *Daemon) (*ctl.Status, error) {
	cl, err := ctl.Dial(ctx, d.Socket)
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	return cl.Status(ctx)
}

// Mdadm runs mdadm-go against daemon d and returns its combined output.
func (c *Cluster) Mdadm(ctx context.Context, d *Daemon, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(c.Bin, "mdadm-go"), append([]string{"--socket=" + d.Socket}, args...)...)
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := cmd.Run()
	if err != nil {
		return b.String(), fmt.Errorf("mdadm-go %s (node %d): %v: %s", strings.Join(args, " "), d.ID, err, strings.TrimSpace(b.String()))
	}
	return b.String(), nil
}

// URI is the NBD URI of d's md0 export.
func (d *Daemon) URI() string { return "nbd+unix:///md0?socket=" + d.Export }

// Run runs an external command, returning its combined output.
func Run(ctx context.Context, name string, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

// Grep returns the lines of d's log that contain every one of words.
func (d *Daemon) Grep(words ...string) []string {
	f, err := os.Open(d.Log)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		ok := true
		for _, w := range words {
			if !strings.Contains(line, w) {
				ok = false
				break
			}
		}
		if ok {
			out = append(out, line)
		}
	}
	return out
}

// WaitLog waits until d's log has a line with every word; it returns the
// first such line.
func (d *Daemon) WaitLog(ctx context.Context, words ...string) (string, error) {
	for {
		if l := d.Grep(words...); len(l) > 0 {
			return l[0], nil
		}
		select {
		case <-ctx.Done():
			return "", fmt.Errorf("node %d: no log line with %q (see %s)", d.ID, words, d.Log)
		case <-time.After(50 * time.Millisecond):
		}
	}
}
