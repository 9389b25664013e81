package main

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/ctl"
)

var utc = time.UTC

const pollForTests = 5 * time.Millisecond

// TestBadArguments: every verb's bad input is refused with mdadm's text
// and exit status, and no request reaches the daemon.
func TestBadArguments(t *testing.T) {
	cases := []struct {
		args   []string
		exit   int
		stderr string
	}{
		// getopt-level errors
		{[]string{"--frobnicate"}, 2, "mdadm-go: unrecognized option '--frobnicate'\nUsage: mdadm-go --help\n  for help\n"},
		{[]string{"-C", "/dev/md0", "-Z"}, 2, "mdadm-go: invalid option -- 'Z'\n"},
		{[]string{"--create", "/dev/md0", "--level"}, 2, "mdadm-go: option '--level' requires an argument\n"},
		{[]string{"-C", "/dev/md0", "-l"}, 2, "mdadm-go: option requires an argument -- 'l'\n"},
		{[]string{"--stop=yes", "/dev/md0"}, 2, "mdadm-go: option '--stop' doesn't allow an argument\n"},
		{[]string{"--re", "/dev/md0"}, 2, "mdadm-go: option '--re' is ambiguous; possibilities: '--remove' '--re-add' '--readwrite' '--readonly'\n"},
		{nil, 2, "Usage: mdadm-go --help\n  for help\n"},
		// mode rules
		{[]string{"--create", "/dev/md0", "--assemble"}, 2, "mdadm-go: --assemble would set mdadm mode to \"assemble\", but it is already set to \"create\".\n"},
		{[]string{"-C", "-D", "/dev/md0"}, 2, "mdadm-go: -D would set mdadm mode to \"misc\", but it is already set to \"create\".\n"},
		{[]string{"--level=1", "/dev/md0"}, 2, "mdadm-go: --level does not set the mode, and so cannot be the first option.\n"},
		{[]string{"/dev/md0", "/dev/md1"}, 2, "mdadm-go: An option must be given to set the mode before a second device\n       (/dev/md1) is listed\n"},
		{[]string{"/dev/md0", "--detail"}, 2, "mdadm-go: No action given for /dev/md0 in --misc mode\n          Action options must come before device names\n"},
		{[]string{"/dev/md0"}, 2, "mdadm-go: no mode given for /dev/md0"},
		{[]string{"--create", "/dev/md0", "--add"}, 2, "mdadm-go: :option --add not valid in create mode\n"},
		{[]string{"--assemble", "/dev/md0", "-n", "2"}, 2, "mdadm-go: option -n not valid in assemble mode\n"},
		// create
		{[]string{"--create"}, 2, "mdadm-go: an md device must be given in this mode\n"},
		{[]string{"-C", "/dev/md0", "-l", "7", "-n2", "a", "b"}, 2, "mdadm-go: invalid raid level: 7\n"},
		{[]string{"-C", "/dev/md0", "-l", "5", "-n2", "a", "b"}, 2, "mdadm-go: raid level 5 is not supported by mdcluster (raid1 and raid10 only)\n"},
		{[]string{"-C", "/dev/md0", "-l1", "-l1"}, 2, "mdadm-go: raid level may only be set once.  Second value is 1.\n"},
		{[]string{"-C", "/dev/md0", "-n", "x"}, 2, "mdadm-go: invalid number of raid devices: x\n"},
		{[]string{"-C", "/dev/md0", "-n2", "-n", "3"}, 2, "mdadm-go: raid-devices set twice: 2 and 3\n"},
		{[]string{"-C", "/dev/md0", "-p", "n2"}, 2, "mdadm-go: raid level must be given before layout.\n"},
		{[]string{"-C", "/dev/md0", "-l1", "-p", "n2"}, 2, "mdadm-go: layout not meaningful for raid1 arrays.\n"},
		{[]string{"-C", "/dev/md0", "-l10", "-p", "x2"}, 2, "mdadm-go: layout for raid10 must be 'nNN', 'oNN' or 'fNN' where NN is a number, not x2\n"},
		{[]string{"-C", "/dev/md0", "-c", "3"}, 2, "mdadm-go: invalid chunk/rounding value: 3\n"},
		{[]string{"-C", "/dev/md0", "-c", "64", "--chunk=128"}, 2, "mdadm-go: chunk/rounding may only be specified once. Second value is 128.\n"},
		{[]string{"-C", "/dev/md0", "--bitmap=sometimes"}, 2, "mdadm-go: --bitmap value must be 'internal', 'clustered' or 'none'\nmdadm-go: Current value is \"sometimes\"\n"},
		{[]string{"-C", "/dev/md0", "--bitmap=/tmp/bm"}, 2, "mdadm-go: Custom write-intent bitmap file option is not supported.\n"},
		{[]string{"-C", "/dev/md0", "-b", "none", "--bitmap", "internal"}, 2, "mdadm-go: --bitmap cannot be set twice. Second value: \"internal\".\n"},
		{[]string{"-C", "/dev/md0", "--bitmap-chunk=3K"}, 2, "mdadm-go: invalid bitmap chunksize: 3K\n"},
		{[]string{"-C", "/dev/md0", "--nodes=1"}, 2, "mdadm-go: clustered array needs two nodes at least: 1\n"},
		{[]string{"-C", "/dev/md0", "--home-cluster=" + strings.Repeat("c", 65)}, 2, "mdadm-go: Cluster name too big.\n"},
		{[]string{"-C", "/dev/md0", "-l1", "-n1", "a"}, 2, "mdadm-go: '1' is an unusual number of drives for an array, so it is probably\n     a mistake.  If you really mean it you will need to specify --force before\n     setting the number of drives.\n"},
		{[]string{"-C", "/dev/md0", "-l1", "-n2", "--nodes=4", "a", "b"}, 1, "mdadm-go: --nodes argument only compatible with --bitmap=clustered\n"},
		{[]string{"-C", "/dev/md0", "-l10", "-pf2", "-n2", "--bitmap=clustered", "a", "b"}, 1, "mdadm-go: only near layout is supported with clustered raid10\n"},
		{[]string{"-C", "/dev/md0", "-l1", "a", "b"}, 1, "mdadm-go: no raid-devices specified.\n"},
		{[]string{"-C", "/dev/md0", "-n2", "a", "b"}, 1, "mdadm-go: a RAID level is needed to create an array.\n"},
		{[]string{"-C", "/dev/md0", "-l1", "-n2", "a"}, 1, "mdadm-go: You haven't given enough devices (real or missing) to create this array\n"},
		{[]string{"-C", "/dev/md0", "-l1", "-n2"}, 1, "mdadm-go: You haven't given enough devices (real or missing) to create this array\n"},
		{[]string{"-C", "/dev/md0", "-l1", "-n2", "a", "b", "c"}, 1, "mdadm-go: You have listed more devices (3) than are in the array(2)!\n"},
		// members mdadm cannot open (Create opens each exclusively first)
		{[]string{"-C", "/dev/md0", "-l1", "-n2", "/dev/sdb", "/dev/busy"}, 2, "mdadm-go: cannot open /dev/busy: Device or resource busy\n"},
		{[]string{"-C", "/dev/md0", "-l1", "-n2", "/dev/nonexistent", "missing"}, 2, "mdadm-go: cannot open /dev/nonexistent: No such file or directory\n"},
		{[]string{"-C", "/dev/md0", "-R", "-S"}, 2, "mdadm-go: option -S not valid in create mode\n"},
		// assemble
		{[]string{"--assemble"}, 2, "mdadm-go: an md device must be given in this mode\n"},
		{[]string{"-A", "/dev/md0", "--uuid=zz"}, 2, "mdadm-go: Bad uuid: zz\n"},
		{[]string{"-A", "/dev/md0", "--bitmap=/x"}, 2, "mdadm-go: bitmap file is not supported /x\n"},
		// manage
		{[]string{"--manage", "/dev/md0", "/dev/sdb"}, 2, "mdadm-go: Must give one of -a/-r/-f for subsequent devices at /dev/sdb\n"},
		{[]string{"--add"}, 2, "mdadm-go: an md device must be given in this mode\n"},
		{[]string{"/dev/md0", "-a", "/dev/sdb", "-R"}, 2, "mdadm-go: --run in manage mode is not supported by mdadm-go; use --assemble --run\n"},
		{[]string{"/dev/md0", "-f", "/dev/sdb", "-S", "-R"}, 2, "mdadm-go: Cannot both Stop and Run an array\n"},
		{[]string{"/dev/md0", "--cluster-confirm", "x:/dev/sdb"}, 1, "mdadm-go: Could not get the devname of cluster\n"},
		{[]string{"/dev/md0", "--cluster-confirm", "/dev/sdb"}, 1, "mdadm-go: Could not get the devname of cluster\n"},
		{[]string{"/dev/md0", "-a", "/dev/sdb", "-l", "1"}, 2, "mdadm-go: option -l not valid in manage mode\n"},
		{[]string{"--re-add"}, 2, "mdadm-go: an md device must be given in this mode\n"},
		{[]string{"--add-spare"}, 2, "mdadm-go: an md device must be given in this mode\n"},
		{[]string{"--fail"}, 2, "mdadm-go: an md device must be given in this mode\n"},
		{[]string{"--remove"}, 2, "mdadm-go: an md device must be given in this mode\n"},
		{[]string{"--cluster-confirm"}, 2, "mdadm-go: an md device must be given in this mode\n"},
		{[]string{"/dev/md0", "--re-add=x", "/dev/sdb"}, 2, "mdadm-go: option '--re-add' doesn't allow an argument\n"},
		// member devices that do not exist: mdadm's stat fails first (1)
		{[]string{"/dev/md0", "--add", "/dev/nonexistent"}, 1, "mdadm-go: stat failed for /dev/nonexistent: No such file or directory\n"},
		{[]string{"/dev/md0", "--re-add", "/dev/nonexistent"}, 1, "mdadm-go: stat failed for /dev/nonexistent: No such file or directory\n"},
		{[]string{"/dev/md0", "--add-spare", "/dev/nonexistent"}, 1, "mdadm-go: stat failed for /dev/nonexistent: No such file or directory\n"},
		{[]string{"/dev/md0", "--fail", "/dev/nonexistent"}, 1, "mdadm-go: stat failed for /dev/nonexistent: No such file or directory\n"},
		{[]string{"/dev/md0", "--remove", "/dev/nonexistent", "--add", "/dev/sdb"}, 1, "mdadm-go: stat failed for /dev/nonexistent: No such file or directory\n"},
		// misc
		{[]string{"--detail"}, 2, "mdadm-go: No devices given.\n"},
		{[]string{"--detail", "--brief", "/dev/md0"}, 2, "mdadm-go: unrecognized option '--brief'\n"},
		{[]string{"--wait=x", "/dev/md0"}, 2, "mdadm-go: option '--wait' doesn't allow an argument\n"},
		{[]string{"--stop", "--assume-clean", "/dev/md0"}, 2, "mdadm-go: :option --assume-clean not valid in misc mode\n"},
		{[]string{"--readwrite", "-l1", "/dev/md0"}, 2, "mdadm-go: option -l not valid in misc mode\n"},
		{[]string{"--status", "--add"}, 2, "mdadm-go: :option --add not valid in misc mode\n"},
		{[]string{"--locks", "-x"}, 2, "mdadm-go: invalid option -- 'x'\n"},
		{[]string{"-S"}, 2, "mdadm-go: No devices given.\n"},
		{[]string{"-W"}, 2, "mdadm-go: No devices given.\n"},
		{[]string{"--readwrite"}, 2, "mdadm-go: No devices given.\n"},
		{[]string{"--detail", "--scan"}, 2, "mdadm-go: --scan is not supported with --detail by mdadm-go\n"},
		{[]string{"-D", "/dev/md0", "-E", "/dev/sdb"}, 2, "mdadm-go: --examine/-E cannot be given with --detail\n"},
		{[]string{"--status", "/dev/md0"}, 2, "mdadm-go: --status takes no device (/dev/md0 given)\n"},
		{[]string{"--cluster", "x"}, 2, "mdadm-go: --cluster takes no device (x given)\n"},
		{[]string{"--locks", "a", "b"}, 2, "mdadm-go: --locks takes at most one lockspace (b given)\n"},
		{[]string{"-D", "/dev/md0", "-l1"}, 2, "mdadm-go: option -l not valid in misc mode\n"},
		// grow
		{[]string{"--grow"}, 2, "mdadm-go: an md device must be given in this mode\n"},
		{[]string{"-G", "/dev/md0", "--bitmap=maybe"}, 2, "mdadm-go: --bitmap value must be 'internal', 'clustered' or 'none'\n"},
		{[]string{"-G", "/dev/md0", "/dev/sdb"}, 2, "mdadm-go: Must give -a/--add for devices to add: /dev/sdb\n"},
		{[]string{"-G", "/dev/md0", "-n", "3"}, 2, "mdadm-go: option -n not valid in grow mode\n"},
		{[]string{"-G", "/dev/md0"}, 0, "mdadm-go: no changes to --grow\n"},
		{[]string{"-G", "/dev/md0", "--bitmap-chunk=3K", "--bitmap=internal"}, 2, "mdadm-go: invalid bitmap chunksize: 3K\n"},
		{[]string{"-G", "/dev/md0", "--nodes=1", "--bitmap=clustered"}, 2, "mdadm-go: clustered array needs two nodes at least: 1\n"},
		// assemble, more
		{[]string{"-A", "/dev/md0", "--level=1"}, 2, "mdadm-go: :option --level not valid in assemble mode\n"},
		{[]string{"-A", "/dev/md0", "-u", "1234"}, 2, "mdadm-go: Bad uuid: 1234\n"},
	}
	f := newFakeDaemon(t, func(ctl.Request) (any, error) { return nil, nil })
	for _, c := range cases {
		out, errOut, exit := runWith(f, c.args...)
		if exit != c.exit || !strings.HasPrefix(errOut, c.stderr) {
			t.Errorf("%q: exit %d (want %d)\nstderr %q\nwant   %q", c.args, exit, c.exit, errOut, c.stderr)
		}
		if out != "" {
			t.Errorf("%q: stdout %q", c.args, out)
		}
		if n := len(f.requests()); n != 0 {
			t.Fatalf("%q: %d requests reached the daemon: %v", c.args, n, f.requests())
		}
	}
}

