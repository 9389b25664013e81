package ctl

import "time"

// Array commands added with the mdadm-style CLI. Their argument and result
// types are below; the daemon's array manager implements them. An array is
// named as mdadm names it, by its md device ("/dev/md0") or, where a
// command allows, by its name.
const (
	CmdArrayAddSpare       = "array.add_spare"
	CmdArrayClusterConfirm = "array.cluster_confirm"
	CmdArrayReadwrite      = "array.readwrite"
	CmdArrayWait           = "array.wait"
	CmdArrayGrow           = "array.grow"
)

// Bitmap modes for CreateArgs.Bitmap and GrowArgs.Bitmap (mdadm's
// --bitmap values); "" leaves the choice to the daemon.
const (
	BitmapInternal  = "internal"
	BitmapClustered = "clustered"
	BitmapNone      = "none"
)

// CreateArgs are CmdArrayCreate's arguments: mdadm --create. Sizes are in
// bytes; zero values mean mdadm's defaults (see array.CreateSpec). Result:
// CreateResult.
type CreateArgs struct {
	// Array is the md device to create ("/dev/md0").
	Array string `json:"array"`
	// Level is 1 or 10.
	Level int `json:"level"`
	// RaidDevices is --raid-devices.
	RaidDevices int `json:"raid_devices"`
	// Devices are the member devices in order; "missing" leaves a slot
	// empty. Devices beyond RaidDevices become spares.
	Devices []string `json:"devices"`
	// Layout is --layout for raid10 ("n2", "f2", "o2").
	Layout string `json:"layout,omitempty"`
	// ChunkSize is --chunk in bytes (raid10).
	ChunkSize int64 `json:"chunk_size,omitempty"`
	// Bitmap is --bitmap: BitmapInternal, BitmapClustered, BitmapNone or "".
	Bitmap string `json:"bitmap,omitempty"`
	// BitmapChunk is --bitmap-chunk in bytes.
	BitmapChunk int64 `json:"bitmap_chunk,omitempty"`
	// Nodes is --nodes (clustered bitmaps).
	Nodes int `json:"nodes,omitempty"`
	// HomeCluster is --home-cluster; "" lets the daemon use its cluster's name.
	HomeCluster string `json:"home_cluster,omitempty"`
	// Name is --name; Homehost is --homehost as given ("" = the daemon's host).
	Name     string `json:"name,omitempty"`
	Homehost string `json:"homehost,omitempty"`
	// AssumeClean, Run and Force are --assume-clean, --run and --force.
	AssumeClean bool `json:"assume_clean,omitempty"`
	Run         bool `json:"run,omitempty"`
	Force       bool `json:"force,omitempty"`
}

// CreateResult is CmdArrayCreate's result.
type CreateResult struct {
	// Array is the md device created; Started is true once it runs.
	Array   string `json:"array"`
	Started bool   `json:"started"`
	// Warnings are printed as mdadm prints its warnings ("mdadm: ...").
	Warnings []string `json:"warnings,omitempty"`
}

// AssembleArgs are CmdArrayAssemble's arguments: mdadm --assemble.
// Result: AssembleResult.
type AssembleArgs struct {
	// Array is the md device; with Scan and no Array every array of the
	// daemon's configuration is assembled.
	Array string `json:"array,omitempty"`
	// Devices are the members to look at; none means the devices the
	// daemon's configuration lists for the array.
	Devices []string `json:"devices,omitempty"`
	// UUID (mdadm's "xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx") and Name select
	// the members that belong.
	UUID string `json:"uuid,omitempty"`
	Name string `json:"name,omitempty"`
	Scan bool   `json:"scan,omitempty"`
	// Force and Run are --force and --run (start degraded).
	Force bool `json:"force,omitempty"`
	Run   bool `json:"run,omitempty"`
	// Readonly is --readonly.
	Readonly bool `json:"readonly,omitempty"`
}

// AssembleResult is CmdArrayAssemble's result: one entry per array.
type AssembleResult struct {
	Arrays []Assembled `json:"arrays"`
}

// Assembled describes one assembled array, for mdadm's "has been started
// with N drives (out of M) and K spares" line.
type Assembled struct {
	Array       string   `json:"array"`
	Drives      int      `json:"drives"`
	RaidDevices int      `json:"raid_devices"`
	Spares      int      `json:"spares"`
	Started     bool     `json:"started"`
	Warnings    []string `json:"warnings,omitempty"`
}

// DevicesArgs are the arguments of the Manage commands that act on member
// devices: CmdArrayAdd, CmdArrayAddSpare, CmdArrayRemove, CmdArrayFail and
// CmdArrayReAdd. Devices are device names or, as mdadm allows, keywords:
// "failed"/"faulty", "detached", "set-A".. for remove and fail, "missing"
// for re-add. Result: DevicesResult.
type DevicesArgs struct {
	Array   string   `json:"array"`
	Devices []string `json:"devices"`
	// Force is --force.
	Force bool `json:"force,omitempty"`
}

