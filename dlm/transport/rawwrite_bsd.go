//go:build unix && !linux

package transport

import "syscall"

// sysWrite is write(2) through the syscall package off Linux.
func sysWrite(fd uintptr, b []byte) (int, syscall.Errno) {
	n, err := syscall.Write(int(fd), b)
	if err != nil {
		if e, ok := err.(syscall.Errno); ok {
			return n, e
		}
		return n, syscall.EIO
	}
	return n, 0
}
