// Package transport carries the distributed lock manager's messages between
// storage nodes.
//
// Each pair of nodes shares one TCP connection, dialled by the node with the
// lower ID and authenticated both ways with the cluster key. Messages travel
// as length-prefixed binary frames (see frame.go and docs/transport.md) with
// a per-peer sequence number and a cumulative acknowledgement, so a message
// queued with Send is delivered to the peer's Handler exactly once and in
// order, even across reconnects, until either node restarts (a restart is a
// new incarnation and starts new streams). Every data frame carries the
// sender's generation for its lockspace, and frames older than the
// receiver's current generation are dropped, never delivered.
//
// The package is standalone (it does not import the dlm package): node and
// lockspace IDs are plain integers and payloads are opaque bytes.
//
// Latency is the main design constraint: a lock request is one frame each
// way. Send writes from the caller's goroutine when the connection is idle,
// with a non-blocking write, so the common case costs one system call and
// no goroutine switch; only when a write is already in progress (or the
// socket is full) does the frame go to the connection's flusher, which
// coalesces everything queued into one write.
package transport
