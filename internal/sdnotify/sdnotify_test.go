package sdnotify

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fakeSystemd listens like systemd's notify socket and returns it.
func fakeSystemd(t *testing.T, name string) *net.UnixConn {
	t.Helper()
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func receive(t *testing.T, conn *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	if err := conn.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	n, err := conn.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	return string(buf[:n])
}

func TestNotifyPath(t *testing.T) {
	path := filepath.Join(t.TempDir(), "notify")
	conn := fakeSystemd(t, path)
	t.Setenv(EnvSocket, path)
	sent, err := Notify(Ready, Status("quorate, view 3"))
	if err != nil || !sent {
		t.Fatalf("%v %v", sent, err)
	}
	if got := receive(t, conn); got != "READY=1\nSTATUS=quorate, view 3\n" {
		t.Errorf("datagram %q", got)
	}
	if _, err := Notify(Stopping); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, conn); got != "STOPPING=1\n" {
		t.Errorf("datagram %q", got)
	}
}

func TestNotifyAbstract(t *testing.T) {
	name := "mdcluster-sdnotify-test-" + strings.ReplaceAll(t.Name(), "/", "-") + time.Now().Format("150405.000000000")
	conn := fakeSystemd(t, "\x00"+name)
	if _, err := NotifySocket("@"+name, Ready); err != nil {
		t.Fatal(err)
	}
	if got := receive(t, conn); got != "READY=1\n" {
		t.Errorf("datagram %q", got)
	}
}

func TestNotifyWithoutSystemd(t *testing.T) {
	t.Setenv(EnvSocket, "")
	if sent, err := Notify(Ready); sent || err != nil {
		t.Errorf("%v %v", sent, err)
	}
	if _, err := NotifySocket("relative/path", Ready); err == nil {
		t.Error("relative socket path accepted")
	}
	if _, err := NotifySocket("/nonexistent/notify", Ready); err == nil || !strings.Contains(err.Error(), "/nonexistent/notify") {
		t.Errorf("missing socket: %v", err)
	}
	if _, err := NotifySocket("/x", "READY=1\nX"); err == nil {
		t.Error("a multi-line state accepted")
	}
}
