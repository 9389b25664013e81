// Package kernel attaches NBD exports to the Linux kernel's NBD client, so
// that an array served by our own NBD server also appears as a local block
// device, /dev/nbdN, that file systems and md can use.
//
// The kernel is driven through its generic netlink family "nbd" (the
// interface nbd-client uses by default), not the older ioctls: a netlink
// CONNECT hands the kernel a connected stream socket together with the
// size, block size and transmission flags an NBD handshake would have
// negotiated, and the device stays configured after the call returns (no
// thread has to sit in NBD_DO_IT). The kernel speaks only the
// transmission phase on the socket, so Attach gives it one end of a
// socket pair and serves the other end with nbd.Server.ServeTransmission:
// there is no handshake on this path at all.
//
// Everything here needs root (CAP_SYS_ADMIN) and the nbd module loaded.
package kernel

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// The kernel's NBD netlink ABI (include/uapi/linux/nbd-netlink.h): family
// name and version, commands and attribute numbers.
const (
	familyName    = "nbd"
	familyVersion = 1

	cmdConnect    = 1
	cmdDisconnect = 2
	cmdStatus     = 5

	attrIndex           = 1
	attrSizeBytes       = 2
	attrBlockSizeBytes  = 3
	attrTimeout         = 4
	attrServerFlags     = 5
	attrClientFlags     = 6
	attrSockets         = 7
	attrDeadConnTimeout = 8
	attrDeviceList      = 9
	attrBackendID       = 10

	sockItem = 1 // a nest inside attrSockets
	sockFD   = 1 // u32 inside sockItem

	deviceItem      = 1 // a nest inside attrDeviceList
	deviceIndex     = 1 // u32
	deviceConnected = 2 // u8

	// clientFlagDestroyOnDisconnect asks the kernel to delete the device
	// node when it is disconnected (for devices it created on demand).
	clientFlagDestroyOnDisconnect = 1 << 0
)

// MaxIndex is the largest device number accepted here. The kernel's own
// limit depends on its max_part parameter (1<<20 minors shifted by the
// partition bits); 65535 stays below it for any setting.
const MaxIndex = 65535

// AnyIndex in Options.Index lets the kernel choose a free device.
const AnyIndex = -1

// Options describe one kernel NBD device: what a handshake would have told
// the client, and the client's own timeouts.
type Options struct {
	// Index is N of /dev/nbdN, or AnyIndex.
	Index int
	// Size is the device size in bytes (required, > 0).
	Size int64
	// BlockSize is the logical block size: a power of two from 512 to
	// 4096 (the kernel's limit on older kernels is the page size). 0
	// means 512, as nbd-client uses. Size must be a multiple of it.
	BlockSize int64
	// ServerFlags are the NBD transmission flags (read-only, flush, FUA,
	// trim, write-zeroes, multi-connection...), as the server advertises
	// them; nbd.Server.ExportInfo returns them.
	ServerFlags uint16
	// Timeout is the per-request timeout. 0 leaves the kernel's default,
	// under which a request on a single dead socket waits forever; set it
	// so that a stuck server surfaces as I/O errors.
	Timeout time.Duration
	// DeadConnTimeout is how long I/O waits for a replacement socket
	// once every socket is dead, before it fails. 0 fails at once.
	DeadConnTimeout time.Duration
	// BackendID is free text shown in /sys/block/nbdN/backend; it names
	// what the device is attached to (e.g. the array's UUID).
	BackendID string
	// DestroyOnDisconnect deletes the device node when it is disconnected.
	DestroyOnDisconnect bool

	// MaxRequestKiB (Attach only) is the largest request the block layer
	// sends to the server, written to /sys/block/nbdN/queue/max_sectors_kb
	// and capped by the driver's max_hw_sectors_kb. 0 means
	// DefaultMaxRequestKiB; the driver's own default is 128 KiB.
	MaxRequestKiB int
	// KeepQueue (Attach only) leaves the device's queue settings as the
	// driver made them: no MaxRequestKiB, no scheduler change.
	KeepQueue bool
}

var devRE = regexp.MustCompile(`^/dev/nbd([0-9]+)$`)

// ParseDevice returns N of a "/dev/nbdN" path.
func ParseDevice(path string) (int, error) {
	m := devRE.FindStringSubmatch(path)
	if m == nil {
		return 0, fmt.Errorf("%q is not an NBD device path (/dev/nbdN)", path)
	}
	n, err := strconv.Atoi(m[1])
	if err != nil || n > MaxIndex || (len(m[1]) > 1 && m[1][0] == '0') {
		return 0, fmt.Errorf("%q: device number out of range 0..%d", path, MaxIndex)
	}
	return n, nil
}

// Device returns the path of device n.
func Device(n int) string { return "/dev/nbd" + strconv.Itoa(n) }

