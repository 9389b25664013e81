package dlm

import "fmt"

// Mode is a lock mode in the VMS / Linux DLM tradition. The numeric values match
// Linux's DLM_LOCK_* constants so that modes can cross the wire and appear in
// dumps exactly as the kernel DLM shows them.
//
// Modes are not a total order of strength: PR and CW are mutually incompatible
// although CW < PR numerically. Use Compatible and the helpers below rather than
// comparing modes with < and >, except where Linux itself does (LVB rules).
type Mode int8

const (
	// ModeIV is the "invalid" mode: the granted mode of a lock that was never
	// granted, and the requested mode of a lock with nothing pending.
	ModeIV Mode = -1
	// NL (null) holds a place in the resource and keeps its master cached; it
	// grants no access and is compatible with everything.
	NL Mode = 0
	// CR (concurrent read): unprotected read; others may write.
	CR Mode = 1
	// CW (concurrent write): unprotected write; others may read or write unprotected.
	CW Mode = 2
	// PR (protected read): shared read, no writers.
	PR Mode = 3
	// PW (protected write): update access, concurrent CR readers allowed.
	PW Mode = 4
	// EX (exclusive): nobody else but NL holders.
	EX Mode = 5
)

var modeNames = [...]string{"NL", "CR", "CW", "PR", "PW", "EX"}

// String returns the mode's two-letter name ("IV" for ModeIV).
func (m Mode) String() string {
	if m == ModeIV {
		return "IV"
	}
	if m.Valid() {
		return modeNames[m]
	}
	return fmt.Sprintf("Mode(%d)", int8(m))
}

// Valid reports whether m is one of the six grantable modes.
func (m Mode) Valid() bool { return m >= NL && m <= EX }

// ParseMode parses a two-letter mode name such as "PW".
func ParseMode(s string) (Mode, error) {
	for i, n := range modeNames {
		if n == s {
			return Mode(i), nil
		}
	}
	return ModeIV, fmt.Errorf("%w: unknown lock mode %q", ErrInvalid, s)
}

// compat is Linux's compatibility matrix, indexed [granted][requested].
var compat = [6][6]bool{
	//        NL    CR     CW     PR     PW     EX
	/*NL*/ {true, true, true, true, true, true},
	/*CR*/ {true, true, true, true, true, false},
	/*CW*/ {true, true, true, false, false, false},
	/*PR*/ {true, true, false, true, false, false},
	/*PW*/ {true, true, false, false, false, false},
	/*EX*/ {true, false, false, false, false, false},
}

// Compatible reports whether a lock granted in mode a can coexist with one
// granted in mode b. ModeIV (nothing granted) is compatible with everything.
func Compatible(a, b Mode) bool {
	if a == ModeIV || b == ModeIV {
		return true
	}
	return compat[a][b]
}

// quecvtOK lists the conversions QUECVT may be used with: up-conversions only
// (PR->CW counts as one), indexed [granted][requested].
var quecvtOK = [6][6]bool{
	//        NL     CR     CW     PR     PW     EX
	/*NL*/ {false, true, true, true, true, true},
	/*CR*/ {false, false, true, true, true, true},
	/*CW*/ {false, false, false, true, true, true},
	/*PR*/ {false, false, true, false, true, true},
	/*PW*/ {false, false, false, false, false, true},
	/*EX*/ {false, false, false, false, false, false},
}

// lvbOp says what happens to the lock value block on a transition from granted
// mode gr (ModeIV for a new request) to rq: lvbRead copies the resource's value
// to the caller, lvbWrite copies the caller's value to the resource, lvbNone does
// neither. It is Linux's dlm_lvb_operations table.
type lvbOp int8

const (
	lvbNone  lvbOp = -1
	lvbWrite lvbOp = 0
	lvbRead  lvbOp = 1
)

var lvbOps = [7][6]lvbOp{
	//           NL        CR        CW        PR        PW        EX
	/*IV*/ {lvbRead, lvbRead, lvbRead, lvbRead, lvbRead, lvbRead},
	/*NL*/ {lvbRead, lvbRead, lvbRead, lvbRead, lvbRead, lvbRead},
	/*CR*/ {lvbNone, lvbRead, lvbRead, lvbRead, lvbRead, lvbRead},
	/*CW*/ {lvbNone, lvbNone, lvbRead, lvbRead, lvbRead, lvbRead},
	/*PR*/ {lvbNone, lvbNone, lvbNone, lvbRead, lvbRead, lvbRead},
	/*PW*/ {lvbWrite, lvbWrite, lvbWrite, lvbWrite, lvbWrite, lvbRead},
	/*EX*/ {lvbWrite, lvbWrite, lvbWrite, lvbWrite, lvbWrite, lvbWrite},
}

func lvbOperation(gr, rq Mode) lvbOp { return lvbOps[gr+1][rq] }

// middleConversion reports a PR<->CW conversion, which is neither up nor down.
func middleConversion(gr, rq Mode) bool {
	return (gr == PR && rq == CW) || (gr == CW && rq == PR)
}

// downConversion reports a conversion to a strictly weaker mode; such a
// conversion can always be granted at once.
func downConversion(gr, rq Mode) bool {
	return !middleConversion(gr, rq) && rq < gr
}
