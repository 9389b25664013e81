package array

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// Member is one member device of an array as this package sees it: bytes
// that can be read and written at offsets, a size, a way to make writes
// durable, and a name for messages. It is deliberately small so that the
// manager can hand in real block devices, image files, or (in tests and
// the simulator) memory.
type Member interface {
	io.ReaderAt
	io.WriterAt
	// Size returns the size of the device in bytes. md works in 512-byte
	// sectors and ignores a partial last sector.
	Size() (int64, error)
	// Sync makes every completed write durable (fsync for a file or a
	// block device). Create and WriteAll call it before they return, so
	// that "created" or "written" means on stable storage.
	Sync() error
	// Name identifies the device in messages ("/dev/sdb", an image path).
	Name() string
}

// FileMember is a Member backed by a regular file (an image) or a block
// device (a disk, a partition, a loop or NBD device).
//
// A block device is read and written with O_DIRECT (through aligned
// bounce buffers, see directIO): its superblocks and bitmaps are shared
// with other nodes, each with a page cache of its own, and a buffered
// read would return what this kernel cached before another node wrote
// (a node then "does not see" a superblock another node just wrote), and
// a buffered partial-page write would put those stale neighbouring bytes
// back on the disk. Regular files stay buffered: nodes sharing an image
// file share one kernel (tests, the demo) and tmpfs refuses O_DIRECT.
type FileMember struct {
	f      *os.File
	path   string
	block  bool
	direct *directIO // block devices: the O_DIRECT descriptor
}

// OpenFile opens path as a member device. With writable, the device is
// opened read-write and, for block devices, exclusively (O_EXCL), the way
// mdadm claims members: a block device that is mounted, or already held by
// md, device-mapper or another exclusive opener, is refused instead of
// being written underneath its user. Other file types (directories,
// character devices, sockets) are refused: they cannot be md members.
func OpenFile(path string, writable bool) (*FileMember, error) {
	return openFile(path, writable, true)
}

// OpenShared is OpenFile without O_EXCL: for several nodes under one
// kernel (Config.SharedDevices), which would otherwise lock each other
// out of the devices they share, since O_EXCL is system-wide.
func OpenShared(path string, writable bool) (*FileMember, error) {
	return openFile(path, writable, false)
}

func openFile(path string, writable, exclusive bool) (*FileMember, error) {
	st, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("member %s: %w", path, err)
	}
	mode := st.Mode()
	block := mode&os.ModeDevice != 0 && mode&os.ModeCharDevice == 0
	if !mode.IsRegular() && !block {
		return nil, fmt.Errorf("member %s: not a regular file or block device (%s)", path, mode.Type())
	}
	flag := os.O_RDONLY
	if writable {
		flag = os.O_RDWR
		if block && exclusive {
			flag |= unix.O_EXCL
		}
	}
	f, err := os.OpenFile(path, flag|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("member %s: %w", path, err)
	}
	m := &FileMember{f: f, path: path, block: block}
	if block {
		// A second descriptor with O_DIRECT (same access mode; the first
		// one keeps the O_EXCL claim, the size and fsync).
		df, err := os.OpenFile(path, (flag&^unix.O_EXCL)|unix.O_DIRECT|unix.O_CLOEXEC, 0)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("member %s: open with O_DIRECT: %w", path, err)
		}
		bs, err := unix.IoctlGetInt(int(df.Fd()), unix.BLKSSZGET)
		if err != nil || bs < 512 || bs&(bs-1) != 0 {
			bs = 4096 // the largest logical block size in use: always aligned
		}
		m.direct = &directIO{f: df, bs: int64(bs)}
	}
	return m, nil
}

// ReadAt implements io.ReaderAt.
func (m *FileMember) ReadAt(p []byte, off int64) (int, error) {
	if m.direct != nil {
		return m.direct.ReadAt(p, off)
	}
	return m.f.ReadAt(p, off)
}

// WriteAt implements io.WriterAt.
func (m *FileMember) WriteAt(p []byte, off int64) (int, error) {
	if m.direct != nil {
		return m.direct.WriteAt(p, off)
	}
	return m.f.WriteAt(p, off)
}

// directIO does reads and writes of any offset and length on a descriptor
// opened with O_DIRECT, which takes only whole logical blocks from aligned
// memory: each call goes through an aligned bounce buffer covering the
// blocks it touches, and a write that covers a block only in part reads
// that block first (from the disk, never from a cache).
type directIO struct {
	f  *os.File
	bs int64 // logical block size: the alignment O_DIRECT needs
}

// alignedBlocks returns n bytes (a multiple of bs) aligned to bs.
func (d *directIO) alignedBlocks(n int64) []byte {
	b := make([]byte, n+d.bs)
	a := int64(uintptr(unsafe.Pointer(&b[0]))) & (d.bs - 1)
	if a != 0 {
		a = d.bs - a
	}
	return b[a : a+n]
}

// span returns the block-aligned range covering [off, off+n).
func (d *directIO) span(off int64, n int) (lo, hi int64) {
	lo = off &^ (d.bs - 1)
	hi = (off + int64(n) + d.bs - 1) &^ (d.bs - 1)
	return lo, hi
}

// readFull reads b at off (aligned), short only at the end of the device.
func (d *directIO) readFull(b []byte, off int64) (int, error) {
	n := 0
	for n < len(b) {
		k, err := d.f.ReadAt(b[n:], off+int64(n))
		n += k
		if err != nil {
			return n, err
		}
		if k == 0 {
			return n, io.EOF
		}
	}
	return n, nil
}

func (d *directIO) ReadAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	lo, hi := d.span(off, len(p))
	buf := d.alignedBlocks(hi - lo)
	n, err := d.readFull(buf, lo)
	got := max(0, min(int64(n)-(off-lo), int64(len(p))))
	copy(p, buf[off-lo:off-lo+got])
	if got < int64(len(p)) {
		if err == nil {
			err = io.EOF
		}
		return int(got), err
	}
	return len(p), nil
}