// validate checks o and fills in defaults.
func (o *Options) validate() error {
	if o.Index != AnyIndex && (o.Index < 0 || o.Index > MaxIndex) {
		return fmt.Errorf("nbd device index %d out of range 0..%d", o.Index, MaxIndex)
	}
	if o.BlockSize == 0 {
		o.BlockSize = 512
	}
	if o.BlockSize < 512 || o.BlockSize > 4096 || o.BlockSize&(o.BlockSize-1) != 0 {
		return fmt.Errorf("nbd block size %d: must be a power of two from 512 to 4096", o.BlockSize)
	}
	if o.Size <= 0 {
		return fmt.Errorf("nbd device size %d: must be positive", o.Size)
	}
	if o.Size%o.BlockSize != 0 {
		return fmt.Errorf("nbd device size %d is not a multiple of the block size %d", o.Size, o.BlockSize)
	}
	if o.Timeout < 0 || o.DeadConnTimeout < 0 {
		return errors.New("nbd timeouts must not be negative")
	}
	if o.MaxRequestKiB < 0 {
		return fmt.Errorf("nbd max request size %d KiB: must not be negative", o.MaxRequestKiB)
	}
	if len(o.BackendID) > 256 {
		return fmt.Errorf("nbd backend identifier: %d bytes, at most 256", len(o.BackendID))
	}
	return nil
}

// seconds rounds a timeout up to whole seconds, the kernel's unit, so that
// 500ms does not become "no timeout".
func seconds(d time.Duration) uint64 { return uint64((d + time.Second - 1) / time.Second) }

// connectAttrs encodes a CONNECT request's attributes for the given
// socket descriptors (validated options).
func connectAttrs(o Options, fds []int) ([]byte, error) {
	if len(fds) == 0 {
		return nil, errors.New("nbd connect: no socket")
	}
	ae := netlink.NewAttributeEncoder()
	if o.Index != AnyIndex {
		ae.Uint32(attrIndex, uint32(o.Index))
	}
	ae.Uint64(attrSizeBytes, uint64(o.Size))
	ae.Uint64(attrBlockSizeBytes, uint64(o.BlockSize))
	ae.Uint64(attrServerFlags, uint64(o.ServerFlags))
	if o.Timeout > 0 {
		ae.Uint64(attrTimeout, seconds(o.Timeout))
	}
	ae.Uint64(attrDeadConnTimeout, seconds(o.DeadConnTimeout))
	if o.DestroyOnDisconnect {
		ae.Uint64(attrClientFlags, clientFlagDestroyOnDisconnect)
	}
	if o.BackendID != "" {
		ae.String(attrBackendID, o.BackendID)
	}
	ae.Nested(attrSockets, func(nae *netlink.AttributeEncoder) error {
		for _, fd := range fds {
			nae.Nested(sockItem, func(item *netlink.AttributeEncoder) error {
				item.Uint32(sockFD, uint32(fd))
				return nil
			})
		}
		return nil
	})
	return ae.Encode()
}

// conn is an open generic netlink socket and the nbd family's ID.
type conn struct {
	c      *genetlink.Conn
	family uint16
}

// initNetNS is the initial network namespace, as seen through init.
const initNetNS = "/proc/1/ns/net"

// dial opens a generic netlink socket and resolves the nbd family. Some
// kernels (Debian 12's 6.1 among them) register the family for the initial
// network namespace only, so a daemon running in a namespace of its own (a container, or the VM
// tests' three nodes) does not find it there; it then retries from the
// initial namespace, which needs CAP_SYS_ADMIN there as CONNECT does
// anyway. The socket descriptors handed to the kernel are not tied to a
// namespace.
func dial() (*conn, error) {
	c, err := dialIn(0)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return c, err
	}
	if other, serr := otherNS(); serr == nil && other {
		fd, oerr := unix.Open(initNetNS, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if oerr == nil {
			defer unix.Close(fd)
			if c, ierr := dialIn(fd); ierr == nil {
				return c, nil
			}
		}
	}
	return nil, errors.New("the kernel has no \"nbd\" netlink family: load the nbd module (modprobe nbd)")
}

// otherNS reports whether this process runs outside the initial network
// namespace.
func otherNS() (bool, error) {
	var a, b unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &a); err != nil {
		return false, err
	}
	if err := unix.Stat(initNetNS, &b); err != nil {
		return false, err
	}
	return a.Ino != b.Ino || a.Dev != b.Dev, nil
}

// dialIn dials in the namespace of descriptor ns (0: the caller's).
func dialIn(ns int) (*conn, error) {
	c, err := genetlink.Dial(&netlink.Config{NetNS: ns})
	if err != nil {
		return nil, fmt.Errorf("generic netlink: %w", err)
	}
	f, err := c.GetFamily(familyName)
	if err != nil {
		c.Close()
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("nbd netlink family: %w", err)
		}
		return nil, fmt.Errorf("resolving the nbd netlink family: %w", err)
	}
	return &conn{c: c, family: f.ID}, nil
}

