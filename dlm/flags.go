package dlm

import (
	"strings"
)

// Flags are request flags. Values match Linux's DLM_LKF_* constants
// (include/uapi/linux/dlmconstants.h) so dumps and wire messages line up with
// the kernel DLM's. TIMEOUT and NODLCKBLK are not provided: the first is
// deprecated in Linux (use a context deadline instead), the second was never
// implemented there.
type Flags uint32

const (
	// NoQueue fails a request that cannot be granted at once with ErrAgain
	// instead of queueing it.
	NoQueue Flags = 0x1
	// Cancel (unlock only) cancels a pending request or conversion; a
	// converting lock returns to its granted mode.
	Cancel Flags = 0x2
	// Convert marks a request as a conversion of an existing lock.
	Convert Flags = 0x4
	// ValBlk reads or writes the lock value block by the LVB rules.
	ValBlk Flags = 0x8
	// QueCvt forces a conversion to queue behind earlier conversions even when
	// it is compatible with every granted lock. Up-conversions only.
	QueCvt Flags = 0x10
	// IVValBlk invalidates the resource's lock value block on a down-conversion
	// or unlock from PW or EX.
	IVValBlk Flags = 0x20
	// ConvDeadlk resolves a conversion deadlock involving this lock by
	// demoting its granted mode to NL (reported with Demoted).
	ConvDeadlk Flags = 0x40
	// Persistent keeps the lock when its owner goes away: it becomes an orphan
	// that a later request with Orphan can adopt.
	Persistent Flags = 0x80
	// NoDlckWt leaves a conversion deadlock in place and sends this lock a
	// blocking callback instead, so its owner can cancel or down-convert.
	NoDlckWt Flags = 0x100
	// Expedite grants a new NL request at once, ignoring queued requests.
	Expedite Flags = 0x400
	// NoQueueBast sends blocking callbacks to the holders before failing a
	// NoQueue request with ErrAgain.
	NoQueueBast Flags = 0x800
	// HeadQue queues the request at the head of the convert or wait queue.
	HeadQue Flags = 0x1000
	// NoOrder grants the request as soon as it is compatible with the granted
	// locks, disregarding queue order.
	NoOrder Flags = 0x2000
	// Orphan adopts an orphaned Persistent lock of the same name and mode.
	Orphan Flags = 0x4000
	// AltPR grants PR instead when the requested mode cannot be granted but PR
	// can (reported with AltMode).
	AltPR Flags = 0x8000
	// AltCW grants CW instead when the requested mode cannot be granted but CW
	// can (reported with AltMode).
	AltCW Flags = 0x10000
	// ForceUnlock (unlock only) releases the lock even while it is converting
	// or waiting.
	ForceUnlock Flags = 0x20000
)

var flagNames = []struct {
	f    Flags
	name string
}{
	{NoQueue, "NOQUEUE"}, {Cancel, "CANCEL"}, {Convert, "CONVERT"}, {ValBlk, "VALBLK"},
	{QueCvt, "QUECVT"}, {IVValBlk, "IVVALBLK"}, {ConvDeadlk, "CONVDEADLK"},
	{Persistent, "PERSISTENT"}, {NoDlckWt, "NODLCKWT"}, {Expedite, "EXPEDITE"},
	{NoQueueBast, "NOQUEUEBAST"}, {HeadQue, "HEADQUE"}, {NoOrder, "NOORDER"},
	{Orphan, "ORPHAN"}, {AltPR, "ALTPR"}, {AltCW, "ALTCW"}, {ForceUnlock, "FORCEUNLOCK"},
}

const (
	lockFlagsMask = NoQueue | Convert | ValBlk | QueCvt | IVValBlk | ConvDeadlk | Persistent |
		NoDlckWt | Expedite | NoQueueBast | HeadQue | NoOrder | Orphan | AltPR | AltCW
	unlockFlagsMask = Cancel | ValBlk | IVValBlk | ForceUnlock
)

// String lists the set flags by their Linux names, joined with "|".
func (f Flags) String() string {
	if f == 0 {
		return "0"
	}
	var b strings.Builder
	for _, fn := range flagNames {
		if f&fn.f != 0 {
			if b.Len() > 0 {
				b.WriteByte('|')
			}
			b.WriteString(fn.name)
			f &^= fn.f
		}
	}
	if f != 0 {
		if b.Len() > 0 {
			b.WriteByte('|')
		}
		b.WriteString("0x")
		b.WriteString(strconvHex(uint32(f)))
	}
	return b.String()
}

func strconvHex(v uint32) string {
	const digits = "0123456789abcdef"
	if v == 0 {
		return "0"
	}
	var buf [8]byte
	i := len(buf)
	for v > 0 {
		i--
		buf[i] = digits[v&0xf]
		v >>= 4
	}
	return string(buf[i:])
}

// StatusFlags are the sb_flags of Linux's lock status block: extra facts about
// a completed request.
type StatusFlags uint8

const (
	// Demoted: the granted mode was demoted to NL to break a conversion
	// deadlock (ConvDeadlk).
	Demoted StatusFlags = 0x01
	// ValNotValid: the resource's lock value block is invalid (its last PW/EX
	// holder invalidated it or died); the value returned is not to be trusted.
	ValNotValid StatusFlags = 0x02
	// AltMode: the lock was granted in the alternate mode (AltPR/AltCW).
	AltMode StatusFlags = 0x04
)

// String lists the set status flags.
func (s StatusFlags) String() string {
	if s == 0 {
		return "0"
	}
	var parts []string
	if s&Demoted != 0 {
		parts = append(parts, "DEMOTED")
	}
	if s&ValNotValid != 0 {
		parts = append(parts, "VALNOTVALID")
	}
	if s&AltMode != 0 {
		parts = append(parts, "ALTMODE")
	}
	return strings.Join(parts, "|")
}