func (d *directIO) WriteAt(p []byte, off int64) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	lo, hi := d.span(off, len(p))
	buf := d.alignedBlocks(hi - lo)
	// The partly covered first and last blocks keep what the disk has.
	if off != lo {
		if _, err := d.readFull(buf[:d.bs], lo); err != nil {
			return 0, fmt.Errorf("read-modify-write at %d: %w", lo, err)
		}
	}
	if end := off + int64(len(p)); end != hi && (hi-lo > d.bs || off == lo) {
		if _, err := d.readFull(buf[hi-lo-d.bs:], hi-d.bs); err != nil {
			return 0, fmt.Errorf("read-modify-write at %d: %w", hi-d.bs, err)
		}
	}
	copy(buf[off-lo:], p)
	n, err := d.f.WriteAt(buf, lo)
	if n < int(hi-lo) {
		return max(0, min(len(p), n-int(off-lo))), err
	}
	return len(p), nil
}

// Size returns the file size, or for a block device the size the kernel
// reports (BLKGETSIZE64): a block device's inode has size 0.
func (m *FileMember) Size() (int64, error) {
	if m.block {
		v, err := blkGetSize64(m.f)
		if err != nil {
			return 0, fmt.Errorf("member %s: size (BLKGETSIZE64): %w", m.path, err)
		}
		if v > 1<<62 {
			return 0, fmt.Errorf("member %s: implausible size %d bytes", m.path, v)
		}
		return int64(v), nil
	}
	st, err := m.f.Stat()
	if err != nil {
		return 0, fmt.Errorf("member %s: size: %w", m.path, err)
	}
	return st.Size(), nil
}

// blkGetSize64 asks the kernel for a block device's size in bytes
// (BLKGETSIZE64; golang.org/x/sys has no typed helper for a 64-bit result).
func blkGetSize64(f *os.File) (uint64, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0, err
	}
	var v uint64
	var errno syscall.Errno
	if err := rc.Control(func(fd uintptr) {
		_, _, errno = unix.Syscall(unix.SYS_IOCTL, fd, unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&v)))
	}); err != nil {
		return 0, err
	}
	if errno != 0 {
		return 0, errno
	}
	return v, nil
}

// Sync flushes the device's written data to stable storage (fsync).
func (m *FileMember) Sync() error {
	if err := m.f.Sync(); err != nil {
		return fmt.Errorf("member %s: sync: %w", m.path, err)
	}
	return nil
}

// Name returns the path the member was opened with.
func (m *FileMember) Name() string { return m.path }

// BlockDevice reports whether the member is a block device rather than a
// regular file.
func (m *FileMember) BlockDevice() bool { return m.block }

// Close closes the underlying file.
func (m *FileMember) Close() error {
	if m.direct != nil {
		m.direct.f.Close()
	}
	return m.f.Close()
}

// memberSectors returns a member's size in whole 512-byte sectors.
func memberSectors(m Member) (uint64, error) {
	n, err := m.Size()
	if err != nil {
		return 0, err
	}
	if n < 0 {
		return 0, fmt.Errorf("member %s: negative size %d", m.Name(), n)
	}
	return uint64(n) / superblock.SectorSize, nil
}

// ---------------------------------------------------------------------------
// Inspect: read the members and decide which of them make up the array.

// Status says what Inspect decided about a member.
type Status int

// Member statuses. Only InSync, Recovering and Spare members are used when
// the array is started; every other status comes with a reason.
const (
	// StatusInSync: holds a raid slot and its data is current.
	StatusInSync Status = iota
	// StatusRecovering: holds a raid slot but was only partly rebuilt
	// (its superblock has a recovery offset); md resumes the rebuild.
	StatusRecovering
	// StatusSpare: belongs to the array without a slot.
	StatusSpare
	// StatusFaulty: marked faulty by the freshest superblock (or by its
	// own); md never uses it again without an explicit re-add.
	StatusFaulty
	// StatusStale: its event count is too far behind the freshest
	// member's: it missed updates, so its data cannot be trusted.
	StatusStale
	// StatusForeign: a superblock of another array (different UUID).
	StatusForeign
	// StatusMismatch: same array UUID but the superblock disagrees with
	// the freshest one about the array's shape, or contradicts it.
	StatusMismatch
	// StatusNoSuperblock: no md superblock on the device.
	StatusNoSuperblock
	// StatusCorrupt: an md superblock that fails its checksum or is
	// internally impossible.
	StatusCorrupt
	// StatusMissing: the member was not available (a nil Member).
	StatusMissing
	// StatusUnreadable: reading the device failed.
	StatusUnreadable
)

var statusNames = [...]string{
	StatusInSync:       "in sync",
	StatusRecovering:   "recovering",
	StatusSpare:        "spare",
	StatusFaulty:       "faulty",
	StatusStale:        "stale",
	StatusForeign:      "foreign",
	StatusMismatch:     "mismatch",
	StatusNoSuperblock: "no superblock",
	StatusCorrupt:      "corrupt",
	StatusMissing:      "missing",
	StatusUnreadable:   "unreadable",
}

// String returns a short lower-case name for the status.
func (s Status) String() string {
	if s >= 0 && int(s) < len(statusNames) {
		return statusNames[s]
	}
	return fmt.Sprintf("status(%d)", int(s))
}

// Used reports whether a member with this status is part of the array
// when it is started (in a slot or as a spare).
func (s Status) Used() bool {
	return s == StatusInSync || s == StatusRecovering || s == StatusSpare
}

