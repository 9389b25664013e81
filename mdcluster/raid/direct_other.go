//go:build !linux

package raid

import (
	"errors"
	"fmt"
)

// DirectFile is a Device over a file or block device opened with O_DIRECT.
// It is implemented on Linux only; elsewhere OpenDirect fails.
type DirectFile struct{ Device }

// OpenDirect is not supported on this platform.
func OpenDirect(path string) (*DirectFile, error) {
	return nil, fmt.Errorf("open %s: %w", path, errors.ErrUnsupported)
}
