//go:build !linux

package wake

import "errors"

// pollFD exists only on Linux (eventfd); elsewhere every Waiter uses a
// channel.
type pollFD struct{}

func newPollFD() (*pollFD, error) { return nil, errors.New("no eventfd on this system") }

func (p *pollFD) signal() {}

func (p *pollFD) wait(func(uintptr) bool) {}