// MemberReport is what Inspect found on one member.
type MemberReport struct {
	// Index is the member's position in the list given to Inspect.
	Index int
	// Name is Member.Name(), or "" for a missing member.
	Name   string
	Member Member
	Status Status
	// Reason explains every status except InSync and Spare, in words
	// close to what mdadm or the kernel print for the same situation.
	Reason string
	// Err is the underlying error for NoSuperblock, Corrupt and
	// Unreadable members.
	Err error
	// Super is the member's own superblock (nil if none could be read).
	Super *superblock.Superblock
	// Role is the member's role as the freshest superblock records it
	// (md trusts the freshest superblock, not the member's own), or its
	// own role when it does not belong to the array.
	Role uint16
	// Slot is the raid slot the member holds (InSync, Recovering), or -1.
	Slot int
	// Bitmap holds every bitmap slot read from this member (one for an
	// internal bitmap, Nodes for a clustered one); nil without a bitmap.
	Bitmap []*bitmap.Slot
	// BitmapErr is set when the superblock names a bitmap that could not
	// be read or does not belong to the array. The member is still used:
	// md reads the bitmap from the first in-sync member that has one.
	BitmapErr error
}

// MissingDevice is a device the freshest superblock lists in a raid slot
// that none of the inspected members is.
type MissingDevice struct {
	DevNumber uint32
	Slot      int
}

// Inspection is the result of Inspect: the array as its freshest member
// describes it, and what each member is.
type Inspection struct {
	// Info describes the array; nil when no member holds a usable
	// superblock of the array.
	Info *Info
	// Freshest is the index of the member whose superblock describes the
	// array (highest event count, first on ties), or -1.
	Freshest int
	// Members has one report per member given, in the same order.
	Members []MemberReport
	// Slots has one entry per raid slot: the index of the member that
	// holds it in sync, or -1.
	Slots []int
	// Missing lists devices the freshest superblock puts in a slot that
	// are not among the members at all (a member that is there but stale
	// or faulty is reported with its status instead).
	Missing []MissingDevice
	// InSync is the number of slots with an in-sync member.
	InSync int
	// Degraded is true when some slot has no in-sync member.
	Degraded bool
	// Startable is true when enough slots are in sync for md to run the
	// array: raid1 needs one, raid10 needs a copy of every chunk.
	Startable bool
	// Reason explains why the array is not startable ("" when it is).
	Reason string
}

// InspectOptions tunes Inspect.
type InspectOptions struct {
	// UUID selects the array when non-zero. Otherwise the array is the
	// one named by the first member that holds a valid superblock, which
	// is what mdadm --assemble does with an explicit device list.
	UUID [16]byte
}

// eventMargin is how far behind the freshest event count a member may be
// and still be current: md accepts one event less when it assembles
// (super_1_validate), because it does not write clean/dirty transitions to
// spares and a crash can interrupt a superblock update between members,
// and mdadm --assemble allows the same margin.
const eventMargin = 1

// Inspect reads every member's superblock and bitmap and decides which
// members belong together and how, the way mdadm --assemble and the
// kernel decide when an array is assembled:
//
//   - members without a valid superblock (none, corrupt, unreadable,
//     missing) are reported and not used;
//   - the array is the one selected by opt.UUID, or the first member's;
//     members of other arrays are foreign ("has wrong uuid");
//   - the freshest member (highest events) describes the array; members
//     whose shape differs from it are mismatched;
//   - each member's role comes from the freshest superblock: faulty
//     members are not used, members more than one event behind are stale
//     (md "kicks non-fresh" devices), and a member whose own superblock
//     marks the freshest member as failed is ignored (mdadm: "ignoring X as
//     it reports Y as failed");
//   - of two members claiming the same device number, the first current
//     one keeps it.
//
// Inspect only reads. The error is non-nil only for an empty member list;
// everything found on the members is in the Inspection.
func Inspect(members []Member, opt InspectOptions) (*Inspection, error) {
	if len(members) == 0 {
		return nil, errors.New("inspect: no members given")
	}
	res := &Inspection{Freshest: -1, Members: make([]MemberReport, len(members))}
	valid := make([]bool, len(members)) // holds a valid superblock, not yet classified
	for i, m := range members {
		res.Members[i], valid[i] = readMember(i, m)
	}
	// The array to assemble.
	uuid := opt.UUID
	if uuid == ([16]byte{}) {
		for i, r := range res.Members {
			if valid[i] {
				uuid = r.Super.SetUUID
				break
			}
		}
	}
	for i := range res.Members {
		r := &res.Members[i]
		if !valid[i] {
			continue
		}
		if r.Super.SetUUID != uuid {
			valid[i] = false
			r.Status, r.Role = StatusForeign, r.Super.Role()
			r.Reason = fmt.Sprintf("%s has wrong uuid: it belongs to array %s, not %s", r.Name, bitmap.FormatUUID(r.Super.SetUUID), bitmap.FormatUUID(uuid))
			continue
		}
		if res.Freshest < 0 || r.Super.Events > res.Members[res.Freshest].Super.Events {
			res.Freshest = i
		}
	}
	if res.Freshest < 0 {
		res.Reason = "no member holds a valid superblock of the array"
		if uuid != ([16]byte{}) {
			res.Reason = fmt.Sprintf("no member holds a valid superblock of array %s", bitmap.FormatUUID(uuid))
		}
		return res, nil
	}
	fresh := res.Members[res.Freshest].Super
	info := infoFrom(fresh, nil)
	res.Info = &info
	res.Slots = make([]int, fresh.RaidDisks)
	for i := range res.Slots {
		res.Slots[i] = -1
	}
	// The freshest member first, so that it wins device-number conflicts.
	byDev := map[uint32]int{} // device number -> member index that holds it
	classify(res, res.Freshest, fresh, byDev)
	for i := range res.Members {
		if valid[i] && i != res.Freshest {
			classify(res, i, fresh, byDev)
		}
	}
	// Bitmaps of used members; the array's bitmap facts from the freshest.
	for i := range res.Members {
		r := &res.Members[i]
		if r.Super == nil || !r.Status.Used() || !r.Super.HasBitmap() {
			continue
		}
		r.Bitmap, r.BitmapErr = readBitmap(r.Member, r.Super)
		if i == res.Freshest && r.BitmapErr == nil && len(r.Bitmap) > 0 {
			bsb := r.Bitmap[0].Super
			info := infoFrom(fresh, &bsb)
			res.Info = &info
		}
	}
	// Slots, missing devices, startability.
	for i, r := range res.Members {
		if r.Status == StatusInSync && r.Slot >= 0 && r.Slot < len(res.Slots) && res.Slots[r.Slot] < 0 {
			res.Slots[r.Slot] = i
		}
	}
	present := map[uint32]bool{} // device numbers of this array's members, used or not
	for i, r := range res.Members {
		if valid[i] && r.Status != StatusMismatch {
			present[r.Super.DevNumber] = true
		}
	}
	for dev, role := range fresh.DevRoles {
		if role < superblock.RoleMax && uint32(role) < fresh.RaidDisks && !present[uint32(dev)] {
			res.Missing = append(res.Missing, MissingDevice{DevNumber: uint32(dev), Slot: int(role)})
		}
	}
	for _, m := range res.Slots {
		if m >= 0 {
			res.InSync++
		}
	}
	res.Degraded = res.InSync < len(res.Slots)
	res.Startable = Enough(fresh.Level, fresh.Layout, int(fresh.RaidDisks), func(slot int) bool { return res.Slots[slot] >= 0 })
	switch {
	case fresh.Level != superblock.LevelRAID1 && fresh.Level != superblock.LevelRAID10:
		res.Reason = fmt.Sprintf("raid level %s is not supported by mdcluster", superblock.LevelName(fresh.Level))
	case !res.Startable:
		res.Reason = fmt.Sprintf("not enough members to start the array: %d of %d slots in sync", res.InSync, len(res.Slots))
		if fresh.Level == superblock.LevelRAID10 && res.InSync > 0 {
			res.Reason += " and some raid10 chunk has no in-sync copy"
		}
	}
	return res, nil
}

