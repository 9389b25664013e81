//go:build !linux

package transport

import "errors"

// idlePoller exists on Linux only; elsewhere the watcher reads every
// connection and waiting callers are woken by it.
type idlePoller struct{}

func newIdlePoller(*conn) (*idlePoller, error) {
	return nil, errors.New("no idle poller on this platform")
}

func (*idlePoller) arm(*conn) error     { return nil }
func (*idlePoller) disarm(*conn) error  { return nil }
func (*idlePoller) wait() (bool, error) { return false, errors.New("no idle poller") }
func (*idlePoller) wake()               {}
func (*idlePoller) close()              {}
