// Package config reads and checks mdclusterd's configuration file (TOML).
//
// Load refuses a file with any problem at all, and names each one with the
// file, the line and the field, e.g.
//
//	/etc/mdcluster/mdclusterd.toml:12: quorum.m: 1 of 3 data nodes is not a majority (need at least 2)
//
// Unknown keys are errors, so a misspelt setting never silently keeps its
// default. Load only reads: it creates no file or directory and starts
// nothing, so `mdclusterd --check-config` and a refused start leave the
// machine as they found it. Every field is documented in docs/daemon.md and
// packaging/mdclusterd.toml.example.
//
// The parser is github.com/pelletier/go-toml/v2: its decoder reports syntax
// errors with their line, and its syntax tree (package unstable) gives every
// key's line, which the checks here use.
package config

import (
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
)

// Config is a checked configuration. Every field holds a valid value
// (defaults filled in), and ClusterKey holds the key read from
// ClusterKeyFile.
type Config struct {
	// Path is the file the configuration was read from.
	Path string
	// NodeID is this node's ID (node_id).
	NodeID ddraid.NodeID
	// Profile is the timing profile (profile).
	Profile Profile
	// DataDir holds the node's state store (data_dir). It is created, mode
	// 0700, when the daemon starts, if missing.
	DataDir string
	// ClusterKeyFile is where the key was read from (cluster_key_file);
	// ClusterKey is the decoded key, at least MinKeyBytes long.
	ClusterKeyFile string
	ClusterKey     []byte

	Gossip   Gossip
	DLM      DLM
	Quorum   ddraid.Config
	Fencing  Fencing
	Devices  Devices
	RAID     RAID
	Lease    Lease
	Arrays   []Array
	Log      Log
	Metrics  Metrics
	Control  Control
	Shutdown Shutdown
}

// Profile selects the node runtime's timings (mdcluster/node profiles).
type Profile string

// The profiles.
const (
	// ProfileLAN is node.DefaultLANConfig: tolerant of busy hosts, a
	// crashed node is declared dead after about 5-7 s.
	ProfileLAN Profile = "lan"
	// ProfileStorageLAN is node.StorageLANConfig: for a dedicated, lightly
	// loaded storage network; a crash is detected in about 0.5 s.
	ProfileStorageLAN Profile = "storage-lan"
	// ProfileVM is node.VMConfig: for nodes that are virtual machines on
	// shared or overcommitted hosts (a guest may stall for up to about a
	// second without being excluded); a crash is detected in about 1.3-2 s.
	ProfileVM Profile = "vm"
)

// Gossip is the failure detector's endpoint and the seeds it joins.
type Gossip struct {
	// BindAddr is this node's storage-network IP address; it is advertised
	// to the others, so it may not be a wildcard.
	BindAddr string
	// Port is the UDP and TCP port (the same for both).
	Port int
	// Seeds are other nodes' gossip endpoints, "host:port".
	Seeds []string
}

// DLM is the lock manager's transport endpoint.
type DLM struct {
	// ListenAddr is where the DLM accepts peers, "host:port" (the host may
	// be a wildcard; port 0 picks one at each start).
	ListenAddr string
	// AdvertiseAddr is the address published to the other nodes; empty
	// means the listen address with a wildcard host replaced by the gossip
	// bind address.
	AdvertiseAddr string
}

// Fencing is how failed nodes are fenced.
type Fencing struct {
	// Timeout bounds one fence attempt (all levels); a timeout is a failure
	// and the attempt is repeated.
	Timeout time.Duration
	// Levels are tried in order until one succeeds.
	Levels []FenceLevel
}

// FenceLevel is one fencing level: either the storage generation stamp, or
// a list of agents that must all succeed (Pacemaker's fencing-topology
// rule: e.g. both power supplies of a node).
type FenceLevel struct {
	Stamp  bool
	Agents []FenceAgent
}