func (c *conn) execute(cmd uint8, attrs []byte) ([]genetlink.Message, error) {
	msgs, err := c.c.Execute(genetlink.Message{
		Header: genetlink.Header{Command: cmd, Version: familyVersion},
		Data:   attrs,
	}, c.family, netlink.Request|netlink.Acknowledge)
	if err != nil {
		var oe *netlink.OpError
		if errors.As(err, &oe) && errors.Is(oe.Err, os.ErrPermission) {
			return nil, fmt.Errorf("%w (the kernel requires CAP_SYS_ADMIN)", err)
		}
		return nil, err
	}
	return msgs, nil
}

// Connect configures a kernel NBD device on the given connected stream
// sockets (one, or several when ServerFlags allow multi-connection) and
// returns its index. The kernel takes its own reference on each socket;
// the caller may close its descriptors afterwards. The device stays
// configured until Disconnect, whatever happens to the calling process.
func Connect(o Options, socks ...*os.File) (int, error) {
	if err := o.validate(); err != nil {
		return 0, err
	}
	fds := make([]int, len(socks))
	for i, s := range socks {
		fds[i] = int(s.Fd())
	}
	attrs, err := connectAttrs(o, fds)
	if err != nil {
		return 0, err
	}
	c, err := dial()
	if err != nil {
		return 0, err
	}
	defer c.c.Close()
	msgs, err := c.execute(cmdConnect, attrs)
	// The descriptors must stay open until the kernel has looked them up.
	runtime.KeepAlive(socks)
	if err != nil {
		what := "any free device"
		if o.Index != AnyIndex {
			what = Device(o.Index)
		}
		return 0, fmt.Errorf("nbd connect %s: %w", what, err)
	}
	idx, ok := replyIndex(msgs)
	if !ok {
		if o.Index != AnyIndex {
			return o.Index, nil
		}
		return 0, errors.New("nbd connect: the kernel's reply names no device")
	}
	return idx, nil
}

// replyIndex finds NBD_ATTR_INDEX in a CONNECT reply.
func replyIndex(msgs []genetlink.Message) (int, bool) {
	for _, m := range msgs {
		ad, err := netlink.NewAttributeDecoder(m.Data)
		if err != nil {
			continue
		}
		for ad.Next() {
			if ad.Type() == attrIndex {
				return int(ad.Uint32()), ad.Err() == nil
			}
		}
	}
	return 0, false
}

// Disconnect tears down device n: the kernel sends NBD_CMD_DISC on its
// sockets, fails whatever I/O is still queued, and drops the
// configuration. Disconnecting a device that is not connected succeeds.
func Disconnect(n int) error {
	if n < 0 || n > MaxIndex {
		return fmt.Errorf("nbd device index %d out of range 0..%d", n, MaxIndex)
	}
	c, err := dial()
	if err != nil {
		return err
	}
	defer c.c.Close()
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, uint32(n))
	b, err := ae.Encode()
	if err != nil {
		return err
	}
	if _, err := c.execute(cmdDisconnect, b); err != nil {
		return fmt.Errorf("nbd disconnect %s: %w", Device(n), err)
	}
	return nil
}

// Connected reports whether device n has a configuration (is attached),
// through the netlink STATUS command.
func Connected(n int) (bool, error) {
	if n < 0 || n > MaxIndex {
		return false, fmt.Errorf("nbd device index %d out of range 0..%d", n, MaxIndex)
	}
	c, err := dial()
	if err != nil {
		return false, err
	}
	defer c.c.Close()
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, uint32(n))
	b, err := ae.Encode()
	if err != nil {
		return false, err
	}
	msgs, err := c.execute(cmdStatus, b)
	if err != nil {
		return false, fmt.Errorf("nbd status %s: %w", Device(n), err)
	}
	st, err := parseStatus(msgs)
	if err != nil {
		return false, err
	}
	return st[n], nil
}

// parseStatus decodes a STATUS reply's device list: index → connected.
func parseStatus(msgs []genetlink.Message) (map[int]bool, error) {
	out := map[int]bool{}
	for _, m := range msgs {
		ad, err := netlink.NewAttributeDecoder(m.Data)
		if err != nil {
			return nil, fmt.Errorf("nbd status reply: %w", err)
		}
		for ad.Next() {
			if ad.Type() != attrDeviceList {
				continue
			}
			ad.Nested(func(list *netlink.AttributeDecoder) error {
				for list.Next() {
					if list.Type() != deviceItem {
						continue
					}
					list.Nested(func(item *netlink.AttributeDecoder) error {
						idx, conn := -1, false
						for item.Next() {
							switch item.Type() {
							case deviceIndex:
								idx = int(item.Uint32())
							case deviceConnected:
								conn = item.Uint8() != 0
							}
						}
						if idx >= 0 {
							out[idx] = conn
						}
						return item.Err()
					})
				}
				return list.Err()
			})
		}
		if err := ad.Err(); err != nil {
			return nil, fmt.Errorf("nbd status reply: %w", err)
		}
	}
	return out, nil
}
