package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLightDependencies keeps the CLI small: it links the format packages
// and the control client, not the daemon's machinery (the lock manager,
// the array manager, the state store). Every package costs start-up time,
// which a VM under TCG or a busy node pays at every mdadm-go call: with
// the array manager linked in, the binary was 10.7 MB with 331 packages,
// and an add-spare timed from the command line paid for it.
func TestLightDependencies(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool in PATH")
	}
	out, err := exec.Command(goTool, "list", "-deps", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, heavy := range []string{"/dlm", "/mdcluster/array", "/mdcluster/raid", "/mdcluster/node", "/broadcast", "badger", "memberlist"} {
		for _, p := range strings.Fields(string(out)) {
			if strings.Contains(p, heavy) {
				t.Errorf("mdadm-go links %s", p)
			}
		}
	}
}
