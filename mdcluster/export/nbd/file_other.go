//go:build !linux

package nbd

import (
	"errors"
	"os"
)

// Without fallocate, trims and zeroing fall back to writing zeroes.
func punchHole(*os.File, int64, int64) error { return errors.ErrUnsupported }
func zeroRange(*os.File, int64, int64) error { return errors.ErrUnsupported }
func datasync(f *os.File) error              { return f.Sync() }

const dsyncFlag = os.O_SYNC
