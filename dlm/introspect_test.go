package dlm

import (
	"context"
	"testing"
	"time"
)

func TestIntrospection(t *testing.T) {
	n, err := NewNode(DefaultConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	if _, ok := n.TransportStats(); ok {
		t.Error("a cluster of one reports transport stats")
	}
	if _, ok := n.PeerStatus(2); ok {
		t.Error("a cluster of one reports a peer")
	}
	if got := n.Lockspaces(); len(got) != 0 {
		t.Errorf("lockspaces before any Open: %v", got)
	}
	if _, ok := n.DumpLockspace("md0"); ok {
		t.Error("dump of a lockspace never opened")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, name := range []string{"md1", "md0"} {
		ls, err := n.Open(name, OpenOptions{LVBLen: 64})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ls.Lock(ctx, "bitmap0001", EX, 0); err != nil {
			t.Fatal(err)
		}
	}
	if got := n.Lockspaces(); len(got) != 2 || got[0] != "md0" || got[1] != "md1" {
		t.Errorf("lockspaces %v", got)
	}
	dump, ok := n.DumpLockspace("md0")
	if !ok || len(dump) != 1 || dump[0].Name != "bitmap0001" || len(dump[0].Granted) != 1 || dump[0].Granted[0].Granted != EX {
		t.Errorf("dump %+v %v", dump, ok)
	}
}
