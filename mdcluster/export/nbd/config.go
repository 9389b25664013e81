package nbd

import (
	"fmt"
	"log/slog"
	"math/bits"
	"time"
	"unicode/utf8"
)

// Export is one named block device the server offers.
type Export struct {
	// Name is what clients ask for (the path of an nbd:// URI without its
	// leading slash). At most 4096 bytes of UTF-8, as the protocol allows.
	Name string
	// Description is free text shown by clients that ask for it
	// (NBD_INFO_DESCRIPTION, e.g. nbdinfo); optional.
	Description string
	// Backend serves the export's I/O; required.
	Backend Backend
	// ReadOnly serves the export read-only even if the backend is
	// writable, e.g. to let a second node inspect an array it must not
	// write.
	ReadOnly bool
}

// Config configures a Server. Start from DefaultConfig and add Exports;
// zero limits and durations are replaced by the defaults, so a Config
// literal with only Exports set also works.
//
// Everything a client can make the server hold (connections, requests and
// buffered bytes in flight, option data, log lines) is bounded here; the
// matching counters are in Stats. The worst-case payload memory of the
// server is MaxConnections × MaxInFlightBytes.
type Config struct {
	// Exports are the devices served. Names must be distinct.
	Exports []Export
	// DefaultExport is the name of the export a client gets when it asks
	// for the empty name (nbd+unix:///?socket=…, or the kernel client's
	// default). Empty means: the export named "" if there is one, else
	// the only export if there is exactly one, else none.
	DefaultExport string
	// Logger receives connection events and protocol errors; nil means
	// slog.Default(). Protocol errors are rate-limited (LogInterval).
	Logger *slog.Logger

	// MaxConnections bounds the connections served at once, negotiating or
	// transmitting. Further connections are accepted and closed at once
	// (Stats.ConnectionsRefused), so a client sees a clean EOF rather than
	// a hang in the listen backlog.
	MaxConnections int
	// MaxInFlight bounds the requests one connection may have in flight
	// (read from the socket, not yet answered). When it is reached the
	// server stops reading that connection until a reply goes out, so the
	// client's own sends block. 128 matches the kernel client's queue
	// depth per connection.
	MaxInFlight int
	// MaxInFlightBytes bounds the payload bytes (write data received and
	// read data being produced) one connection holds in memory at once,
	// the same way. It is raised to MaxPayload if smaller, so one maximal
	// request always fits.
	MaxInFlightBytes int
	// MaxPayload is the largest read or write accepted, announced as the
	// maximum block size (a backend may announce less). A larger read gets
	// EINVAL; a larger write gets EINVAL after its data is read and
	// dropped if it is at most 32 MiB (the protocol asks servers not to
	// treat such sizes as abuse), and closes the connection otherwise.
	// Trims and zeroing carry no data and may be larger.
	MaxPayload int
	// SocketBuffer is the kernel send and receive buffer size asked for
	// on each connection's socket (SO_SNDBUF, SO_RCVBUF; the kernel caps
	// it at net.core.wmem_max and rmem_max). Larger buffers let a large
	// read reply or write request cross in fewer wake-ups of each side.
	// Kernel memory per connection is at most about twice this. Negative
	// leaves the system's defaults.
	SocketBuffer int
	// MaxOptions bounds the options one client may send before it enters
	// transmission; a client still haggling after that many is dropped.
	MaxOptions int
	// MaxOptionLength bounds one option's data. Longer data is read and
	// dropped and the option refused with NBD_REP_ERR_TOO_BIG; the longest
	// valid option (GO with a 4096-byte name) fits the default easily.
	MaxOptionLength int

	// HandshakeTimeout bounds the whole negotiation, from accept to the
	// start of transmission, so a silent client cannot hold a connection
	// slot before it has even chosen an export.
	HandshakeTimeout time.Duration
	// RequestTimeout bounds the time from the first byte of a request to
	// its last (header and write data), so a client cannot hold buffers by
	// sending half a request. The deadline is renewed lazily: a request
	// gets at least three quarters of RequestTimeout.
	RequestTimeout time.Duration
	// IdleTimeout closes a transmitting connection that sends no request
	// for this long while nothing is in flight. Zero (the default) never
	// does: the kernel client legitimately idles for days.
	IdleTimeout time.Duration
	// WriteTimeout bounds writing one reply; a client that stops reading
	// its replies is disconnected rather than allowed to pin its requests'
	// buffers. Like RequestTimeout it is renewed lazily, so a reply gets at
	// least three quarters of it.
	WriteTimeout time.Duration
	// ShutdownTimeout bounds how long Close waits for requests in flight
	// to finish before it closes the remaining connections regardless.
	ShutdownTimeout time.Duration
	// LogInterval is the average interval between protocol-error log lines
	// (a burst of a few is allowed); the lines dropped in between are
	// counted in Stats.LogsSuppressed and in the next line that is logged.
	LogInterval time.Duration
}

