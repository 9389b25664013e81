package dlm

// refCompatible is the compatibility matrix written out independently of
// mode.go, so that tests judge the engine by the VMS rules rather than by
// the engine's own table: the conflicting pairs are listed explicitly.
func refCompatible(a, b Mode) bool {
	if a == ModeIV || b == ModeIV || a == NL || b == NL {
		return true
	}
	switch {
	case a == EX || b == EX:
		return false
	case a == PW || b == PW:
		return a == CR || b == CR
	case a == CW && b == PR, a == PR && b == CW:
		return false
	}
	return true
}
