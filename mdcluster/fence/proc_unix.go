//go:build unix

package fence

import (
	"os/exec"
	"syscall"
)

// killProcessGroup runs the agent in its own process group and makes
// cancellation kill the whole group. Agents are often scripts that start
// helpers (ipmitool, sg_persist); killing only the script would leave a
// helper running that may still switch the power later.
func killProcessGroup(cmd *exec.Cmd) {
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error {
		return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
}
