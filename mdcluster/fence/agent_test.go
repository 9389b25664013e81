package fence

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
)

// writeAgent writes an executable shell script into dir and returns its path.
func writeAgent(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// recordingAgent appends each invocation's stdin to dir/calls, separated by
// "--\n", and answers action=status with statusCode.
func recordingAgent(t *testing.T, dir string, statusCode int) string {
	return writeAgent(t, dir, "fence_record", `
log="`+filepath.Join(dir, "calls")+`"
action=""
while IFS= read -r line; do
	printf '%s\n' "$line" >> "$log"
	case "$line" in action=*) action="${line#action=}";; esac
done
echo "--" >> "$log"
if [ "$action" = status ]; then
	echo "Status: whatever"
	exit `+strconv.Itoa(statusCode)+`
fi
exit 0
`)
}

func readCalls(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "calls"))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	calls := strings.Split(string(b), "--\n")
	return calls[:len(calls)-1]
}

func fixedNow() time.Time { return time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC) }

func TestAgentSuccessWritesProtocol(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{
		Path:        recordingAgent(t, dir, 2),
		Options:     map[string]string{"login": "admin", "passwd": "s3cret", "ipaddr": "10.0.0.1", "port": "default"},
		NodeOptions: map[ddraid.NodeID]map[string]string{3: {"port": "node3-plug"}},
		Now:         fixedNow,
	}
	res, err := a.Fence(context.Background(), Request{Node: 3, Name: "node3.example", Generation: 7})
	if err != nil {
		t.Fatalf("Fence: %v", err)
	}
	want := Result{Node: 3, Method: "agent fence_record", FencedAt: fixedNow()}
	if res != want {
		t.Errorf("Result = %+v, want %+v", res, want)
	}
	calls := readCalls(t, dir)
	wantIn := "action=off\nnodename=node3.example\nipaddr=10.0.0.1\nlogin=admin\npasswd=s3cret\nport=node3-plug\n"
	if len(calls) != 1 || calls[0] != wantIn {
		t.Errorf("agent stdin = %q, want exactly one call with %q", calls, wantIn)
	}
}

func TestAgentDefaultNodename(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{Path: recordingAgent(t, dir, 2), Options: map[string]string{"port": "p"}}
	if _, err := a.Fence(context.Background(), Request{Node: 12}); err != nil {
		t.Fatal(err)
	}
	calls := readCalls(t, dir)
	if len(calls) != 1 || !strings.Contains(calls[0], "nodename=12\n") || !strings.Contains(calls[0], "port=p\n") {
		t.Errorf("stdin = %q, want nodename=12 and the device's port", calls)
	}
}

func TestAgentFailureReportsStderr(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{
		Path:    writeAgent(t, dir, "fence_broken", "cat >/dev/null\necho 'some progress' \necho 'Unable to connect/login to fencing device' >&2\nexit 1\n"),
		Options: map[string]string{"passwd": "s3cret"},
	}
	_, err := a.Fence(context.Background(), Request{Node: 2})
	if err == nil {
		t.Fatal("Fence succeeded, want failure")
	}
	if !errors.Is(err, ErrFailed) {
		t.Errorf("err = %v, want ErrFailed", err)
	}
	for _, s := range []string{"exit status 1", "Unable to connect/login to fencing device", "fence_broken", "node 2"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("err %q does not mention %q", err, s)
		}
	}
	if strings.Contains(err.Error(), "s3cret") {
		t.Errorf("err %q leaks the password", err)
	}
}

func TestAgentKilledBySignalIsFailure(t *testing.T) {
	a := &Agent{Path: writeAgent(t, t.TempDir(), "fence_crash", "kill -9 $$\n")}
	if _, err := a.Fence(context.Background(), Request{Node: 2}); !errors.Is(err, ErrFailed) {
		t.Fatalf("err = %v, want ErrFailed", err)
	}
}

// hangingAgent starts a long-lived child (as agents start ipmitool), records
// the child's pid and waits for it.
func hangingAgent(t *testing.T, dir string) (path, pidFile string) {
	pidFile = filepath.Join(dir, "child.pid")
	path = writeAgent(t, dir, "fence_hang", `
sleep 300 &
echo $! > "`+pidFile+`"
echo "waiting for the device" >&2
wait
exit 0
`)
	return path, pidFile
}

