// Package sdnotify tells systemd about a service's state (sd_notify(3)):
// one datagram to the unix socket named by $NOTIFY_SOCKET, as a
// Type=notify unit expects. It is written here rather than imported
// because the protocol is one sendto and the daemon needs nothing else
// of libsystemd.
package sdnotify

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
)

// States the daemon sends (see sd_notify(3)).
const (
	// Ready: start-up is finished; systemd considers the unit started.
	Ready = "READY=1"
	// Stopping: the service is shutting down.
	Stopping = "STOPPING=1"
)

// Status formats a free-form status line that systemctl status shows.
func Status(s string) string { return "STATUS=" + strings.ReplaceAll(s, "\n", " ") }

// EnvSocket is the variable systemd sets for Type=notify services.
const EnvSocket = "NOTIFY_SOCKET"

// Notify sends the given assignments ("READY=1", ...) as one datagram to
// $NOTIFY_SOCKET. Without the variable (not started by systemd, or
// NotifyAccess=none) it does nothing and returns false. A path starting
// with '@' names an abstract socket.
func Notify(states ...string) (bool, error) {
	return NotifySocket(os.Getenv(EnvSocket), states...)
}

// NotifySocket is Notify with the socket given; an empty path does
// nothing and returns false.
func NotifySocket(path string, states ...string) (bool, error) {
	if path == "" {
		return false, nil
	}
	if len(states) == 0 {
		return false, errors.New("sdnotify: nothing to send")
	}
	for _, s := range states {
		if !strings.Contains(s, "=") || strings.Contains(s, "\n") {
			return false, fmt.Errorf("sdnotify: %q is not one VARIABLE=value line", s)
		}
	}
	name := path
	if name[0] == '@' {
		name = "\x00" + name[1:]
	} else if name[0] != '/' {
		return false, fmt.Errorf("sdnotify: $%s=%q is neither an absolute path nor an abstract socket (@name)", EnvSocket, path)
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return false, fmt.Errorf("sdnotify: connecting to %s: %w", path, err)
	}
	defer conn.Close()
	msg := strings.Join(states, "\n") + "\n"
	if _, err := conn.Write([]byte(msg)); err != nil {
		return false, fmt.Errorf("sdnotify: sending %q to %s: %w", strings.Join(states, ","), path, err)
	}
	return true, nil
}