// readMember reads and validates one member's superblock; valid is true
// when it holds one, which Inspect then classifies.
func readMember(i int, m Member) (r MemberReport, valid bool) {
	r = MemberReport{Index: i, Member: m, Slot: -1, Role: superblock.RoleSpare}
	if m == nil {
		r.Status, r.Reason = StatusMissing, "member not available"
		return r, false
	}
	r.Name = m.Name()
	sectors, err := memberSectors(m)
	if err != nil {
		r.Status, r.Err = StatusUnreadable, err
		r.Reason = fmt.Sprintf("cannot get the size of %s: %v", r.Name, err)
		return r, false
	}
	sb, err := superblock.Probe(m, sectors)
	if err != nil {
		r.Err = err
		if errors.Is(err, superblock.ErrBadMagic) {
			r.Status, r.Reason = StatusNoSuperblock, fmt.Sprintf("%s has no superblock", r.Name)
		} else if errors.Is(err, superblock.ErrCorrupt) {
			r.Status, r.Reason = StatusCorrupt, fmt.Sprintf("%s: corrupt md superblock: %v", r.Name, err)
		} else {
			r.Status, r.Reason = StatusUnreadable, fmt.Sprintf("cannot read the md superblock of %s: %v", r.Name, err)
		}
		return r, false
	}
	if err := sb.Validate(sectors); err != nil {
		r.Status, r.Err, r.Super = StatusCorrupt, err, sb
		r.Reason = fmt.Sprintf("%s: md superblock not usable: %v", r.Name, err)
		return r, false
	}
	r.Super, r.Role = sb, sb.Role()
	return r, true
}

// classify settles one member of the array against the freshest
// superblock. byDev records which member holds each device number.
func classify(res *Inspection, i int, fresh *superblock.Superblock, byDev map[uint32]int) {
	r := &res.Members[i]
	sb := r.Super
	if i != res.Freshest {
		if d := shapeDiff(fresh, sb); d != "" {
			r.Status, r.Role = StatusMismatch, sb.Role()
			r.Reason = fmt.Sprintf("superblock on %s doesn't match others: %s", r.Name, d)
			return
		}
	}
	if sb.DevNumber >= uint32(len(fresh.DevRoles)) {
		r.Status, r.Role = StatusMismatch, sb.Role()
		r.Reason = fmt.Sprintf("%s: device number %d is outside the freshest superblock's table of %d devices", r.Name, sb.DevNumber, len(fresh.DevRoles))
		return
	}
	if j, taken := byDev[sb.DevNumber]; taken && j != i {
		r.Status, r.Role = StatusMismatch, sb.Role()
		r.Reason = fmt.Sprintf("%s claims device number %d, which %s already holds", r.Name, sb.DevNumber, res.Members[j].Name)
		return
	}
	role := fresh.DevRoles[sb.DevNumber]
	r.Role = role
	freshName := res.Members[res.Freshest].Name
	// Too far behind to be current. What matters for a spare is only that
	// it is a spare (md ignores its contents); a member that still claims
	// a slot in its own superblock but was removed since is stale, as
	// mdadm --assemble judges it by its own superblock.
	stale := sb.Events+eventMargin < fresh.Events && (role < superblock.RoleMax || sb.Role() < superblock.RoleMax)
	switch {
	case role == superblock.RoleFaulty:
		r.Status = StatusFaulty
		if i == res.Freshest || sb.Role() == superblock.RoleFaulty {
			r.Reason = fmt.Sprintf("%s is marked faulty in its superblock", r.Name)
		} else {
			r.Reason = fmt.Sprintf("%s is marked faulty by the newer superblock on %s (events %d, its own %d)", r.Name, freshName, fresh.Events, sb.Events)
		}
		return
	case stale:
		r.Status = StatusStale
		r.Reason = fmt.Sprintf("%s has an out-of-date superblock (events %d, freshest %d on %s): not used, md kicks it as non-fresh", r.Name, sb.Events, fresh.Events, freshName)
		return
	case role == superblock.RoleSpare:
		r.Status = StatusSpare
		byDev[sb.DevNumber] = i
		return
	case role == superblock.RoleJournal || role >= superblock.RoleMax:
		r.Status = StatusMismatch
		r.Reason = fmt.Sprintf("%s has role %#x, which mdcluster does not support", r.Name, role)
		return
	case uint32(role) >= fresh.RaidDisks:
		r.Status = StatusMismatch
		r.Reason = fmt.Sprintf("%s has role %d but the array has %d raid devices", r.Name, role, fresh.RaidDisks)
		return
	}
	if i != res.Freshest && fresh.DevNumber < uint32(len(sb.DevRoles)) {
		// mdadm: a member that thinks the freshest one failed is from
		// the other side of a split and must not be combined with it.
		fr := fresh.DevRoles[fresh.DevNumber]
		if fr < superblock.RoleMax && sb.DevRoles[fresh.DevNumber] != fr {
			r.Status = StatusMismatch
			r.Reason = fmt.Sprintf("ignoring %s as it reports %s as failed", r.Name, freshName)
			return
		}
	}
	byDev[sb.DevNumber] = i
	r.Slot = int(role)
	if sb.FeatureMap&superblock.FeatureRecoveryOffset != 0 && sb.RecoveryOffset < sb.Size {
		r.Status = StatusRecovering
		r.Reason = fmt.Sprintf("%s is being rebuilt into slot %d: recovered up to sector %d of %d", r.Name, role, sb.RecoveryOffset, sb.Size)
		return
	}
	r.Status = StatusInSync
}

