package wake

import (
	"testing"
	"time"
)

// TestNewPollFD makes and checks many eventfds: the pollability check in
// newPollFD must never miss the event it signals itself.
func TestNewPollFD(t *testing.T) {
	deadline := time.AfterFunc(60*time.Second, func() { panic("newPollFD hung") })
	defer deadline.Stop()
	for range 2000 {
		p, err := newPollFD()
		if err != nil {
			t.Fatal(err)
		}
		p.f.Close()
	}
}
