package broadcast

import (
	"errors"
	"fmt"

	"github.com/mdcluster/mdcluster/dlm"
)

// Errors a receiver's answer can carry, matched by a *RemoteError with
// errors.Is, and errors of the broadcaster's own calls.
var (
	// ErrReceiverFailed: the receiver's handler returned an error.
	ErrReceiverFailed = errors.New("broadcast: receiver failed")
	// ErrUnknownType: the receiver does not know the message type (a
	// newer node sent it). A Receiver may return it (wrapped) for types it
	// does not handle.
	ErrUnknownType = errors.New("broadcast: unknown message type")
	// ErrReceiveTimeout: the receiver's handler did not finish within its
	// ReceiveTimeout.
	ErrReceiveTimeout = errors.New("broadcast: receive timed out")
	// ErrStale: the receiver had already seen a newer broadcast.
	ErrStale = errors.New("broadcast: stale broadcast")

	// ErrNotJoined: this node has not joined the array (or lost its
	// locks): it can neither send nor leave.
	ErrNotJoined = errors.New("broadcast: not joined")
	// ErrInHandler: Send, Begin, Join or Leave was called from inside a
	// Receiver's handler (with the context it was given). The broadcast
	// being handled holds the token until this node answers, so waiting
	// for the token there could never end; send from elsewhere once the
	// handler has returned.
	ErrInHandler = errors.New("broadcast: called from inside a receive handler")
	// ErrNoAnswer: some receivers did not answer within the sender's bound
	// (Result.Unanswered names them).
	ErrNoAnswer = errors.New("broadcast: receivers did not answer")
	// ErrTxnDone: the transaction was ended, or aborted by a failed send.
	ErrTxnDone = errors.New("broadcast: transaction is over")
)

// RemoteError is a receiver's error, as its reply carried it back to the
// sender.
type RemoteError struct {
	Node   dlm.NodeID
	Seq    uint64
	Status Status
	// Text is the receiver's error text, cut to MaxReplyText bytes.
	Text string
}

func (e *RemoteError) Error() string {
	if e.Text == "" {
		return fmt.Sprintf("node %d: broadcast %d: %s", e.Node, e.Seq, e.Status)
	}
	return fmt.Sprintf("node %d: broadcast %d: %s: %s", e.Node, e.Seq, e.Status, e.Text)
}

// Is matches the sentinel error of the reply's status.
func (e *RemoteError) Is(target error) bool {
	switch target {
	case ErrUnknownType:
		return e.Status == StatusUnknownType
	case ErrReceiveTimeout:
		return e.Status == StatusTimeout
	case ErrMalformed:
		return e.Status == StatusMalformed
	case ErrStale:
		return e.Status == StatusStale
	case ErrReceiverFailed:
		return e.Status == StatusFailed || e.Status > StatusStale
	}
	return false
}
