package arrays

import (
	"testing"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/cmd/mdclusterd/daemon"
)

// TestNBDDeviceFor: the kernel device is taken from the [[array]] entry
// that names the array (by UUID, or by the md device's name), never from
// another entry's.
func TestNBDDeviceFor(t *testing.T) {
	u, err := parseUUID("adeeae08:4c0892f4:38a4eae7:4751ea90")
	if err != nil {
		t.Fatal(err)
	}
	other, _ := parseUUID("11111111:22222222:33333333:44444444")
	l := New()
	l.env = daemon.ArrayEnv{Config: &config.Config{Arrays: []config.Array{
		{UUID: "11111111:22222222:33333333:44444444", NBDDevice: "/dev/nbd7"},
		{Name: "data", NBDDevice: "/dev/nbd3"},
		{Name: "plain"},
	}}}
	for _, c := range []struct {
		u    [16]byte
		md   string
		want string
	}{
		{other, "/dev/md/whatever", "/dev/nbd7"},
		{u, "/dev/md/data", "/dev/nbd3"},
		{u, "/dev/md/plain", ""},
		{u, "/dev/md0", ""},
	} {
		if got := l.nbdDeviceFor(c.u, c.md); got != c.want {
			t.Errorf("nbdDeviceFor(%x, %s) = %q, want %q", c.u[:2], c.md, got, c.want)
		}
	}
}