// shapeDiff names the first array-shape field (the ones mdadm compares
// before it assembles) in which b differs from a, or "".
func shapeDiff(a, b *superblock.Superblock) string {
	switch {
	case a.CTime != b.CTime:
		return "creation time differs"
	case a.Level != b.Level:
		return fmt.Sprintf("level %d, not %d", b.Level, a.Level)
	case a.Layout != b.Layout:
		return fmt.Sprintf("layout %#x, not %#x", b.Layout, a.Layout)
	case a.Size != b.Size:
		return fmt.Sprintf("used size %d sectors, not %d", b.Size, a.Size)
	case a.ChunkSize != b.ChunkSize:
		return fmt.Sprintf("chunk %d sectors, not %d", b.ChunkSize, a.ChunkSize)
	case a.RaidDisks != b.RaidDisks:
		return fmt.Sprintf("%d raid devices, not %d", b.RaidDisks, a.RaidDisks)
	}
	return ""
}

// readBitmap reads every bitmap slot a member's superblock points at.
func readBitmap(m Member, sb *superblock.Superblock) ([]*bitmap.Slot, error) {
	buf := make([]byte, bitmap.SuperblockSize)
	if _, err := m.ReadAt(buf, sb.BitmapStart()); err != nil {
		return nil, fmt.Errorf("bitmap of %s at byte %d: %w", m.Name(), sb.BitmapStart(), err)
	}
	bsb, err := bitmap.ParseSuperblock(buf)
	if err != nil {
		return nil, fmt.Errorf("bitmap of %s: %w", m.Name(), err)
	}
	if bsb.UUID != sb.SetUUID {
		return nil, fmt.Errorf("bitmap of %s belongs to array %s, not %s", m.Name(), bitmap.FormatUUID(bsb.UUID), bitmap.FormatUUID(sb.SetUUID))
	}
	l, err := bitmap.NewLayout(bsb, sb.BitmapStart(), bitmap.AlignFor(sb.BitmapOffset))
	if err != nil {
		return nil, fmt.Errorf("bitmap of %s: %w", m.Name(), err)
	}
	if sb.DataOffset > sb.SuperOffset {
		if err := l.CheckFits(0, int64(sb.DataOffset)*superblock.SectorSize); err != nil {
			return nil, fmt.Errorf("bitmap of %s: %w", m.Name(), err)
		}
	}
	slots := make([]*bitmap.Slot, l.Slots)
	for i := range slots {
		if slots[i], err = bitmap.ReadSlot(m, l, i); err != nil {
			return nil, fmt.Errorf("bitmap of %s: %w", m.Name(), err)
		}
	}
	return slots, nil
}

// Enough reports whether md can run an array of this level and layout
// when exactly the slots for which inSync returns true hold current data.
// raid1 needs one in-sync slot. raid10 needs a copy of every chunk: md
// checks every window of near*far consecutive slots, starting at slot 0 and
// stepping by the near copy count, for at least one in-sync slot. Other
// levels are not supported and return false.
func Enough(level int32, layout uint32, raidDisks int, inSync func(slot int) bool) bool {
	if raidDisks <= 0 {
		return false
	}
	switch level {
	case superblock.LevelRAID1:
		for s := 0; s < raidDisks; s++ {
			if inSync(s) {
				return true
			}
		}
		return false
	case superblock.LevelRAID10:
		near, far := int(layout&0xff), int(layout>>8&0xff)
		copies := near * far
		if near == 0 || copies == 0 {
			return false
		}
		first := 0
		for {
			ok := false
			for n, this := 0, first; n < copies; n++ {
				if inSync(this) {
					ok = true
					break
				}
				this = (this + 1) % raidDisks
			}
			if !ok {
				return false
			}
			first = (first + near) % raidDisks
			if first == 0 {
				return true
			}
		}
	}
	return false
}

// ---------------------------------------------------------------------------
// Superblock updates. md keeps one superblock per member; all of them carry
// the same array state (roles, events, times, resync position) and differ
// only in the per-device fields below. The helpers work on the shared
// contents and never modify their argument; WriteAll combines the shared
// contents with each member's own fields and writes them.

// perDeviceFeatures are the feature_map bits that describe one device, not
// the array: md sets them per member in super_1_sync.
const perDeviceFeatures = superblock.FeatureRecoveryOffset | superblock.FeatureRecoveryBitmap |
	superblock.FeatureReplacement | superblock.FeatureBadBlocks | superblock.FeatureNewOffset

// clone returns a deep copy of sb.
func clone(sb *superblock.Superblock) *superblock.Superblock {
	c := *sb
	c.DevRoles = append([]uint16(nil), sb.DevRoles...)
	return &c
}