// FenceAgent is one ClusterLabs fence agent invocation.
type FenceAgent struct {
	// Path is the agent's executable.
	Path string
	// Options are passed on the agent's stdin as key=value lines.
	Options map[string]string
	// NodeOptions override Options for one victim (port, plug, ipaddr).
	NodeOptions map[ddraid.NodeID]map[string]string
	// Timeout bounds one invocation (0: the fence package's default).
	Timeout time.Duration
	// Verify runs action=status after the off and requires "off".
	Verify bool
}

// Devices says where member devices are looked for.
type Devices struct {
	// Search are glob patterns (filepath.Match syntax) of device paths.
	Search []string
	// Shared (devices.shared_kernel) leaves O_EXCL out of member opens.
	// O_EXCL keeps a local md array or file system off a member, but it
	// is system-wide: several nodes under one kernel (a test cluster of
	// daemons in network namespaces over the same loop devices) would
	// lock each other out. Never set it on a real node.
	Shared bool
}

// RAID configures the RAID engine of every array (md's sysctls).
type RAID struct {
	// SpeedLimitMin and SpeedLimitMax are md's speed_limit_min/max in
	// KiB/s: a resync or recovery runs at up to SpeedLimitMax while the
	// array has no other I/O, and yields down to SpeedLimitMin while it
	// has.
	SpeedLimitMin, SpeedLimitMax int64
	// HoldWait bounds how long a client's request waits while its array
	// re-joins the cluster after this node was excluded and readmitted
	// (the manager holds I/O meanwhile) before it fails with an I/O
	// error. Clients of a block device retry or fail their own way; a
	// short hold turns a brief re-join into a delay instead of an error.
	HoldWait time.Duration
	// RejoinLimit is how long a readmitted node keeps trying to re-join
	// an array before it gives up and marks the array failed on this node.
	RejoinLimit time.Duration
}

// Lease configures storage fencing's I/O lease (mdcluster/lease): each
// running array re-reads the generation stamp on its members at least
// every Duration/2 and stops its I/O when it cannot, when the stamp is
// newer than the node's view, or when the node loses quorum.
type Lease struct {
	// Enabled turns the lease on (the default). Off, nothing stops array
	// I/O on a node that lost quorum or was fenced through the stamp, so
	// the stamp fencing level is refused.
	Enabled bool
	// Duration is how long one good stamp read allows I/O for.
	Duration time.Duration
	// Margin is added to Duration by the stamp fencing level before its
	// fence counts as done (see docs/quorum-and-fencing.md); with a
	// watchdog it must cover the watchdog's timeout plus Duration/2.
	Margin time.Duration
	// StopWait is how long a new request waits for a stopped lease to
	// come back before it fails. A stamp fence stops every survivor's I/O
	// for FenceWait (until the new view is installed), so with the stamp
	// level StopWait must be at least that; the default is the larger of
	// DefaultLeaseStopWait and FenceWait + Duration.
	StopWait time.Duration
	// Watchdog is the watchdog device to arm (e.g. /dev/watchdog, softdog);
	// empty: none. It is pinged only while every running array's stamp
	// reads complete, so a node whose disk path hangs is reset.
	Watchdog string
	// WatchdogTimeout is the watchdog's timeout.
	WatchdogTimeout time.Duration
}

// FenceWait is how long the stamp fencing level waits after stamping.
func (l Lease) FenceWait() time.Duration { return l.Duration + l.Margin }

// Array is an array to assemble at start and where to export it.
type Array struct {
	// Name or UUID identifies the array (exactly one is set). UUID is
	// normalised to mdadm's form, "xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx".
	Name string
	UUID string
	// ExportSocket is the unix socket path of its NBD export.
	ExportSocket string
	// ExportTCP is an optional loopback TCP address of its NBD export.
	ExportTCP string
	// NBDDevice, when set ("/dev/nbdN"), also attaches the export to the
	// kernel's NBD client as that device while the array runs here.
	NBDDevice string
}

