//go:build !unix

package fence

import "os/exec"

// killProcessGroup keeps exec's default on systems without process groups:
// cancellation kills the agent process only.
func killProcessGroup(cmd *exec.Cmd) {}