// Compose returns the superblock md would write to the member whose own
// superblock is dev: everything from shared, except the fields that belong
// to the device itself and are kept from dev: dev_number, device UUID,
// super_offset, data_offset, data_size, new_offset, recovery_offset,
// devflags (write-mostly, failfast), the bad-block log position,
// cnt_corrected_read and the per-device feature bits (recovery offset,
// recovery bitmap, replacement, bad blocks, new offset). The checksum is
// recomputed.
func Compose(shared, dev *superblock.Superblock) *superblock.Superblock {
	out := clone(shared)
	out.DevNumber = dev.DevNumber
	out.DeviceUUID = dev.DeviceUUID
	out.SuperOffset = dev.SuperOffset
	out.DataOffset = dev.DataOffset
	out.DataSize = dev.DataSize
	out.NewOffset = dev.NewOffset
	out.RecoveryOffset = dev.RecoveryOffset
	out.DevFlags = dev.DevFlags
	out.BBLogShift, out.BBLogSize, out.BBLogOffset = dev.BBLogShift, dev.BBLogSize, dev.BBLogOffset
	out.CntCorrectedRead = dev.CntCorrectedRead
	out.FeatureMap = shared.FeatureMap&^perDeviceFeatures | dev.FeatureMap&perDeviceFeatures
	out.UpdateChecksum()
	return out
}

// roleAt returns the role of dev in sb, or an error naming the range.
func roleAt(sb *superblock.Superblock, dev uint32) (uint16, error) {
	if dev >= uint32(len(sb.DevRoles)) {
		return 0, fmt.Errorf("device number %d: the superblock has room for %d devices", dev, len(sb.DevRoles))
	}
	return sb.DevRoles[dev], nil
}

// Fail returns shared with device dev marked faulty (role 0xfffe), as md
// records a member that failed or was failed with mdadm --fail. The events
// are not bumped (see BumpEvents). Failing a device that is already faulty
// is an error. Fail does not check that the array survives: use Enough
// with the in-sync slots first, as md refuses to fail the last copy.
func Fail(shared *superblock.Superblock, dev uint32) (*superblock.Superblock, error) {
	role, err := roleAt(shared, dev)
	if err != nil {
		return nil, fmt.Errorf("fail: %w", err)
	}
	if role == superblock.RoleFaulty {
		return nil, fmt.Errorf("fail: device %d is already faulty", dev)
	}
	out := clone(shared)
	out.DevRoles[dev] = superblock.RoleFaulty
	return out, nil
}

// Remove returns shared with device dev removed from the array, as md
// records a hot remove: the device's role entry becomes unused (0xffff).
// Only faulty devices and spares can be removed; md refuses to remove an
// active one (mdadm: "hot remove failed for X: Device or resource busy").
func Remove(shared *superblock.Superblock, dev uint32) (*superblock.Superblock, error) {
	role, err := roleAt(shared, dev)
	if err != nil {
		return nil, fmt.Errorf("remove: %w", err)
	}
	if role != superblock.RoleFaulty && role != superblock.RoleSpare {
		return nil, fmt.Errorf("remove: device %d holds slot %d: hot remove failed: Device or resource busy (fail it first)", dev, role)
	}
	out := clone(shared)
	out.DevRoles[dev] = superblock.RoleSpare
	return out, nil
}

// AddSpare returns shared with a new spare device and its device number.
// The number is chosen as mdadm --add chooses it: the first number from
// raid_disks upwards that no member uses (inUse lists the device numbers of
// every member still attached, spares included, since a spare's role entry
// looks like an unused one) and whose role entry is not faulty. max_dev
// grows when the table is full, up to md's 1920.
func AddSpare(shared *superblock.Superblock, inUse []uint32) (*superblock.Superblock, uint32, error) {
	used := map[uint32]bool{}
	for _, d := range inUse {
		used[d] = true
	}
	for dev := shared.RaidDisks; dev < superblock.MaxDevs; dev++ {
		if used[dev] {
			continue
		}
		if dev < uint32(len(shared.DevRoles)) && shared.DevRoles[dev] != superblock.RoleSpare {
			continue
		}
		out := clone(shared)
		for uint32(len(out.DevRoles)) <= dev {
			out.DevRoles = append(out.DevRoles, superblock.RoleSpare)
		}
		out.MaxDev = uint32(len(out.DevRoles))
		return out, dev, nil
	}
	return nil, 0, fmt.Errorf("add spare: no free device number below %d", superblock.MaxDevs)
}

// Activate returns shared with device dev put into raid slot slot, the
// step md takes when it starts rebuilding onto a spare or re-adds a member
// that was removed. The slot must be empty (no device holds it, a faulty
// one does not count) and dev must be a spare or unused entry. The device
// itself must then carry a recovery offset (see Recovering) until the
// rebuild is complete (see InSync).
func Activate(shared *superblock.Superblock, dev uint32, slot int) (*superblock.Superblock, error) {
	role, err := roleAt(shared, dev)
	if err != nil {
		return nil, fmt.Errorf("activate: %w", err)
	}
	if slot < 0 || uint32(slot) >= shared.RaidDisks {
		return nil, fmt.Errorf("activate: slot %d out of range (the array has %d raid devices)", slot, shared.RaidDisks)
	}
	if role != superblock.RoleSpare {
		return nil, fmt.Errorf("activate: device %d is not a spare (role %#x)", dev, role)
	}
	for d, r := range shared.DevRoles {
		if r == uint16(slot) {
			return nil, fmt.Errorf("activate: slot %d is held by device %d", slot, d)
		}
	}
	out := clone(shared)
	out.DevRoles[dev] = uint16(slot)
	return out, nil
}

