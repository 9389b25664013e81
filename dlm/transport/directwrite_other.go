//go:build !unix

package transport

// initDirect does nothing where non-blocking direct writes are not
// available: the writer goroutine writes everything.
func (c *conn) initDirect() {}

// tryWrite writes nothing.
func (c *conn) tryWrite(b []byte) (int, error) { return 0, nil }
