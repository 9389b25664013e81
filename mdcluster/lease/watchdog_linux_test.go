//go:build linux

package lease

import (
	"testing"
	"time"
)

// The real device is never opened by tests: opening arms it, and a test
// that failed to close it would reset the machine. Only the absent case.
func TestOpenWatchdogAbsent(t *testing.T) {
	if _, _, err := OpenWatchdog("/nonexistent/watchdog", 10*time.Second); err == nil {
		t.Fatal("opened a watchdog that does not exist")
	}
	if !WatchdogTimeoutOK(20*time.Second, 5*time.Second, 10*time.Second) || WatchdogTimeoutOK(10*time.Second, 5*time.Second, 10*time.Second) {
		t.Fatal("WatchdogTimeoutOK")
	}
}
