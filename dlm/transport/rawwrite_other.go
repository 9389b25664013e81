//go:build !unix

package transport

// initRaw does nothing where direct non-blocking writes are not available.
func (c *conn) initRaw() {}

// tryWrite writes nothing, leaving every write to the flusher goroutine.
func (c *conn) tryWrite(b []byte) (int, error) { return 0, nil }