// DefaultConfig returns a Config with every limit and timeout set to its
// default; the caller adds Exports.
func DefaultConfig() Config {
	return Config{
		MaxConnections:   16,
		MaxInFlight:      128,
		MaxInFlightBytes: 64 << 20,
		MaxPayload:       defaultMaxBody,
		SocketBuffer:     2 << 20,
		MaxOptions:       32,
		MaxOptionLength:  16 << 10,
		HandshakeTimeout: 10 * time.Second,
		RequestTimeout:   30 * time.Second,
		WriteTimeout:     30 * time.Second,
		ShutdownTimeout:  10 * time.Second,
		LogInterval:      time.Second,
	}
}

// withDefaults fills zero fields from DefaultConfig and checks the exports.
func (c Config) withDefaults() (Config, error) {
	d := DefaultConfig()
	if c.MaxConnections <= 0 {
		c.MaxConnections = d.MaxConnections
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = d.MaxInFlight
	}
	if c.MaxPayload <= 0 {
		c.MaxPayload = d.MaxPayload
	}
	if c.MaxPayload > 1<<31 {
		return c, fmt.Errorf("nbd config: MaxPayload %d is over the protocol's 32-bit length", c.MaxPayload)
	}
	if c.MaxInFlightBytes <= 0 {
		c.MaxInFlightBytes = d.MaxInFlightBytes
	}
	c.MaxInFlightBytes = max(c.MaxInFlightBytes, c.MaxPayload)
	if c.SocketBuffer == 0 {
		c.SocketBuffer = d.SocketBuffer
	}
	if c.MaxOptions <= 0 {
		c.MaxOptions = d.MaxOptions
	}
	if c.MaxOptionLength <= 0 {
		c.MaxOptionLength = d.MaxOptionLength
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = d.HandshakeTimeout
	}
	if c.RequestTimeout <= 0 {
		c.RequestTimeout = d.RequestTimeout
	}
	if c.WriteTimeout <= 0 {
		c.WriteTimeout = d.WriteTimeout
	}
	if c.ShutdownTimeout <= 0 {
		c.ShutdownTimeout = d.ShutdownTimeout
	}
	if c.LogInterval <= 0 {
		c.LogInterval = d.LogInterval
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if len(c.Exports) == 0 {
		return c, fmt.Errorf("nbd config: no exports")
	}
	seen := map[string]bool{}
	for _, e := range c.Exports {
		if seen[e.Name] {
			return c, fmt.Errorf("nbd config: export %q listed twice", e.Name)
		}
		seen[e.Name] = true
		if len(e.Name) > maxStringLen || !utf8.ValidString(e.Name) {
			return c, fmt.Errorf("nbd config: export name %.40q… is not a valid NBD string (UTF-8, at most %d bytes)", e.Name, maxStringLen)
		}
		if len(e.Description) > maxStringLen || !utf8.ValidString(e.Description) {
			return c, fmt.Errorf("nbd config: export %q: description is not a valid NBD string (UTF-8, at most %d bytes)", e.Name, maxStringLen)
		}
		if e.Backend == nil {
			return c, fmt.Errorf("nbd config: export %q has no backend", e.Name)
		}
		if e.Backend.Size() < 0 {
			return c, fmt.Errorf("nbd config: export %q: backend size %d is negative", e.Name, e.Backend.Size())
		}
		if err := checkBlockSizes(e.Backend.Capabilities()); err != nil {
			return c, fmt.Errorf("nbd config: export %q: %w", e.Name, err)
		}
	}
	if c.DefaultExport != "" && !seen[c.DefaultExport] {
		return c, fmt.Errorf("nbd config: default export %q is not among the exports", c.DefaultExport)
	}
	return c, nil
}

// checkBlockSizes checks a backend's block size constraints against what the
// protocol allows to be announced.
func checkBlockSizes(c Capabilities) error {
	pow2 := func(v uint32) bool { return bits.OnesCount32(v) == 1 }
	if c.MinBlockSize != 0 && (!pow2(c.MinBlockSize) || c.MinBlockSize > 64<<10) {
		return fmt.Errorf("minimum block size %d is not a power of two up to 64 KiB", c.MinBlockSize)
	}
	if c.PreferredBlockSize != 0 && (!pow2(c.PreferredBlockSize) || c.PreferredBlockSize < c.MinBlockSize) {
		return fmt.Errorf("preferred block size %d is not a power of two at least the minimum %d", c.PreferredBlockSize, c.MinBlockSize)
	}
	if c.MaxPayload != 0 && c.MaxPayload < max(c.MinBlockSize, c.PreferredBlockSize) {
		return fmt.Errorf("maximum payload %d is below the preferred block size", c.MaxPayload)
	}
	return nil
}