func TestVersionAndHelp(t *testing.T) {
	f := newFakeDaemon(t, func(ctl.Request) (any, error) { return nil, nil })
	for _, a := range [][]string{{"--version"}, {"-V"}, {"-C", "-V"}} {
		out, errOut, exit := runWith(f, a...)
		if exit != 0 || out != "" || errOut != "mdadm-go - v"+version+" - mdcluster\n" {
			t.Errorf("%q: exit %d stdout %q stderr %q", a, exit, out, errOut)
		}
	}
	out, _, exit := runWith(f, "--help")
	if exit != 0 || !strings.Contains(out, "--cluster-confirm") || !strings.Contains(out, SocketEnv) {
		t.Errorf("--help: exit %d\n%s", exit, out)
	}
	if len(f.requests()) != 0 {
		t.Errorf("requests sent: %v", f.requests())
	}
}

// raid1Note is what mdadm prints when it creates a raid1 without
// --metadata.
const raid1Note = "Note: this array has metadata at the start and\n" +
	"    may not be suitable as a boot device.  If you plan to\n" +
	"    store '/boot' on this device please ensure that\n" +
	"    your boot-loader understands md/v1.x metadata, or use\n" +
	"    --metadata=0.90\n"

// call is one expected request and its canned answer.
type call struct {
	cmd    string
	args   any // decoded into a value of the same type and compared
	result any
	err    error
}

