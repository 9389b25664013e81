package superblock

import (
	"fmt"
	"strconv"
)

// MaxName is the longest array name: set_name is 32 bytes, and mdadm
// keeps a NUL.
const MaxName = 31

// ParseRaid10Layout turns mdadm's raid10 layout syntax (nN, fN, oN: N
// near, far or offset copies) into md's layout word.
func ParseRaid10Layout(s string) (uint32, error) {
	bad := fmt.Errorf("layout for raid10 must be 'nNN', 'oNN' or 'fNN' where NN is a number, not %s", s)
	if len(s) < 2 || (s[0] != 'n' && s[0] != 'f' && s[0] != 'o') {
		return 0, bad
	}
	for _, c := range s[1:] {
		if c < '0' || c > '9' {
			return 0, bad
		}
	}
	n, err := strconv.Atoi(s[1:])
	if err != nil || n < 1 || n > 200 {
		return 0, bad
	}
	switch s[0] {
	case 'n':
		return 0x100 + uint32(n), nil
	case 'o':
		return 0x10000 + uint32(n)<<8 + 1, nil
	}
	return uint32(n)<<8 + 1, nil
}
