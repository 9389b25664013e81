//go:build !linux

package transport

import "io"

// newRawReader: off Linux the connection is read through net.Conn.
func newRawReader(c *conn) io.Reader { return c.nc }