// ReAdd returns shared with the member whose own (old) superblock is dev
// put back into the slot it held, the way md re-adds a removed member: the
// device number and slot come from its superblock. It fails when the member
// never held a slot or the slot has been taken since. With a bitmap, only
// the chunks dirtied since the member left need rebuilding; the caller
// decides that from the bitmap's events_cleared before re-adding.
func ReAdd(shared, dev *superblock.Superblock) (*superblock.Superblock, error) {
	if dev.SetUUID != shared.SetUUID {
		return nil, fmt.Errorf("re-add: device belongs to array %s, not %s", bitmap.FormatUUID(dev.SetUUID), bitmap.FormatUUID(shared.SetUUID))
	}
	old := dev.Role()
	if old >= superblock.RoleMax {
		return nil, fmt.Errorf("re-add: device %d held no slot (role %#x): add it as a spare instead", dev.DevNumber, old)
	}
	out, err := Activate(shared, dev.DevNumber, int(old))
	if err != nil {
		return nil, fmt.Errorf("re-add: %w", err)
	}
	return out, nil
}

// BumpEvents returns shared with the event counter advanced by one and the
// update time set to now, what md does for every superblock update it
// writes (the md superblock stores whole seconds here).
func BumpEvents(shared *superblock.Superblock, now time.Time) *superblock.Superblock {
	out := clone(shared)
	out.Events++
	out.UTime = mdTime(now)
	return out
}

// Recovering returns the per-device superblock dev marked as rebuilt up to
// sector offset (relative to its data offset), as md writes it for a member
// in a slot that is not yet in sync. bitmapBased marks a re-add that only
// resyncs the chunks the bitmap names.
func Recovering(dev *superblock.Superblock, offset uint64, bitmapBased bool) *superblock.Superblock {
	out := clone(dev)
	out.FeatureMap |= superblock.FeatureRecoveryOffset
	out.FeatureMap &^= superblock.FeatureRecoveryBitmap
	if bitmapBased {
		out.FeatureMap |= superblock.FeatureRecoveryBitmap
	}
	out.RecoveryOffset = offset
	return out
}

// InSync returns the per-device superblock dev with the recovery fields
// cleared: the rebuild is complete and the member holds current data.
func InSync(dev *superblock.Superblock) *superblock.Superblock {
	out := clone(dev)
	out.FeatureMap &^= superblock.FeatureRecoveryOffset | superblock.FeatureRecoveryBitmap
	out.RecoveryOffset = 0
	return out
}

// NewDevice returns the superblock for a member joining the array as
// device number dev (after AddSpare): shared's contents, a fresh device
// UUID from rnd (crypto/rand when nil), the member's own data size, and the
// data offset and bad-block log position of like, the superblock of a
// current member (mdadm --add also starts from a current member's
// superblock). The per-device state is that of a new device: no recovery
// offset, no flags, no corrected reads. It fails when the member is too
// small to hold the array's used size (mdadm: "X not large enough to join
// array").
func NewDevice(shared, like *superblock.Superblock, dev uint32, m Member, rnd io.Reader) (*superblock.Superblock, error) {
	if like.SetUUID != shared.SetUUID {
		return nil, fmt.Errorf("new device: the template superblock belongs to array %s, not %s", bitmap.FormatUUID(like.SetUUID), bitmap.FormatUUID(shared.SetUUID))
	}
	if dev >= uint32(len(shared.DevRoles)) {
		return nil, fmt.Errorf("new device: device number %d: the superblock has room for %d devices", dev, len(shared.DevRoles))
	}
	sectors, err := memberSectors(m)
	if err != nil {
		return nil, fmt.Errorf("new device: %w", err)
	}
	if sectors < like.DataOffset || sectors-like.DataOffset < shared.Size {
		return nil, fmt.Errorf("%s not large enough to join array: %d sectors, the array needs %d (data offset %d + used size %d)", m.Name(), sectors, like.DataOffset+shared.Size, like.DataOffset, shared.Size)
	}
	out := clone(shared)
	out.DevNumber = dev
	if rnd == nil {
		rnd = cryptoRand
	}
	if _, err := io.ReadFull(rnd, out.DeviceUUID[:]); err != nil {
		return nil, fmt.Errorf("new device: device UUID: %w", err)
	}
	out.SuperOffset = like.SuperOffset
	out.DataOffset = like.DataOffset
	out.DataSize = sectors - like.DataOffset
	out.BBLogShift, out.BBLogSize, out.BBLogOffset = like.BBLogShift, like.BBLogSize, like.BBLogOffset
	out.NewOffset, out.RecoveryOffset, out.DevFlags, out.CntCorrectedRead = 0, 0, 0, 0
	out.FeatureMap &^= perDeviceFeatures
	out.UpdateChecksum()
	if err := out.Validate(sectors); err != nil {
		return nil, fmt.Errorf("new device %s: %w", m.Name(), err)
	}
	return out, nil
}

// CopyBitmap gives a member joining the array (see NewDevice) the array's
// bitmap: it copies every bitmap slot, bits and padding included, from src,
// a current member, to dst, after checking that src's bitmap belongs to
// shared's array and fits before dst's data. The joining member then holds
// what every other member holds, so md may read the bitmap from it later.
// (mdadm --add instead writes a fresh bitmap with slot 0 all dirty, and in
// 4.2 only one slot even for clustered arrays; md never reads a spare's
// bitmap, but a copy stays correct once the member is in sync.) Arrays
// without a bitmap need nothing; CopyBitmap then does nothing.
func CopyBitmap(shared *superblock.Superblock, src, dst Member) error {
	if !shared.HasBitmap() {
		return nil
	}
	slots, err := readBitmap(src, shared)
	if err != nil {
		return fmt.Errorf("copy bitmap: %w", err)
	}
	l, err := bitmap.NewLayout(&slots[0].Super, shared.BitmapStart(), bitmap.AlignFor(shared.BitmapOffset))
	if err != nil {
		return fmt.Errorf("copy bitmap: %w", err)
	}
	sectors, err := memberSectors(dst)
	if err != nil {
		return fmt.Errorf("copy bitmap: %w", err)
	}
	if l.End() > int64(min(sectors, shared.DataOffset))*superblock.SectorSize {
		return fmt.Errorf("copy bitmap: %s: the bitmap (bytes %d..%d) does not fit before the data", dst.Name(), l.Start, l.End())
	}
	buf := make([]byte, l.End()-l.Start)
	if _, err := src.ReadAt(buf, l.Start); err != nil {
		return fmt.Errorf("copy bitmap: read %s: %w", src.Name(), err)
	}
	if _, err := dst.WriteAt(buf, l.Start); err != nil {
		return fmt.Errorf("copy bitmap: write %s: %w", dst.Name(), err)
	}
	return nil
}

