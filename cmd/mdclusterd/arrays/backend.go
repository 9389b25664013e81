package arrays

import (
	"context"
	"errors"
	"fmt"

	"github.com/mdcluster/mdcluster/mdcluster/array"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// backend serves an array's CopyEngine as an NBD export. The engine writes
// straight to the member files (no cache of its own); Flush syncs every
// member that is read or written.
type backend struct {
	eng  *array.CopyEngine
	size int64
}

var _ nbd.Backend = (*backend)(nil)

func (b *backend) ReadAt(p []byte, off int64) (int, error) {
	if err := b.eng.Read(context.Background(), off, p); err != nil {
		return 0, mapErr(err)
	}
	return len(p), nil
}

func (b *backend) WriteAt(p []byte, off int64, flags nbd.IOFlags) error {
	if err := b.eng.Write(context.Background(), off, p); err != nil {
		return mapErr(err)
	}
	if flags&nbd.FUA != 0 {
		return b.Flush()
	}
	return nil
}

func (b *backend) Flush() error {
	var errs []error
	for _, m := range b.eng.Members() {
		if m.State != array.MemberInSync && m.State != array.MemberRecovering {
			continue
		}
		if err := m.Member.Sync(); err != nil {
			errs = append(errs, fmt.Errorf("flush %s: %w", m.Member.Name(), err))
		}
	}
	return errors.Join(errs...)
}

func (b *backend) Trim(off, n int64, flags nbd.IOFlags) error { return nil }

func (b *backend) WriteZeroes(off, n int64, flags nbd.IOFlags) error {
	if flags&nbd.FastZero != 0 {
		return nbd.ErrNotFast
	}
	const step = 1 << 20
	z := make([]byte, min(n, step))
	for n > 0 {
		k := min(n, step)
		if err := b.WriteAt(z[:k], off, 0); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	if flags&nbd.FUA != 0 {
		return b.Flush()
	}
	return nil
}

func (b *backend) Size() int64 { return b.size }

func (b *backend) Capabilities() nbd.Capabilities {
	return nbd.Capabilities{Flush: true, WriteZeroes: true, FastZero: true, MultiConn: true,
		MinBlockSize: superblock.SectorSize, PreferredBlockSize: 4096}
}

func mapErr(err error) error {
	if errors.Is(err, array.ErrEngineStopped) {
		return fmt.Errorf("%w: %v", nbd.ErrShutdown, err)
	}
	return err
}