// DevicesResult lists what was done to each device, in order, for mdadm's
// messages ("added /dev/sdX", "hot removed /dev/sdX from /dev/md0", "set
// /dev/sdX faulty in /dev/md0", "re-added /dev/sdX"). A device a keyword
// expanded to appears under its own name.
type DevicesResult struct {
	Devices []DeviceOutcome `json:"devices"`
}

// DeviceOutcome is one device's outcome. Action is "added", "re-added",
// "removed" or "failed" when it succeeded; Error says why it did not (the
// text after "mdadm: ", e.g. "hot remove failed for /dev/sdb: Device or
// resource busy"), and Busy marks an EBUSY failure (mdadm exits 2 for a
// busy --fail).
type DeviceOutcome struct {
	Device string `json:"device"`
	Action string `json:"action,omitempty"`
	Error  string `json:"error,omitempty"`
	Busy   bool   `json:"busy,omitempty"`
}

// ClusterConfirmArgs are CmdArrayClusterConfirm's arguments: mdadm
// --cluster-confirm SLOT:DEVICE or SLOT:missing, the answer to another
// node's clustered --add. Result: DevicesResult.
type ClusterConfirmArgs struct {
	Array    string           `json:"array"`
	Confirms []ClusterConfirm `json:"confirms"`
}

// ClusterConfirm is one SLOT:DEVICE pair; Device "missing" declines.
type ClusterConfirm struct {
	Slot   int    `json:"slot"`
	Device string `json:"device"`
}

// ArrayArgs names one array: the arguments of CmdArrayDetail,
// CmdArrayStop, CmdArrayReadwrite and CmdArrayWait. Results: Detail,
// none, none, WaitResult.
type ArrayArgs struct {
	Array string `json:"array"`
}

// WaitResult is CmdArrayWait's result, sent once no resync, recovery or
// reshape runs any more. Waited is false when nothing was running when the
// request arrived (mdadm --wait then exits 1).
type WaitResult struct {
	Waited bool `json:"waited"`
}

// GrowArgs are CmdArrayGrow's arguments: mdadm --grow --bitmap=... Result:
// none.
type GrowArgs struct {
	Array       string `json:"array"`
	Bitmap      string `json:"bitmap"`
	BitmapChunk int64  `json:"bitmap_chunk,omitempty"`
	Nodes       int    `json:"nodes,omitempty"`
	Force       bool   `json:"force,omitempty"`
}

// Detail is CmdArrayDetail's result: what mdadm --detail prints, from
// array.Inspect plus the array's runtime state. mdadm-go renders it in
// mdadm 4.2's layout; each field names the line it feeds.
type Detail struct {
	// Array is the md device ("/dev/md0"), the first line.
	Array string `json:"array"`
	// Version is the metadata version ("1.2").
	Version string `json:"version"`
	// Created and Updated are Creation Time and Update Time.
	Created time.Time `json:"created"`
	Updated time.Time `json:"updated"`
	// Level is 1 or 10; Layout md's raid10 layout word; ChunkKiB the
	// raid10 chunk.
	Level    int    `json:"level"`
	Layout   uint32 `json:"layout,omitempty"`
	ChunkKiB int    `json:"chunk_kib,omitempty"`
	// ArrayKiB is Array Size; UsedDevKiB Used Dev Size (0: "unknown").
	ArrayKiB   uint64 `json:"array_kib"`
	UsedDevKiB uint64 `json:"used_dev_kib"`
	// RaidDevices and TotalDevices are Raid Devices and Total Devices.
	RaidDevices  int `json:"raid_devices"`
	TotalDevices int `json:"total_devices"`
	// Bitmap is BitmapInternal, BitmapClustered or BitmapNone.
	Bitmap string `json:"bitmap"`
	// State is the State line's base word: "clean", "active" or "inactive".
	State string `json:"state"`
	// Degraded (some slot lacks an in-sync member) and Failed (too few
	// for the array to work) add ", degraded" / ", FAILED".
	Degraded bool `json:"degraded,omitempty"`
	Failed   bool `json:"failed,omitempty"`
	// NotStarted adds ", Not Started".
	NotStarted bool `json:"not_started,omitempty"`
	// Sync is the running (or pending) resync, recovery, reshape or check.
	Sync *Sync `json:"sync,omitempty"`
	// Device counts: Active, Working, Failed and Spare Devices.
	ActiveDevices  int `json:"active_devices"`
	WorkingDevices int `json:"working_devices"`
	FailedDevices  int `json:"failed_devices"`
	SpareDevices   int `json:"spare_devices"`
	// ConsistencyPolicy is "none", "resync" or "bitmap".
	ConsistencyPolicy string `json:"consistency_policy"`
	// Name is the stored name ("host:name"); ClusterName the clustered
	// bitmap's cluster name (printed only for clustered arrays).
	Name        string `json:"name"`
	ClusterName string `json:"cluster_name,omitempty"`
	// UUID is the array UUID in mdadm's form (xxxxxxxx:xxxxxxxx:...).
	UUID   string `json:"uuid"`
	Events uint64 `json:"events"`
	// Devices are the device table's rows: one per raid slot in slot order
	// (an empty slot as a row with Number -1 and State {Removed}), then the
	// members outside the slots (spares, faulty).
	Devices []DetailDevice `json:"devices"`
}

