package fence

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
)

// DefaultAgentTimeout bounds one agent invocation when Agent.Timeout is zero.
// It matches Pacemaker's default stonith-timeout.
const DefaultAgentTimeout = 60 * time.Second

// Exit codes of the fence agent API for action=status.
const (
	statusOn  = 0
	statusOff = 2
)

// outputLimit is how much of an agent's stderr and stdout is kept for error
// messages. Agents can be chatty; the tail is what explains a failure.
const outputLimit = 4096

// Agent fences by running a ClusterLabs fence agent (fence_ipmilan,
// fence_scsi, fence_sbd, ...), so every existing agent works unchanged.
//
// The agent gets its arguments as "key=value" lines on stdin: action=off,
// nodename=<Request.NodeName()>, then the device options. Exit status 0 means
// the node is off; anything else, a signal, or running past the time limit is
// a failure, and the agent's process group is killed. With Verify set, the
// agent is run again with action=status after the off, and only exit status 2
// ("off") confirms the fence.
//
// An Agent must not be modified while Fence runs; Fence itself may run
// concurrently.
type Agent struct {
	// Path is the agent binary.
	Path string
	// Options are device options passed to every invocation (ipaddr, login,
	// passwd, ...). They never appear in errors or logs.
	Options map[string]string
	// NodeOptions are per-victim options (typically port or plug, or a
	// per-node ipaddr for IPMI). They override Options with the same key.
	NodeOptions map[ddraid.NodeID]map[string]string
	// Timeout bounds each invocation; zero means DefaultAgentTimeout. The
	// ctx deadline applies as well, whichever is sooner.
	Timeout time.Duration
	// Verify runs action=status after a successful off and requires "off".
	Verify bool
	// Now stamps Result.FencedAt; nil means time.Now.
	Now func() time.Time
}

// reservedKeys are written by Agent itself; allowing them in options would
// let a configuration turn "off" into something else.
var reservedKeys = []string{"action", "nodename"}

// Fence implements Fencer.
func (a *Agent) Fence(ctx context.Context, req Request) (Result, error) {
	name := a.method()
	code, out, err := a.run(ctx, "off", req)
	if err != nil {
		return Result{}, fmt.Errorf("fence: %s: off node %s: %w", name, req.Node, err)
	}
	if code != 0 {
		return Result{}, fmt.Errorf("fence: %s: off node %s: exit status %d: %w%s", name, req.Node, code, ErrFailed, out)
	}
	res := Result{Node: req.Node, Method: name}
	if a.Verify {
		code, out, err := a.run(ctx, "status", req)
		switch {
		case err != nil:
			return Result{}, fmt.Errorf("fence: %s: verifying node %s: %w: %w", name, req.Node, ErrNotVerified, err)
		case code == statusOn:
			return Result{}, fmt.Errorf("fence: %s: node %s still reports on after off: %w%s", name, req.Node, ErrNotVerified, out)
		case code != statusOff:
			return Result{}, fmt.Errorf("fence: %s: status of node %s: exit status %d: %w%s", name, req.Node, code, ErrNotVerified, out)
		}
		res.Verified = true
	}
	now := time.Now
	if a.Now != nil {
		now = a.Now
	}
	res.FencedAt = now()
	return res, nil
}

func (a *Agent) method() string { return "agent " + filepath.Base(a.Path) }

// input renders the stdin of one invocation.
func (a *Agent) input(action string, req Request) (string, error) {
	opts := make(map[string]string, len(a.Options)+len(a.NodeOptions[req.Node]))
	for k, v := range a.Options {
		opts[k] = v
	}
	for k, v := range a.NodeOptions[req.Node] {
		opts[k] = v
	}
	var b strings.Builder
	if err := writeArg(&b, "action", action); err != nil {
		return "", err
	}
	if err := writeArg(&b, "nodename", req.NodeName()); err != nil {
		return "", err
	}
	keys := make([]string, 0, len(opts))
	for k := range opts {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if slices.Contains(reservedKeys, k) {
			return "", fmt.Errorf("option %q is set by the fencer itself and may not be configured", k)
		}
		if err := writeArg(&b, k, opts[k]); err != nil {
			return "", err
		}
	}
	return b.String(), nil
}

// writeArg appends one "key=value" line, refusing anything that would break
// the line format (and so let a value smuggle in another argument).
func writeArg(b *strings.Builder, key, value string) error {
	if key == "" || strings.ContainsAny(key, "= \t\r\n#") {
		return fmt.Errorf("invalid option name %q", key)
	}
	if strings.ContainsAny(value, "\r\n") {
		// The value may be a password: name the key only.
		return fmt.Errorf("value of option %q contains a line break", key)
	}
	b.WriteString(key)
	b.WriteByte('=')
	b.WriteString(value)
	b.WriteByte('\n')
	return nil
}

// run executes the agent once. It returns the exit status and a formatted
// tail of the agent's output (for error messages), or an error if the agent
// could not be run to completion: not startable, killed by a signal, timed out
// or cancelled.
func (a *Agent) run(ctx context.Context, action string, req Request) (int, string, error) {
	if a.Path == "" {
		return 0, "", errors.New("no agent path configured")
	}
	in, err := a.input(action, req)
	if err != nil {
		return 0, "", err
	}
	timeout := a.Timeout
	if timeout <= 0 {
		timeout = DefaultAgentTimeout
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	var stdout, stderr tailBuffer
	cmd := exec.CommandContext(ctx, a.Path)
	cmd.Stdin = strings.NewReader(in)
	cmd.Stdout = &stdout
	cmd.Stderr = &stderr
	killProcessGroup(cmd)
	// If a grandchild keeps the output pipes open after the kill, stop
	// waiting for it after a short grace period.
	cmd.WaitDelay = 2 * time.Second

	runErr := cmd.Run()
	out := formatOutput(stderr.String(), stdout.String())
	if runErr == nil {
		return 0, out, nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		if errors.Is(ctxErr, context.DeadlineExceeded) {
			return 0, out, fmt.Errorf("action=%s: %w (limit %v, agent killed): %w%s", action, ErrTimeout, timeout, ctxErr, out)
		}
		return 0, out, fmt.Errorf("action=%s: agent killed: %w", action, ctxErr)
	}
	var exitErr *exec.ExitError
	if errors.As(runErr, &exitErr) {
		if code := exitErr.ExitCode(); code >= 0 {
			return code, out, nil
		}
		return 0, out, fmt.Errorf("action=%s: agent %w: %w%s", action, ErrFailed, runErr, out)
	}
	return 0, out, fmt.Errorf("action=%s: %w", action, runErr)
}

func formatOutput(stderr, stdout string) string {
	if s := strings.TrimSpace(stderr); s != "" {
		return ": stderr: " + s
	}
	if s := strings.TrimSpace(stdout); s != "" {
		return ": stdout: " + s
	}
	return ""
}

// tailBuffer keeps the last outputLimit bytes written to it.
type tailBuffer struct {
	buf       bytes.Buffer
	truncated bool
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	n := len(p)
	t.buf.Write(p)
	if extra := t.buf.Len() - outputLimit; extra > 0 {
		t.buf.Next(extra)
		t.truncated = true
	}
	return n, nil
}

func (t *tailBuffer) String() string {
	if t.truncated {
		return "..." + t.buf.String()
	}
	return t.buf.String()
}