func TestVerbs(t *testing.T) {
	cases := []struct {
		name   string
		args   []string
		calls  []call
		exit   int
		stdout string
		stderr string
	}{
		{"create", []string{"-Cv", "/dev/md0", "--level=raid1", "-n", "2", "--bitmap", "clustered", "--home-cluster=alpha", "-N", "data", "--assume-clean", "--run", "--force", "--bitmap-chunk=64M", "/dev/nbd0", "missing"},
			[]call{{ctl.CmdArrayCreate, ctl.CreateArgs{Array: "/dev/md0", Level: 1, RaidDevices: 2, Devices: []string{"/dev/nbd0", "missing"},
				Bitmap: "clustered", BitmapChunk: 64 << 20, Nodes: 4, HomeCluster: "alpha", Name: "data", AssumeClean: true, Run: true, Force: true},
				ctl.CreateResult{Array: "/dev/md0", Started: true}, nil}},
			0, "", "mdadm-go: " + raid1Note + "mdadm-go: Defaulting to version 1.2 metadata\nmdadm-go: array /dev/md0 started.\n"},
		{"create quiet", []string{"-C", "/dev/md0", "-q", "-l1", "-n2", "-R", "a", "missing"},
			[]call{{ctl.CmdArrayCreate, ctl.CreateArgs{Array: "/dev/md0", Level: 1, RaidDevices: 2, Devices: []string{"a", "missing"}, Run: true},
				ctl.CreateResult{Array: "/dev/md0", Started: true}, nil}},
			0, "", ""},
		{"create raid10", []string{"--create", "/dev/md1", "-l", "10", "-p", "n2", "-c", "512", "--raid-devices=4", "--nodes", "3", "--bitmap=clustered", "a", "b", "c", "d"},
			[]call{{ctl.CmdArrayCreate, ctl.CreateArgs{Array: "/dev/md1", Level: 10, RaidDevices: 4, Devices: []string{"a", "b", "c", "d"}, Layout: "n2", ChunkSize: 512 << 10, Bitmap: "clustered", Nodes: 3},
				ctl.CreateResult{Array: "/dev/md1", Started: true, Warnings: []string{"a is larger than b by 10%"}}, nil}},
			0, "", "mdadm-go: Defaulting to version 1.2 metadata\nmdadm-go: a is larger than b by 10%\nmdadm-go: array /dev/md1 started.\n"},
		{"create not implemented", []string{"-C", "/dev/md0", "-l1", "-n2", "a", "b"},
			[]call{{ctl.CmdArrayCreate, ctl.CreateArgs{Array: "/dev/md0", Level: 1, RaidDevices: 2, Devices: []string{"a", "b"}}, nil,
				ctl.Errorf(ctl.CodeNotImplemented, "array.create is not implemented yet")}},
			1, "", "mdadm-go: --create /dev/md0: not implemented yet by mdclusterd (array.create is not implemented yet)\n"},
		{"assemble", []string{"-A", "/dev/md0", "--run", "-u", "a0c1a0c1:00000000:00000000:00000001", "/dev/nbd0", "/dev/nbd1"},
			[]call{{ctl.CmdArrayAssemble, ctl.AssembleArgs{Array: "/dev/md0", Devices: []string{"/dev/nbd0", "/dev/nbd1"}, UUID: "a0c1a0c1:00000000:00000000:00000001", Run: true},
				ctl.AssembleResult{Arrays: []ctl.Assembled{{Array: "/dev/md0", Drives: 1, RaidDevices: 2, Spares: 1, Started: true}}}, nil}},
			0, "", "mdadm-go: /dev/md0 has been started with 1 drive (out of 2) and 1 spare.\n"},
		{"assemble scan", []string{"--assemble", "--scan"},
			[]call{{ctl.CmdArrayAssemble, ctl.AssembleArgs{Scan: true},
				ctl.AssembleResult{Arrays: []ctl.Assembled{{Array: "/dev/md0", Drives: 2, RaidDevices: 2, Started: true}}}, nil}},
			0, "", "mdadm-go: /dev/md0 has been started with 2 drives.\n"},
		{"manage", []string{"/dev/md0", "-f", "/dev/sdb", "-r", "/dev/sdb", "--add", "/dev/sdc", "/dev/sdd", "--re-add", "/dev/sde", "--add-spare", "/dev/sdf"},
			[]call{
				{ctl.CmdArrayFail, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"/dev/sdb"}}, ctl.DevicesResult{Devices: []ctl.DeviceOutcome{{Device: "/dev/sdb", Action: "failed"}}}, nil},
				{ctl.CmdArrayRemove, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"/dev/sdb"}}, ctl.DevicesResult{Devices: []ctl.DeviceOutcome{{Device: "/dev/sdb", Action: "removed"}}}, nil},
				{ctl.CmdArrayAdd, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"/dev/sdc", "/dev/sdd"}}, ctl.DevicesResult{Devices: []ctl.DeviceOutcome{{Device: "/dev/sdc", Action: "added"}, {Device: "/dev/sdd", Action: "re-added"}}}, nil},
				{ctl.CmdArrayReAdd, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"/dev/sde"}}, ctl.DevicesResult{Devices: []ctl.DeviceOutcome{{Device: "/dev/sde", Action: "re-added"}}}, nil},
				{ctl.CmdArrayAddSpare, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"/dev/sdf"}}, ctl.DevicesResult{Devices: []ctl.DeviceOutcome{{Device: "/dev/sdf", Action: "added"}}}, nil},
			},
			0, "", "mdadm-go: set /dev/sdb faulty in /dev/md0\nmdadm-go: hot removed /dev/sdb from /dev/md0\nmdadm-go: added /dev/sdc\nmdadm-go: re-added /dev/sdd\nmdadm-go: re-added /dev/sde\nmdadm-go: added /dev/sdf\n"},
		{"manage quiet, stop", []string{"-q", "--manage", "/dev/md0", "--fail", "failed", "-S"},
			[]call{
				{ctl.CmdArrayFail, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"failed"}}, ctl.DevicesResult{Devices: []ctl.DeviceOutcome{{Device: "/dev/sdb", Action: "failed"}}}, nil},
				{ctl.CmdArrayStop, ctl.ArrayArgs{Array: "/dev/md0"}, nil, nil},
			}, 0, "", ""},
		{"remove busy", []string{"/dev/md0", "-r", "/dev/sdb", "-a", "/dev/sdc"},
			[]call{{ctl.CmdArrayRemove, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"/dev/sdb"}},
				ctl.DevicesResult{Devices: []ctl.DeviceOutcome{{Device: "/dev/sdb", Error: "hot remove failed for /dev/sdb: Device or resource busy", Busy: true}}}, nil}},
			1, "", "mdadm-go: hot remove failed for /dev/sdb: Device or resource busy\n"},
		{"fail busy", []string{"/dev/md0", "-f", "/dev/sdb", "-a", "/dev/sdc"},
			[]call{{ctl.CmdArrayFail, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"/dev/sdb"}},
				ctl.DevicesResult{Devices: []ctl.DeviceOutcome{{Device: "/dev/sdb", Error: "set device faulty failed for /dev/sdb:  Device or resource busy", Busy: true}}}, nil}},
			2, "", "mdadm-go: set device faulty failed for /dev/sdb:  Device or resource busy\n"},
		{"add until a missing device", []string{"/dev/md0", "--add", "/dev/sdc", "/dev/nonexistent", "/dev/sdd"},
			[]call{{ctl.CmdArrayAdd, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"/dev/sdc"}}, ctl.DevicesResult{Devices: []ctl.DeviceOutcome{{Device: "/dev/sdc", Action: "added"}}}, nil}},
			1, "", "mdadm-go: added /dev/sdc\nmdadm-go: stat failed for /dev/nonexistent: No such file or directory\n"},
		{"manage without devices", []string{"--manage", "/dev/md0"},
			[]call{{ctl.CmdArrayDetail, ctl.ArrayArgs{Array: "/dev/md0"}, exampleDetail(), nil}}, 0, "", ""},
		{"manage unknown array", []string{"/dev/md-nonexistent", "--fail"},
			[]call{{ctl.CmdArrayDetail, ctl.ArrayArgs{Array: "/dev/md-nonexistent"}, nil, ctl.Errorf(ctl.CodeFailed, "/dev/md-nonexistent does not appear to be an md device")}},
			1, "", "mdadm-go: error opening /dev/md-nonexistent: No such file or directory\n"},
		{"add to unknown array", []string{"/dev/md-nonexistent", "--add", "/dev/sdb"},
			[]call{{ctl.CmdArrayAdd, ctl.DevicesArgs{Array: "/dev/md-nonexistent", Devices: []string{"/dev/sdb"}}, nil, ctl.Errorf(ctl.CodeFailed, "/dev/md-nonexistent does not appear to be an md device")}},
			1, "", "mdadm-go: error opening /dev/md-nonexistent: No such file or directory\n"},
		{"add to a non-array", []string{"/dev/sdx", "--add", "/dev/sdb"},
			[]call{{ctl.CmdArrayAdd, ctl.DevicesArgs{Array: "/dev/sdx", Devices: []string{"/dev/sdb"}}, nil, ctl.Errorf(ctl.CodeFailed, "/dev/sdx does not appear to be an md device")}},
			1, "", "mdadm-go: /dev/sdx does not appear to be an md device\n"},
		{"detail unknown array", []string{"--detail", "/dev/md-nonexistent"},
			[]call{{ctl.CmdArrayDetail, ctl.ArrayArgs{Array: "/dev/md-nonexistent"}, nil, ctl.Errorf(ctl.CodeFailed, "/dev/md-nonexistent does not appear to be an md device")}},
			1, "", "mdadm-go: cannot open /dev/md-nonexistent: No such file or directory\n"},
		{"stop unknown array", []string{"--stop", "/dev/md-nonexistent"},
			[]call{{ctl.CmdArrayStop, ctl.ArrayArgs{Array: "/dev/md-nonexistent"}, nil, ctl.Errorf(ctl.CodeFailed, "/dev/md-nonexistent does not appear to be an md device")}},
			1, "", "mdadm-go: error opening /dev/md-nonexistent: No such file or directory\n"},
		{"wait unknown array", []string{"--wait", "/dev/md-nonexistent"},
			[]call{{ctl.CmdArrayWait, ctl.ArrayArgs{Array: "/dev/md-nonexistent"}, nil, ctl.Errorf(ctl.CodeFailed, "/dev/md-nonexistent does not appear to be an md device")}},
			2, "", "mdadm-go: stat failed for /dev/md-nonexistent: No such file or directory\n"},
		{"fail refused", []string{"/dev/md0", "--fail", "/dev/sdb"},
			[]call{{ctl.CmdArrayFail, ctl.DevicesArgs{Array: "/dev/md0", Devices: []string{"/dev/sdb"}}, nil,
				ctl.Errorf(ctl.CodeFailed, "Cannot remove /dev/sdb from /dev/md0, array will be failed.")}},
			1, "", "mdadm-go: Cannot remove /dev/sdb from /dev/md0, array will be failed.\n"},
		{"cluster-confirm", []string{"/dev/md0", "--cluster-confirm", "2:/dev/sdc", "3:missing"},
			[]call{{ctl.CmdArrayClusterConfirm, ctl.ClusterConfirmArgs{Array: "/dev/md0", Confirms: []ctl.ClusterConfirm{{Slot: 2, Device: "/dev/sdc"}, {Slot: 3, Device: "missing"}}},
				ctl.DevicesResult{}, nil}},
			0, "", ""},
		{"stop", []string{"--stop", "/dev/md0", "/dev/md1"},
			[]call{{ctl.CmdArrayStop, ctl.ArrayArgs{Array: "/dev/md0"}, nil, nil}, {ctl.CmdArrayStop, ctl.ArrayArgs{Array: "/dev/md1"}, nil,
				ctl.Errorf(ctl.CodeFailed, "failed to stop array /dev/md1: Device or resource busy\nPerhaps a running process, mounted filesystem or active volume group?")}},
			1, "", "mdadm-go: stopped /dev/md0\nmdadm-go: failed to stop array /dev/md1: Device or resource busy\nPerhaps a running process, mounted filesystem or active volume group?\n"},
		{"readwrite", []string{"-w", "/dev/md0"}, []call{{ctl.CmdArrayReadwrite, ctl.ArrayArgs{Array: "/dev/md0"}, nil, nil}}, 0, "", ""},
		{"grow", []string{"--grow", "/dev/md0", "--bitmap=clustered", "--nodes=8"},
			[]call{{ctl.CmdArrayGrow, ctl.GrowArgs{Array: "/dev/md0", Bitmap: "clustered", Nodes: 8}, nil, nil}}, 0, "", ""},
		{"grow none", []string{"-G", "/dev/md0", "-b", "none"},
			[]call{{ctl.CmdArrayGrow, ctl.GrowArgs{Array: "/dev/md0", Bitmap: "none"}, nil, nil}}, 0, "", ""},
		{"detail", []string{"--detail", "/dev/md0"},
			[]call{{ctl.CmdArrayDetail, ctl.ArrayArgs{Array: "/dev/md0"}, exampleDetail(), nil}}, 0, referenceDetail, ""},
		{"wait idle", []string{"-W", "/dev/md0"},
			[]call{{ctl.CmdArrayWait, ctl.ArrayArgs{Array: "/dev/md0"}, ctl.WaitResult{Waited: false}, nil}}, 1, "", ""},
		{"status", []string{"--status"},
			[]call{{ctl.CmdArrayList, nil, exampleList(), nil}}, 0, referenceMdstat, ""},
		{"cluster", []string{"--cluster"}, []call{{ctl.CmdStatus, nil, ctl.Status{State: "running", Node: ctl.NodeInfo{ID: 1}}, nil}}, 0, "", ""},
		{"locks", []string{"--locks", "md0"}, []call{{ctl.CmdLocks, ctl.LocksArgs{Lockspace: "md0"}, ctl.Locks{}, nil}}, 0, "", ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			i := 0
			f := newFakeDaemon(t, func(req ctl.Request) (any, error) {
				if i >= len(c.calls) {
					t.Errorf("unexpected request %s %s", req.Command, req.Args)
					return nil, ctl.Errorf(ctl.CodeInternal, "unexpected")
				}
				want := c.calls[i]
				i++
				if req.Command != want.cmd {
					t.Errorf("request %d: command %s, want %s", i, req.Command, want.cmd)
				}
				checkArgs(t, req, want.args)
				return want.result, want.err
			})
			out, errOut, exit := runWith(f, c.args...)
			if exit != c.exit || errOut != c.stderr || (c.stdout != "" && out != c.stdout) {
				t.Errorf("exit %d (want %d)\nstderr %q\nwant   %q\nstdout:\n%s\nwant:\n%s", exit, c.exit, errOut, c.stderr, out, c.stdout)
			}
			if i != len(c.calls) {
				t.Errorf("%d requests, want %d", i, len(c.calls))
			}
		})
	}
}