// Log configures the daemon's log (slog, to stderr).
type Log struct {
	// Format is "text" or "json".
	Format string
	// Level is "debug", "info", "warn" or "error".
	Level string
}

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	// Listen is the HTTP address serving /metrics; empty disables it.
	Listen string
	// MaxConnections bounds concurrent HTTP connections to it.
	MaxConnections int
}

// Control configures the control socket.
type Control struct {
	// Socket is the unix socket's path; its directory is created mode 0700
	// if missing and must not be writable by anyone but root.
	Socket string
	// MaxRequestBytes bounds one request body.
	MaxRequestBytes int
	// MaxConnections bounds concurrent connections; more are refused with
	// code "busy".
	MaxConnections int
	// IdleTimeout closes a connection that sends nothing for this long
	// (and bounds how long one request may take to arrive).
	IdleTimeout time.Duration
	// RefusedLogInterval limits the log lines about refused (non-root)
	// peers to one per interval; the others are counted.
	RefusedLogInterval time.Duration
}

// Shutdown configures the graceful stop.
type Shutdown struct {
	// LeaveTimeout bounds the graceful leave on SIGTERM, SIGINT or the
	// leave command; past it the node stops anyway (the others then see a
	// failure and fence it).
	LeaveTimeout time.Duration
}

// Defaults of optional fields.
const (
	DefaultGossipPort         = 7946
	DefaultFenceTimeout       = 60 * time.Second
	DefaultLogFormat          = "text"
	DefaultLogLevel           = "info"
	DefaultMetricsConnections = 16
	DefaultControlConnections = 16
	DefaultIdleTimeout        = 30 * time.Second
	DefaultRefusedLogInterval = time.Minute
	DefaultLeaveTimeout       = 30 * time.Second
	DefaultSpeedLimitMin      = 1000   // KiB/s, md's
	DefaultSpeedLimitMax      = 200000 // KiB/s, md's
	DefaultHoldWait           = 30 * time.Second
	DefaultRejoinLimit        = 5 * time.Minute
	DefaultLeaseDuration      = 10 * time.Second
	DefaultLeaseMargin        = 5 * time.Second
	DefaultLeaseStopWait      = 5 * time.Second
	DefaultWatchdogTimeout    = 10 * time.Second
	// MaxFileBytes bounds the configuration file.
	MaxFileBytes = 1 << 20
)

// Error is one problem in a configuration file: where it is and what is
// wrong. Line is 0 when the problem is not tied to a line (e.g. a required
// key that is missing altogether); Field is empty for a syntax error.
type Error struct {
	File  string
	Line  int
	Field string
	Msg   string
}

// Error formats the problem as "file:line: field: message".
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem Load found, in file order. Its Error has one
// problem per line.
type Errors []*Error

// Error joins the problems, one per line.
func (es Errors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Unwrap exposes each problem to errors.As.
func (es Errors) Unwrap() []error {
	out := make([]error, len(es))
	for i, e := range es {
		out[i] = e
	}
	return out
}

// sortErrors orders problems by line (file-level ones first) and field,
// and drops exact duplicates.
func sortErrors(es []*Error) Errors {
	sort.SliceStable(es, func(i, j int) bool {
		if es[i].Line != es[j].Line {
			return es[i].Line < es[j].Line
		}
		return es[i].Field < es[j].Field
	})
	out := es[:0]
	for i, e := range es {
		if i > 0 && *e == *es[i-1] {
			continue
		}
		out = append(out, e)
	}
	return Errors(out)
}

// ErrInvalid is matched (errors.Is) by every error Load returns for a bad
// file, as opposed to one it could not read.
var ErrInvalid = errors.New("invalid configuration")

// Is makes errors.Is(err, ErrInvalid) hold for a list of problems.
func (es Errors) Is(target error) bool { return target == ErrInvalid }
