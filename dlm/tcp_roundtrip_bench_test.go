package dlm_test

import (
	"io"
	"net"
	"testing"
)

// BenchmarkTCPRoundTrip is the physical floor for a remote lock request: a
// ping-pong of one 64-byte frame over a plain loopback TCP connection with
// TCP_NODELAY, one goroutine on each end doing io.ReadFull then Write, with
// both ends in this process or the echo end in a child process. Run it
// together with the lock and transport benchmarks so they are compared on
// the same machine in the same state.
func BenchmarkTCPRoundTrip(b *testing.B) {
	b.Run("in-process", tcpRoundTripInProcess)
	b.Run("two-processes", tcpRoundTripTwoProcesses)
}

func tcpRoundTripInProcess(b *testing.B) {
	c, wait := startEcho(b)
	pingPong(b, c)
	c.Close()
	if err := wait(); err != nil {
		b.Fatal(err)
	}
}

// startEcho starts a loopback TCP echo server in this process (one
// goroutine doing io.ReadFull then Write of 64-byte frames) and returns a
// connection to it with TCP_NODELAY, and a function that waits for the
// server to finish once the connection is closed.
func startEcho(b *testing.B) (net.Conn, func() error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	echoed := make(chan error, 1)
	go func() {
		// The listener closes only once the connection is accepted: closing
		// it earlier would reset a connection still in its accept queue.
		c, err := ln.Accept()
		ln.Close()
		if err != nil {
			echoed <- err
			return
		}
		defer c.Close()
		c.(*net.TCPConn).SetNoDelay(true)
		buf := make([]byte, 64)
		for {
			if _, err := io.ReadFull(c, buf); err != nil {
				echoed <- nil // the client hung up: done
				return
			}
			if _, err := c.Write(buf); err != nil {
				echoed <- err
				return
			}
		}
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		ln.Close() // ends the accepting goroutine
		b.Fatal(err)
	}
	c.(*net.TCPConn).SetNoDelay(true)
	return c, func() error { return <-echoed }
}

// pingPong measures round trips of a 64-byte frame on c, whose other end
// echoes it.
func pingPong(b *testing.B, c net.Conn) {
	c.(*net.TCPConn).SetNoDelay(true)
	buf := make([]byte, 64)
	ping := func() {
		if _, err := c.Write(buf); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
	for range 100 {
		ping()
	}
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		ping()
	}
	b.StopTimer()
}