// Device is a member together with its own superblock, the unit WriteAll
// writes to.
type Device struct {
	Member Member
	// Super is the member's superblock as last read or written; WriteAll
	// keeps its per-device fields (see Compose).
	Super *superblock.Superblock
}

// WriteError reports the members WriteAll could not write. The others
// were written; md would now fail the listed members.
type WriteError struct {
	Failed []string
	Err    error
}

// Error lists the failed members and their errors.
func (e *WriteError) Error() string {
	return fmt.Sprintf("superblock update failed on %d member(s): %v", len(e.Failed), e.Err)
}

// Unwrap returns the joined per-member errors.
func (e *WriteError) Unwrap() error { return e.Err }

// WriteAll writes the shared superblock contents to every working device,
// the way md_update_sb does: faulty devices (by shared's roles) and devices
// outside the table are skipped, every other device gets Compose(shared,
// its own superblock) with a fresh checksum, followed by Sync. For an
// internal, non-clustered bitmap it first brings the bitmap superblock's
// event counter up to the new events, as md does before it writes the md
// superblock; otherwise md would find the bitmap older than the array at
// the next assembly and force a full resync. Clustered bitmap slots belong
// to their nodes and are not touched (md does not compare their events).
//
// Everything is checked before anything is written. It returns the
// superblock written to each device (nil for skipped ones); a *WriteError
// lists devices whose write failed while the others were written.
func WriteAll(shared *superblock.Superblock, devs []Device) ([]*superblock.Superblock, error) {
	out := make([]*superblock.Superblock, len(devs))
	blocks := make([][]byte, len(devs))
	for i, d := range devs {
		if d.Member == nil || d.Super == nil {
			return nil, fmt.Errorf("write superblocks: device %d: no member or superblock", i)
		}
		if d.Super.SetUUID != shared.SetUUID {
			return nil, fmt.Errorf("write superblocks: %s belongs to array %s, not %s", d.Member.Name(), bitmap.FormatUUID(d.Super.SetUUID), bitmap.FormatUUID(shared.SetUUID))
		}
		if d.Super.DevNumber >= uint32(len(shared.DevRoles)) || shared.DevRoles[d.Super.DevNumber] == superblock.RoleFaulty {
			continue
		}
		sb := Compose(shared, d.Super)
		b, err := encodeSuper(sb)
		if err != nil {
			return nil, fmt.Errorf("write superblocks: %s: %w", d.Member.Name(), err)
		}
		out[i], blocks[i] = sb, b
	}
	var failed []string
	var errs []error
	for i, d := range devs {
		if out[i] == nil {
			continue
		}
		err := writeOne(d.Member, out[i], blocks[i])
		if err != nil {
			failed = append(failed, d.Member.Name())
			errs = append(errs, err)
			out[i] = nil
		}
	}
	if len(failed) > 0 {
		return out, &WriteError{Failed: failed, Err: errors.Join(errs...)}
	}
	return out, nil
}

// writeOne writes one member's bitmap events (non-clustered internal
// bitmap) and superblock, then syncs it.
func writeOne(m Member, sb *superblock.Superblock, block []byte) error {
	if sb.HasBitmap() && sb.FeatureMap&superblock.FeatureClustered == 0 {
		buf := make([]byte, bitmap.SuperblockSize)
		if _, err := m.ReadAt(buf, sb.BitmapStart()); err != nil {
			return fmt.Errorf("%s: read bitmap superblock: %w", m.Name(), err)
		}
		var bsb bitmap.Superblock
		_ = bsb.UnmarshalBinary(buf)
		if bsb.Magic == bitmap.Magic && bsb.UUID == sb.SetUUID && bsb.Nodes == 0 && bsb.Events != sb.Events {
			bsb.Events = sb.Events
			if bsb.EventsCleared > bsb.Events {
				bsb.EventsCleared = bsb.Events
			}
			b, _ := bsb.MarshalBinary()
			if _, err := m.WriteAt(b, sb.BitmapStart()); err != nil {
				return fmt.Errorf("%s: write bitmap superblock: %w", m.Name(), err)
			}
		}
	}
	if _, err := m.WriteAt(block, int64(sb.SuperOffset)*superblock.SectorSize); err != nil {
		return fmt.Errorf("%s: write superblock at sector %d: %w", m.Name(), sb.SuperOffset, err)
	}
	return m.Sync()
}

// encodeSuper returns the bytes md writes for sb: the superblock and its
// role table, zero-padded to a whole number of 512-byte sectors (md's
// sb_size; mdadm writes the same amount). The rest of the 4 KiB block is
// left alone, since an internal bitmap may start right after it.
func encodeSuper(sb *superblock.Superblock) ([]byte, error) {
	b, err := sb.MarshalBinary()
	if err != nil {
		return nil, err
	}
	n := (len(b) + superblock.SectorSize - 1) / superblock.SectorSize * superblock.SectorSize
	if n > len(b) {
		b = append(b, make([]byte, n-len(b))...)
	}
	return b, nil
}

// mdTime converts a time to md's superblock time: whole seconds in the low
// 40 bits (the high 24 bits would hold microseconds; mdadm and md's own
// superblock writes leave them zero).
func mdTime(t time.Time) uint64 {
	s := t.Unix()
	if s < 0 {
		s = 0
	}
	return uint64(s) & (1<<40 - 1)
}

// timeFrom converts md's superblock time back (seconds only).
func timeFrom(v uint64) time.Time { return time.Unix(int64(v&(1<<40-1)), 0) }
