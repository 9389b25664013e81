package dlm

// RecoveryHandler receives one lockspace's recovery events, the way Linux
// md-cluster receives recover_prep, recover_slot and recover_done from the
// kernel DLM. The events of one lockspace are delivered in order on that
// lockspace's callback goroutine (the one that runs completions and blocking
// callbacks), so a handler sees them interleaved correctly with its locks'
// callbacks. A handler must not block for long: the lockspace's other
// callbacks wait behind it.
//
// For every view change the sequence is RecoverPrepare, then RecoverDeparted
// (only when some node departed), then RecoverDone. A later view change may
// begin before RecoverDone of the previous one; then RecoverPrepare comes
// again and RecoverDone is reported for the newer generation only.
type RecoveryHandler interface {
	// RecoverPrepare: the lockspace stopped for a membership change. From
	// now until RecoverDone, nothing a departed node held is granted to
	// anyone else.
	RecoverPrepare(gen uint64)
	// RecoverDeparted: these nodes failed (and were fenced) or left since
	// the previous view; their locks are purged in generation gen. The IDs
	// are sorted and never include this node.
	RecoverDeparted(gen uint64, nodes []NodeID)
	// RecoverDone: the lockspace finished recovering into generation gen
	// and grants locks again. members is the new view (sorted); self is this
	// node's ID (md-cluster's "our slot" is derived from it).
	RecoverDone(gen uint64, members []NodeID, self NodeID)
}