func TestAgentTimeoutIsFailureAndKills(t *testing.T) {
	for _, tc := range []struct {
		name    string
		timeout time.Duration // Agent.Timeout
		ctxTO   time.Duration // ctx deadline; 0 = none
	}{
		{name: "configured timeout", timeout: 300 * time.Millisecond},
		{name: "ctx deadline", timeout: time.Hour, ctxTO: 300 * time.Millisecond},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path, pidFile := hangingAgent(t, dir)
			a := &Agent{Path: path, Timeout: tc.timeout}
			ctx := context.Background()
			if tc.ctxTO > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.ctxTO)
				defer cancel()
			}
			start := time.Now()
			_, err := a.Fence(ctx, Request{Node: 4})
			if elapsed := time.Since(start); elapsed > 20*time.Second {
				t.Errorf("Fence took %v: the hanging agent was not killed", elapsed)
			}
			if !errors.Is(err, ErrTimeout) || !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("err = %v, want ErrTimeout wrapping context.DeadlineExceeded", err)
			}
			if !strings.Contains(err.Error(), "waiting for the device") {
				t.Errorf("err %q does not carry the agent's stderr", err)
			}
			b, rerr := os.ReadFile(pidFile)
			if rerr != nil {
				t.Fatalf("agent did not record its child: %v", rerr)
			}
			pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
			waitGone(t, pid)
		})
	}
}

// waitGone waits (with a generous guard) until pid no longer runs: absent, or
// a zombie waiting for its new parent to reap it.
func waitGone(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil {
			return // gone
		}
		if f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("agent's child %d still running after the timeout", pid)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestAgentCancelledIsFailure(t *testing.T) {
	path, _ := hangingAgent(t, t.TempDir())
	a := &Agent{Path: path}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := a.Fence(ctx, Request{Node: 4})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func TestAgentVerify(t *testing.T) {
	for _, tc := range []struct {
		name       string
		statusCode int
		wantErr    error
	}{
		{name: "off", statusCode: 2},
		{name: "still on", statusCode: 0, wantErr: ErrNotVerified},
		{name: "unreachable", statusCode: 1, wantErr: ErrNotVerified},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			a := &Agent{Path: recordingAgent(t, dir, tc.statusCode), Verify: true, Now: fixedNow}
			res, err := a.Fence(context.Background(), Request{Node: 5, Name: "n5"})
			if !errors.Is(err, tc.wantErr) || (tc.wantErr != nil) != (err != nil) {
				t.Fatalf("err = %v, want %v", err, tc.wantErr)
			}
			if tc.wantErr == nil && !res.Verified {
				t.Errorf("Result.Verified = false after status reported off")
			}
			calls := readCalls(t, dir)
			if len(calls) != 2 || !strings.HasPrefix(calls[0], "action=off\n") || !strings.HasPrefix(calls[1], "action=status\nnodename=n5\n") {
				t.Errorf("agent calls = %q, want off then status", calls)
			}
		})
	}
}

func TestAgentWithoutVerifyRunsOnce(t *testing.T) {
	dir := t.TempDir()
	a := &Agent{Path: recordingAgent(t, dir, 0)}
	res, err := a.Fence(context.Background(), Request{Node: 5})
	if err != nil || res.Verified {
		t.Fatalf("Fence = %+v, %v; want unverified success", res, err)
	}
	if calls := readCalls(t, dir); len(calls) != 1 {
		t.Errorf("agent ran %d times, want 1", len(calls))
	}
}

func TestAgentRefusesBadOptions(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts map[string]string
		req  Request
	}{
		{name: "reserved action", opts: map[string]string{"action": "on"}},
		{name: "reserved nodename", opts: map[string]string{"nodename": "other"}},
		{name: "newline in value", opts: map[string]string{"passwd": "x\naction=on"}},
		{name: "equals in key", opts: map[string]string{"a=b": "c"}},
		{name: "empty key", opts: map[string]string{"": "c"}},
		{name: "newline in node name", req: Request{Node: 1, Name: "n1\naction=on"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			a := &Agent{Path: recordingAgent(t, dir, 2), Options: tc.opts}
			req := tc.req
			if req.Node == 0 {
				req.Node = 1
			}
			if _, err := a.Fence(context.Background(), req); err == nil {
				t.Fatal("Fence succeeded with a bad option")
			} else if strings.Contains(err.Error(), "x\naction") {
				t.Errorf("err %q echoes the option value", err)
			}
			if calls := readCalls(t, dir); len(calls) != 0 {
				t.Errorf("agent was run with a bad option: %q", calls)
			}
		})
	}
}

func TestAgentMissingBinary(t *testing.T) {
	for _, a := range []*Agent{{Path: filepath.Join(t.TempDir(), "fence_absent")}, {}} {
		if _, err := a.Fence(context.Background(), Request{Node: 1}); err == nil {
			t.Errorf("Fence with agent %q succeeded", a.Path)
		}
	}
}

func TestTailBuffer(t *testing.T) {
	var b tailBuffer
	b.Write([]byte(strings.Repeat("a", outputLimit)))
	b.Write([]byte("end"))
	s := b.String()
	if !strings.HasPrefix(s, "...") || !strings.HasSuffix(s, "aend") || len(s) != outputLimit+3 {
		t.Errorf("tail = %d bytes %q..., want the last %d bytes after \"...\"", len(s), s[:10], outputLimit)
	}
}
