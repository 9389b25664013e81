//go:build linux

package lease

import (
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Linux watchdog ioctls (include/uapi/linux/watchdog.h).
const (
	wdiocKeepalive  = 0x80045705
	wdiocSetTimeout = 0xc0045706
)

// DevWatchdog is the Linux watchdog device. Opening it arms it.
type DevWatchdog struct{ f *os.File }

// OpenWatchdog opens (and so arms) the watchdog device at path and sets
// its timeout (whole seconds, rounded up; the driver may round again,
// and the value it accepted is returned). It fails if the device does not
// exist: load softdog (modprobe softdog) or configure a hardware one.
// Only one process may hold the device.
func OpenWatchdog(path string, timeout time.Duration) (*DevWatchdog, time.Duration, error) {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return nil, 0, fmt.Errorf("watchdog: %w", err)
	}
	secs := int32((timeout + time.Second - 1) / time.Second)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), wdiocSetTimeout, uintptr(unsafe.Pointer(&secs))); e != 0 {
		w := &DevWatchdog{f: f}
		w.Close()
		return nil, 0, fmt.Errorf("watchdog %s: set timeout %ds: %w", path, secs, e)
	}
	return &DevWatchdog{f: f}, time.Duration(secs) * time.Second, nil
}

// Ping implements Watchdog.
func (w *DevWatchdog) Ping() error {
	var dummy int32
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, w.f.Fd(), wdiocKeepalive, uintptr(unsafe.Pointer(&dummy))); e != 0 {
		if _, err := w.f.Write([]byte{0}); err != nil {
			return fmt.Errorf("watchdog ping: %w", err)
		}
	}
	return nil
}

// Close implements Watchdog: the magic close character 'V' disarms a
// driver with WDIOF_MAGICCLOSE (unless nowayout is set, when the node
// will be reset).
func (w *DevWatchdog) Close() error {
	_, werr := w.f.Write([]byte{'V'})
	if err := w.f.Close(); err != nil {
		return err
	}
	return werr
}
