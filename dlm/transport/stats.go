package transport

import "sync/atomic"

// Stats counts what a Transport did since it was created. The counters only
// grow; tests and metrics compare snapshots.
type Stats struct {
	// FramesSent counts data frames written for the first time.
	FramesSent uint64
	// FramesResent counts data frames written again on a new connection
	// because the previous one died before they were acknowledged.
	FramesResent uint64
	// AcksSent counts standalone ack frames (acks riding on data frames are
	// free and not counted).
	AcksSent uint64
	// Writes counts write calls on connections; FramesSent+FramesResent+
	// AcksSent divided by Writes is the coalescing factor.
	Writes uint64
	// FramesReceived counts data frames accepted in sequence (delivered or
	// dropped for their generation), not counting duplicates.
	FramesReceived uint64
	// FramesDelivered counts handler calls.
	FramesDelivered uint64
	// KeptOnRestart counts unacknowledged frames of a lockspace's current
	// generation kept for a peer's new incarnation instead of dropped
	// (Config.KeepCurrentGeneration).
	KeptOnRestart uint64
	// Dropped counts frames not delivered or not sent, by reason.
	Dropped DropStats
	// ConnectionsEstablished counts authenticated connections.
	ConnectionsEstablished uint64
	// ConnectionsLost counts authenticated connections that ended for any
	// reason other than Close.
	ConnectionsLost uint64
	// HandshakeFailures counts connections that did not authenticate, for
	// any reason (including AuthFailures and UnknownNodes).
	HandshakeFailures uint64
	// AuthFailures counts handshakes whose MAC did not verify (wrong key).
	AuthFailures uint64
	// UnknownNodes counts handshakes from or to a node ID not in the peer
	// set (or not the node expected at that address).
	UnknownNodes uint64
	// MalformedFrames counts connections closed because a frame did not
	// decode.
	MalformedFrames uint64
	// HandshakesRefused counts accepted connections closed at once
	// because Config.MaxHandshakes connections were already in their
	// handshake.
	HandshakesRefused uint64
	// ReconnectsPaced counts inbound connections from a peer refused
	// because its previous connection died young (a peer that keeps
	// breaking the protocol and dialling again): the acceptor's side of the
	// back-off, see docs/transport.md. Also counted in HandshakeFailures.
	ReconnectsPaced uint64
	// RecordsRejected counts connections reset because a sealed record did
	// not open (modified, injected, replayed, reordered or from another
	// connection); nothing in such a record is used.
	RecordsRejected uint64
	// ProtocolErrors counts connections closed because a well-formed frame
	// broke the protocol (sequence gap, impossible ack, frame type out of
	// place).
	ProtocolErrors uint64
}

// DropStats counts dropped frames by reason.
type DropStats struct {
	// Duplicate: a data frame whose sequence number was already received
	// (resent after a reconnect); discarded without delivery.
	Duplicate uint64
	// StaleGeneration: a data frame whose generation is older than the
	// lockspace's current generation; acknowledged but never delivered.
	StaleGeneration uint64
	// PeerRestarted: queued or unacknowledged outgoing frames discarded
	// because the peer came back with a new incarnation (or forgot us), so
	// the stream they belonged to no longer exists.
	PeerRestarted uint64
	// PeerRemoved: queued outgoing frames discarded because the peer was
	// removed from the peer set or the transport was closed.
	PeerRemoved uint64
	// QueueFull: frames Send refused (ErrQueueFull) because their peer's
	// address is unknown and its queue reached Config.MaxUnaddressedQueue.
	QueueFull uint64
	// Backlog: frames Send refused (ErrQueueFull) because Config.
	// MaxUnackedBytes were already queued and unacknowledged for their
	// peer.
	Backlog uint64
}

// counters is the live, atomically updated form of Stats.
type counters struct {
	framesSent, framesResent, acksSent, writes           atomic.Uint64
	framesReceived                                       atomic.Uint64
	dropDuplicate, dropStale, dropRestarted, dropRemove  atomic.Uint64
	dropQueueFull, dropBacklog, hsRefused, keptRestarted atomic.Uint64
	paced                                                atomic.Uint64
	connEstablished, connLost                            atomic.Uint64
	handshakeFail, authFail, unknownNode                 atomic.Uint64
	malformed, protocolErr, rejected                     atomic.Uint64
}

func (c *counters) snapshot() Stats {
	return Stats{
		FramesSent:      c.framesSent.Load(),
		FramesResent:    c.framesResent.Load(),
		AcksSent:        c.acksSent.Load(),
		Writes:          c.writes.Load(),
		FramesReceived:  c.framesReceived.Load(),
		FramesDelivered: c.framesReceived.Load() - c.dropStale.Load(), // every other received frame is delivered
		KeptOnRestart:   c.keptRestarted.Load(),
		Dropped: DropStats{
			Duplicate:       c.dropDuplicate.Load(),
			StaleGeneration: c.dropStale.Load(),
			PeerRestarted:   c.dropRestarted.Load(),
			PeerRemoved:     c.dropRemove.Load(),
			QueueFull:       c.dropQueueFull.Load(),
			Backlog:         c.dropBacklog.Load(),
		},
		ConnectionsEstablished: c.connEstablished.Load(),
		ConnectionsLost:        c.connLost.Load(),
		HandshakeFailures:      c.handshakeFail.Load(),
		AuthFailures:           c.authFail.Load(),
		UnknownNodes:           c.unknownNode.Load(),
		MalformedFrames:        c.malformed.Load(),
		ProtocolErrors:         c.protocolErr.Load(),
		RecordsRejected:        c.rejected.Load(),
		HandshakesRefused:      c.hsRefused.Load(),
		ReconnectsPaced:        c.paced.Load(),
	}
}
