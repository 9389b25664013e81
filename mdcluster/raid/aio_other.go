//go:build !linux || !(amd64 || arm64)

package raid

// aioWrite is one write of a batch (see aio_linux.go); without native AIO
// no batch is ever submitted.
type aioWrite struct {
	fd  int
	p   []byte
	off int64
	res int64
}

const aioMaxBatch = 16

// aioWriteAll always declines: the engine writes each member the usual way.
func aioWriteAll(ws []aioWrite, hook func(submitted bool)) bool { return false }

// aioAvailable reports whether this build can submit native AIO.
const aioAvailable = false
