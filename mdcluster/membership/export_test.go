package membership

// Test-only access for the external test package membership_test. Its
// cluster simulator drives every node through the real apply.Applier, which
// a test inside this package could not import (apply imports membership).
// It inspects a few internals for its checks and failure reports; nothing
// here changes the machine.

// Phase returns the coordinator phase: "idle", "preparing", "accepting" or
// "fencing".
func Phase(a *Agreement) string { return a.phase.String() }

// CoordinatorValue returns the value the coordinator is completing.
func CoordinatorValue(a *Agreement) Proposal { return cloneProposal(a.value) }

// Restarted reports whether this run still asks to be readmitted clean.
func Restarted(a *Agreement) bool { return a.restarted }

// Leaving reports whether a graceful leave is under way.
func Leaving(a *Agreement) bool { return a.leaving }

// Excluded reports whether this node knows of a newer view without it.
func Excluded(a *Agreement) bool { return a.excluded }

// SelfFenced returns the generation of a view this coordinator completed
// although it named this node as failed (0 if none).
func SelfFenced(a *Agreement) uint64 { return a.selfFenced }

// EncodeCommit encodes a COMMIT of value on base, as a coordinator sends it.
func EncodeCommit(gen, ballot uint64, value, base Proposal) []byte {
	return encodeMessage(message{Type: mCommit, Gen: gen, Ballot: ballot, Value: value, Base: base})
}

// EncodeAccept encodes an ACCEPT of value on base, as a coordinator sends it.
func EncodeAccept(gen, ballot uint64, value, base Proposal) []byte {
	return encodeMessage(message{Type: mAccept, Gen: gen, Ballot: ballot, Value: value, Base: base})
}

// EncodePrepare encodes a PREPARE of ballot for intended, as a coordinator
// whose installed view is gen sends it.
func EncodePrepare(gen, ballot uint64, intended []NodeID) []byte {
	return encodeMessage(message{Type: mPrepare, Gen: gen, Ballot: ballot, Intended: intended})
}

// MessageGen returns the sender's installed generation an encoded message
// carries.
func MessageGen(payload []byte) (uint64, error) {
	m, err := decodeMessage(payload)
	if err != nil {
		return 0, err
	}
	return m.Gen, nil
}

// MessageType returns the type of an encoded message ("COMMITTED", ...).
func MessageType(payload []byte) (string, error) {
	m, err := decodeMessage(payload)
	if err != nil {
		return "", err
	}
	return m.Type.String(), nil
}

// The small set helpers, on sorted NodeID slices.
var (
	Normalize    = normalize
	Intersect    = intersect
	Minus        = minus
	CloneInstall = cloneInstall
)
