// Package tooltest helps tests that drive external programs (independent
// NBD clients such as libnbd's nbdinfo and nbdcopy, fio): finding a tool,
// skipping without it (failing under CI, where a missing tool is a broken
// set-up), and running it with a deadline.
package tooltest

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// Need returns the path of program name, or skips the test when it is not
// installed; under CI (CI set) it fails instead. pkg is the Debian package
// that provides it.
func Need(t testing.TB, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		msg := fmt.Sprintf("%s not found: the independent-client tests need it (on Debian: apt-get install %s, or make deps)", name, pkg)
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	return p
}

// Run runs a program with a deadline in a temporary directory and returns
// its standard output, failing the test if it exits non-zero.
func Run(t testing.TB, timeout time.Duration, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = t.TempDir() // whatever a tool leaves behind stays out of the tree
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v after %v\nstdout:\n%s\nstderr:\n%s", name, strings.Join(args, " "), err, time.Since(start), out.String(), errb.String())
	}
	return out.String()
}
