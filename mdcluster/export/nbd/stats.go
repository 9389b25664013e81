package nbd

import "sync/atomic"

// Stats is a snapshot of a Server's counters. Counters only grow; the
// fields marked "gauge" are current values. Every limit in Config has a
// counter here that shows when it was hit.
type Stats struct {
	// ConnectionsAccepted counts connections taken on (within
	// MaxConnections).
	ConnectionsAccepted uint64
	// ConnectionsRefused counts connections closed at once because
	// MaxConnections were already being served, or the server was closing.
	ConnectionsRefused uint64
	// ConnectionsActive is a gauge: connections being served now.
	ConnectionsActive int64
	// Handshakes counts negotiations that reached transmission.
	Handshakes uint64
	// HandshakeFailures counts connections dropped during negotiation for
	// a protocol violation, a timeout, too many options or an unknown
	// export (NBD_OPT_EXPORT_NAME cannot be refused any other way). Clients
	// that end with NBD_OPT_ABORT or simply hang up are not failures.
	HandshakeFailures uint64
	// Timeouts counts connections dropped by HandshakeTimeout,
	// RequestTimeout, IdleTimeout or WriteTimeout.
	Timeouts uint64
	// OptionsRefused counts options answered with an error reply (unknown
	// or unsupported options, unknown exports, malformed data, too long).
	OptionsRefused uint64

	// Requests counts transmission requests received, by command; the
	// total includes those answered with an error.
	Reads, Writes, Flushes, Trims, WriteZeroes, Disconnects uint64
	// OtherRequests counts requests with commands the server does not
	// implement or did not advertise (answered EINVAL).
	OtherRequests uint64
	// StreamedWrites counts writes handed to the backend in pieces as
	// their data arrived: writes of at least 512 KiB that were alone in
	// flight on their connection, whose transfer then overlaps the
	// backend's work instead of preceding it.
	StreamedWrites uint64
	// BytesRead and BytesWritten count payload bytes of successful reads
	// and writes.
	BytesRead, BytesWritten uint64
	// ErrorReplies counts requests answered with a non-zero error.
	ErrorReplies uint64
	// OversizedRequests counts reads and writes over the maximum payload;
	// they are counted in ErrorReplies too unless the connection was
	// dropped.
	OversizedRequests uint64
	// ProtocolErrors counts connections dropped for breaking the protocol
	// in a way no error reply can answer (bad magic, unreadable stream,
	// an oversized write).
	ProtocolErrors uint64
	// InFlight and InFlightBytes are gauges: requests and payload bytes
	// held by all connections now.
	InFlight, InFlightBytes int64
	// InFlightWaits counts times a connection stopped reading because it
	// had MaxInFlight requests or MaxInFlightBytes in flight.
	InFlightWaits uint64
	// BackendErrors counts backend calls that failed.
	BackendErrors uint64
	// LogsSuppressed counts log lines dropped by the LogInterval limit.
	LogsSuppressed uint64
}

// counters are the live counters behind Stats.
type counters struct {
	accepted, refused                            atomic.Uint64
	active                                       atomic.Int64
	handshakes, handshakeFailures, timeouts      atomic.Uint64
	optionsRefused                               atomic.Uint64
	reads, writes, flushes, trims, zeroes, discs atomic.Uint64
	other, streamed                              atomic.Uint64
	bytesRead, bytesWritten                      atomic.Uint64
	errorReplies, oversized, protocolErrors      atomic.Uint64
	inFlight, inFlightBytes                      atomic.Int64
	inFlightWaits, backendErrors                 atomic.Uint64
	logsSuppressed                               atomic.Uint64
}

func (c *counters) snapshot() Stats {
	return Stats{
		ConnectionsAccepted: c.accepted.Load(),
		ConnectionsRefused:  c.refused.Load(),
		ConnectionsActive:   c.active.Load(),
		Handshakes:          c.handshakes.Load(),
		HandshakeFailures:   c.handshakeFailures.Load(),
		Timeouts:            c.timeouts.Load(),
		OptionsRefused:      c.optionsRefused.Load(),
		Reads:               c.reads.Load(),
		Writes:              c.writes.Load(),
		Flushes:             c.flushes.Load(),
		Trims:               c.trims.Load(),
		WriteZeroes:         c.zeroes.Load(),
		Disconnects:         c.discs.Load(),
		OtherRequests:       c.other.Load(),
		StreamedWrites:      c.streamed.Load(),
		BytesRead:           c.bytesRead.Load(),
		BytesWritten:        c.bytesWritten.Load(),
		ErrorReplies:        c.errorReplies.Load(),
		OversizedRequests:   c.oversized.Load(),
		ProtocolErrors:      c.protocolErrors.Load(),
		InFlight:            c.inFlight.Load(),
		InFlightBytes:       c.inFlightBytes.Load(),
		InFlightWaits:       c.inFlightWaits.Load(),
		BackendErrors:       c.backendErrors.Load(),
		LogsSuppressed:      c.logsSuppressed.Load(),
	}
}
