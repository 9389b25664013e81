package kernel

import (
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
)

// Attachment is an export of an nbd.Server attached as /dev/nbdN.
type Attachment struct {
	// Index is N of /dev/nbdN.
	Index int
	// Device is "/dev/nbdN".
	Device string
	// QueueErr is why the queue settings (Options.MaxRequestKiB, the
	// scheduler) could not all be applied, e.g. a read-only /sys; the
	// device works without them, only slower, so Attach does not fail.
	QueueErr error

	srvEnd net.Conn
	served chan error

	once sync.Once
	err  error
}

// detachWait bounds how long Detach waits for the server to see the
// kernel's disconnect before it closes the socket itself.
const detachWait = 10 * time.Second

// Attach serves export name of srv to the kernel: it makes a socket pair,
// serves one end with srv.ServeTransmission (the kernel's client skips the
// handshake, so o's Size and ServerFlags are taken from srv.ExportInfo)
// and hands the other end to the kernel with Connect, then applies the
// queue settings (o.MaxRequestKiB, scheduler "none"; see QueueErr). o.Size and
// o.ServerFlags are ignored; the rest of o applies. The connection counts
// against the server's MaxConnections like any other.
func Attach(srv *nbd.Server, name string, o Options) (*Attachment, error) {
	size, flags, err := srv.ExportInfo(name)
	if err != nil {
		return nil, err
	}
	o.Size, o.ServerFlags = size, flags
	if o.BlockSize == 0 {
		o.BlockSize = 512
	}
	// A device size the block size does not divide would be refused;
	// the tail beyond the last whole block is simply not exposed.
	if o.BlockSize > 0 && o.Size%o.BlockSize != 0 {
		o.Size -= o.Size % o.BlockSize
	}
	if err := o.validate(); err != nil {
		return nil, err
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("nbd attach: socket pair: %w", err)
	}
	kf := os.NewFile(uintptr(fds[0]), "nbd-kernel-end")
	sf := os.NewFile(uintptr(fds[1]), "nbd-server-end")
	sc, err := net.FileConn(sf) // duplicates the descriptor
	sf.Close()
	if err != nil {
		kf.Close()
		return nil, fmt.Errorf("nbd attach: %w", err)
	}
	a := &Attachment{srvEnd: sc, served: make(chan error, 1)}
	go func() { a.served <- srv.ServeTransmission(sc, name) }()
	idx, err := Connect(o, kf)
	kf.Close() // the kernel holds its own reference now (or failed)
	if err != nil {
		sc.Close()
		<-a.served
		return nil, err
	}
	a.Index, a.Device = idx, Device(idx)
	a.QueueErr = tuneQueue(idx, o)
	return a, nil
}

// Detach disconnects the device (the kernel fails I/O still queued and
// sends NBD_CMD_DISC), waits for the server to finish the connection and
// closes it. It is safe to call more than once; later calls return the
// first result.
func (a *Attachment) Detach() error {
	a.once.Do(func() {
		derr := Disconnect(a.Index)
		var serr error
		select {
		case serr = <-a.served:
		case <-time.After(detachWait):
			a.srvEnd.Close()
			serr = <-a.served
		}
		a.srvEnd.Close()
		if errors.Is(serr, nbd.ErrServerClosed) || errors.Is(serr, net.ErrClosed) {
			serr = nil
		}
		a.err = errors.Join(derr, serr)
	})
	return a.err
}