// checkArgs decodes req's args into a value of want's type and compares.
func checkArgs(t *testing.T, req ctl.Request, want any) {
	t.Helper()
	if want == nil {
		if len(req.Args) != 0 {
			t.Errorf("%s: args %s, want none", req.Command, req.Args)
		}
		return
	}
	got := reflect.New(reflect.TypeOf(want))
	if err := ctl.DecodeArgs(req.Args, got.Interface()); err != nil {
		t.Errorf("%s: %v", req.Command, err)
		return
	}
	if !reflect.DeepEqual(got.Elem().Interface(), want) {
		g, _ := json.Marshal(got.Interface())
		w, _ := json.Marshal(want)
		t.Errorf("%s args\n got %s\nwant %s", req.Command, g, w)
	}
}

// TestWaitProgress: --wait shows the progress polled from array.detail
// while array.wait is pending, one line per percent when not a terminal.
func TestWaitProgress(t *testing.T) {
	release := make(chan struct{})
	polls := 0
	f := newFakeDaemon(t, func(req ctl.Request) (any, error) {
		switch req.Command {
		case ctl.CmdArrayWait:
			<-release
			return ctl.WaitResult{Waited: true}, nil
		case ctl.CmdArrayDetail:
			polls++
			done := uint64(polls) * 100000
			if polls == 3 {
				close(release)
			}
			if done > 1046528 {
				done = 1046528
			}
			return ctl.Detail{Sync: &ctl.Sync{Action: "recovery", DoneKiB: done, TotalKiB: 1046528, SpeedKiB: 50000}}, nil
		}
		return nil, ctl.Errorf(ctl.CodeUnknownCommand, "%s", req.Command)
	})
	out, errOut, exit := runWith(f, "--wait", "/dev/md0")
	if exit != 0 || errOut != "" {
		t.Fatalf("exit %d, stderr %q", exit, errOut)
	}
	if !strings.HasPrefix(out, "/dev/md0: [=>...................]  recovery =  9.5% (100000/1046528) finish=0.3min speed=50000K/sec\n") {
		t.Errorf("progress:\n%s", out)
	}
}

func TestUnreachableDaemon(t *testing.T) {
	sock := t.TempDir() + "/nobody.sock"
	var o, e stringsBuilder
	exit := run([]string{"--socket", sock, "--detail", "/dev/md0", "/dev/md1"}, &env{stdout: &o, stderr: &e, prog: "mdadm-go", location: utc, getenv: func(string) string { return "" }})
	want := "mdadm-go: cannot reach mdclusterd at " + sock + ": connect: no such file or directory\n"
	if exit != 1 || e.String() != want {
		t.Errorf("exit %d\nstderr %q\nwant   %q", exit, e.String(), want)
	}
}