// Sync is a running or pending resync, recovery, reshape or check, as
// /proc/mdstat shows it.
type Sync struct {
	// Action is "resync", "recovery", "reshape" or "check".
	Action string `json:"action"`
	// DoneKiB of TotalKiB are done (1 KiB blocks, as mdstat counts).
	DoneKiB  uint64 `json:"done_kib"`
	TotalKiB uint64 `json:"total_kib"`
	// SpeedKiB is the current speed in KiB/s (0: unknown).
	SpeedKiB uint64 `json:"speed_kib,omitempty"`
	// Special is "", "PENDING", "DELAYED" or "REMOTE" (another node of
	// the cluster runs it); then the counters are not shown.
	Special string `json:"special,omitempty"`
}

// DetailDevice is one row of --detail's device table. Number and
// RaidDevice are -1 for "-"; Major and Minor are the device numbers (0 for
// a non-block member or an empty slot).
type DetailDevice struct {
	Number     int  `json:"number"`
	Major      int  `json:"major"`
	Minor      int  `json:"minor"`
	RaidDevice int  `json:"raid_device"`
	Faulty     bool `json:"faulty,omitempty"`
	Active     bool `json:"active,omitempty"`
	InSync     bool `json:"in_sync,omitempty"`
	Removed    bool `json:"removed,omitempty"`
	// WriteMostly, FailFast and Replacement are the member's flags.
	WriteMostly bool `json:"write_mostly,omitempty"`
	FailFast    bool `json:"fail_fast,omitempty"`
	Replacement bool `json:"replacement,omitempty"`
	// Device is the member's name ("/dev/sdb1", "/dev/nbd0"); "" prints
	// nothing after the state words.
	Device string `json:"device,omitempty"`
}

// ArrayList is CmdArrayList's result: every array the daemon runs or
// knows, for the /proc/mdstat-style view.
type ArrayList struct {
	Arrays []ArrayStatus `json:"arrays"`
}

// ArrayStatus is one array in the /proc/mdstat-style view.
type ArrayStatus struct {
	// Name is the md device's kernel name ("md0").
	Name string `json:"name"`
	// Active is false for an assembled but not running array ("inactive").
	Active bool `json:"active"`
	// Readonly marks "(read-only)".
	Readonly bool `json:"readonly,omitempty"`
	// Level is 1 or 10.
	Level int `json:"level"`
	// Members in mdstat's order.
	Members []MdstatMember `json:"members"`
	// BlocksKiB is the array size in 1 KiB blocks; Version "1.2".
	BlocksKiB uint64 `json:"blocks_kib"`
	Version   string `json:"version"`
	// ChunkKiB and Layout are raid10's ("512K chunks 2 near-copies").
	ChunkKiB int    `json:"chunk_kib,omitempty"`
	Layout   uint32 `json:"layout,omitempty"`
	// RaidDevices and InSync give "[n/m]"; Slots "[UU_]" (true = U).
	RaidDevices int    `json:"raid_devices"`
	Slots       []bool `json:"slots"`
	Sync        *Sync  `json:"sync,omitempty"`
	// Bitmap is the bitmap line's numbers; nil for none.
	Bitmap *MdstatBitmap `json:"bitmap,omitempty"`
}

// MdstatMember is one member of an ArrayStatus: " name[n]" with its flags.
type MdstatMember struct {
	Name        string `json:"name"`
	Number      int    `json:"number"`
	WriteMostly bool   `json:"write_mostly,omitempty"`
	Faulty      bool   `json:"faulty,omitempty"`
	Spare       bool   `json:"spare,omitempty"`
	Replacement bool   `json:"replacement,omitempty"`
}

// MdstatBitmap is "bitmap: P/T pages [KKB], CKB chunk".
type MdstatBitmap struct {
	Pages      uint64 `json:"pages"`
	TotalPages uint64 `json:"total_pages"`
	ChunkBytes uint64 `json:"chunk_bytes"`
}
