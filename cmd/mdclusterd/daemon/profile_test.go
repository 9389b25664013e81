package daemon

import (
	"testing"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/mdcluster/membership/gossip"
)

// TestNodeProfile: each profile of the configuration file runs its own
// failure detector (a profile that fell through to another would pass
// every functional test with the wrong timings).
func TestNodeProfile(t *testing.T) {
	for p, want := range map[config.Profile]gossip.Profile{
		config.ProfileLAN:        gossip.LAN,
		config.ProfileVM:         gossip.VM,
		config.ProfileStorageLAN: gossip.Fast,
	} {
		if got := nodeProfile(p).Profile; got != want {
			t.Errorf("profile %q runs the %v failure detector, want %v", p, got, want)
		}
	}
	if vm, lan := nodeProfile(config.ProfileVM), nodeProfile(config.ProfileLAN); vm.Tick != lan.Tick || vm.PrepareTimeout != lan.PrepareTimeout {
		t.Errorf("vm profile's agreement timings %v × %d, want lan's %v × %d", vm.Tick, vm.PrepareTimeout, lan.Tick, lan.PrepareTimeout)
	}
}
