package lease

import "time"

// Watchdog resets the node unless pinged often enough. The Linux
// /dev/watchdog device (softdog in the VMs) is OpenWatchdog; tests use a
// fake.
type Watchdog interface {
	// Ping restarts the countdown.
	Ping() error
	// Close disarms it (magic close) and releases it.
	Close() error
}

// DefaultWatchdogPath is the kernel's watchdog device.
const DefaultWatchdogPath = "/dev/watchdog"

// WatchdogTimeoutOK checks the lease arithmetic for a watchdog: a node
// whose reads hang stops pinging at most one lease plus half a renewal
// interval after its last read, and the watchdog fires timeout later; the
// fencing node must still be waiting then, so the margin must be at least
// the watchdog timeout plus the renewal interval.
func WatchdogTimeoutOK(margin, renewEvery, timeout time.Duration) bool {
	return margin >= timeout+renewEvery
}
