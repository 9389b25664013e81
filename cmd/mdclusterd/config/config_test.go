package config

import (
	"bytes"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
)

// memFS is a file system of a few files for the checks.
type memFS map[string]memFile

type memFile struct {
	mode    fs.FileMode
	content []byte
}

type memInfo struct {
	name string
	f    memFile
}

func (i memInfo) Name() string       { return filepath.Base(i.name) }
func (i memInfo) Size() int64        { return int64(len(i.f.content)) }
func (i memInfo) Mode() fs.FileMode  { return i.f.mode }
func (i memInfo) ModTime() time.Time { return time.Time{} }
func (i memInfo) IsDir() bool        { return i.f.mode.IsDir() }
func (i memInfo) Sys() any           { return nil }

func (m memFS) Stat(path string) (fs.FileInfo, error) {
	f, ok := m[path]
	if !ok {
		return nil, &fs.PathError{Op: "stat", Path: path, Err: fs.ErrNotExist}
	}
	return memInfo{path, f}, nil
}

func (m memFS) ReadFile(path string, max int) ([]byte, error) {
	f, ok := m[path]
	if !ok {
		return nil, &fs.PathError{Op: "open", Path: path, Err: fs.ErrNotExist}
	}
	if len(f.content) > max {
		return nil, errors.New("too large")
	}
	return f.content, nil
}

var testKey = bytes.Repeat([]byte{0xab}, 32)

func testFS() memFS {
	return memFS{
		"/etc/mdcluster/cluster.key": {mode: 0o600, content: []byte(hex.EncodeToString(testKey) + "\n")},
		"/usr/sbin/fence_ipmilan":    {mode: 0o755, content: []byte("#!/bin/sh\n")},
		"/usr/sbin/fence_noexec":     {mode: 0o644},
		"/var/lib/mdcluster":         {mode: fs.ModeDir | 0o700},
		"/var/lib/afile":             {mode: 0o600},
		"/etc/mdcluster/open.key":    {mode: 0o644, content: []byte(hex.EncodeToString(testKey))},
		"/etc/mdcluster/short.key":   {mode: 0o600, content: []byte("0123456789abcdef")},
	}
}

// base is a valid configuration; the tests replace single lines of it.
// Keep the line numbers in mind: the expected errors name them.
const base = `node_id = 1                                   # 1
profile = "storage-lan"                       # 2
data_dir = "/var/lib/mdcluster"               # 3
cluster_key_file = "/etc/mdcluster/cluster.key" # 4
[gossip]                                      # 5
bind_addr = "10.0.0.1"                        # 6
port = 7946                                   # 7
seeds = ["10.0.0.2:7946", "10.0.0.3:7946"]    # 8
[dlm]                                         # 9
listen_addr = "0.0.0.0:7410"                  # 10
[quorum]                                      # 11
data_nodes = [1, 2, 3]                        # 12
m = 2                                         # 13
[fencing]                                     # 14
timeout = "30s"                               # 15
[[fencing.level]]                             # 16
[[fencing.level.agent]]                       # 17
path = "/usr/sbin/fence_ipmilan"              # 18
options = { login = "admin", lanplus = 1 }    # 19
[fencing.level.agent.node_options]            # 20
"2" = { ip = "10.0.1.2" }                     # 21
[[fencing.level]]                             # 22
stamp = true                                  # 23
[devices]                                     # 24
search = ["/dev/disk/by-id/wwn-*"]            # 25
[[array]]                                     # 26
name = "md0"                                  # 27
[array.export]                                # 28
socket = "/run/mdcluster/md0.nbd"             # 29
tcp = "127.0.0.1:10809"                       # 30
[log]                                         # 31
format = "json"                               # 32
[metrics]                                     # 33
listen = "127.0.0.1:9466"                     # 34
[control]                                     # 35
socket = "/run/mdcluster/mdclusterd.sock"     # 36
`

const file = "/etc/mdcluster/mdclusterd.toml"

// ctlSock is line 36 of base, for cases that append sections after it.
const ctlSock = `socket = "/run/mdcluster/mdclusterd.sock"`

// replaceLine swaps line n (1-based) of base for s ("" deletes its text).
func replaceLine(n int, s string) string {
	lines := strings.Split(base, "\n")
	lines[n-1] = s
	return strings.Join(lines, "\n")
}

func TestParseValid(t *testing.T) {
	cfg, err := Parse(file, []byte(base), testFS())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RAID != (RAID{SpeedLimitMin: 1000, SpeedLimitMax: 200000, HoldWait: 30 * time.Second, RejoinLimit: 5 * time.Minute}) || !cfg.Lease.Enabled || cfg.Lease.Duration != 10*time.Second ||
		cfg.Lease.FenceWait() != 15*time.Second || cfg.Lease.StopWait != 25*time.Second || cfg.Lease.Watchdog != "" {
		t.Fatalf("raid and lease defaults: %+v %+v", cfg.RAID, cfg.Lease)
	}
	if cfg.NodeID != 1 || cfg.Profile != ProfileStorageLAN || cfg.DataDir != "/var/lib/mdcluster" {
		t.Errorf("identity: %+v", cfg)
	}
	if !bytes.Equal(cfg.ClusterKey, testKey) {
		t.Errorf("key %x", cfg.ClusterKey)
	}
	if cfg.Gossip.BindAddr != "10.0.0.1" || cfg.Gossip.Port != 7946 || len(cfg.Gossip.Seeds) != 2 {
		t.Errorf("gossip %+v", cfg.Gossip)
	}
	if cfg.DLM.ListenAddr != "0.0.0.0:7410" {
		t.Errorf("dlm %+v", cfg.DLM)
	}
	if cfg.Quorum.Quorum != 2 || len(cfg.Quorum.DataNodes) != 3 || cfg.Quorum.Validate() != nil {
		t.Errorf("quorum %+v", cfg.Quorum)
	}
	if cfg.Fencing.Timeout != 30*time.Second || len(cfg.Fencing.Levels) != 2 || !cfg.Fencing.Levels[1].Stamp {
		t.Fatalf("fencing %+v", cfg.Fencing)
	}
	ag := cfg.Fencing.Levels[0].Agents
	if len(ag) != 1 || ag[0].Path != "/usr/sbin/fence_ipmilan" || ag[0].Options["lanplus"] != "1" ||
		ag[0].Options["login"] != "admin" || ag[0].NodeOptions[2]["ip"] != "10.0.1.2" {
		t.Errorf("agents %+v", ag)
	}
	if len(cfg.Arrays) != 1 || cfg.Arrays[0].Name != "md0" || cfg.Arrays[0].ExportSocket != "/run/mdcluster/md0.nbd" ||
		cfg.Arrays[0].ExportTCP != "127.0.0.1:10809" {
		t.Errorf("arrays %+v", cfg.Arrays)
	}
	if cfg.Log.Format != "json" || cfg.Log.Level != "info" {
		t.Errorf("log %+v", cfg.Log)
	}
	if cfg.Metrics.Listen != "127.0.0.1:9466" || cfg.Metrics.MaxConnections != DefaultMetricsConnections {
		t.Errorf("metrics %+v", cfg.Metrics)
	}
	if cfg.Control.Socket != "/run/mdcluster/mdclusterd.sock" || cfg.Control.MaxRequestBytes != 64<<10 ||
		cfg.Control.IdleTimeout != DefaultIdleTimeout || cfg.Control.RefusedLogInterval != time.Minute {
		t.Errorf("control %+v", cfg.Control)
	}
	if cfg.Shutdown.LeaveTimeout != DefaultLeaveTimeout {
		t.Errorf("shutdown %+v", cfg.Shutdown)
	}
}

// TestParseErrors changes one line of a valid file at a time and expects
// exactly the one error naming that line and field.
func TestParseNBDDevice(t *testing.T) {
	cfg, err := Parse(file, []byte(replaceLine(30, `nbd_device = "/dev/nbd3"`)), testFS())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Arrays[0].NBDDevice != "/dev/nbd3" {
		t.Errorf("nbd_device %q, want /dev/nbd3", cfg.Arrays[0].NBDDevice)
	}
	two := replaceLine(30, `nbd_device = "/dev/nbd3"`) + `[[array]]
name = "md1"
[array.export]
socket = "/run/mdcluster/md1.nbd"
nbd_device = "/dev/nbd3"
`
	_, err = Parse(file, []byte(two), testFS())
	if want := file + ":41: array[1].export.nbd_device: /dev/nbd3 is also the NBD device of array[0]"; err == nil || err.Error() != want {
		t.Errorf("two arrays on one NBD device: %v, want %s", err, want)
	}
	if base := mustParse(t, base); base.Arrays[0].NBDDevice != "" {
		t.Errorf("nbd_device %q without the key", base.Arrays[0].NBDDevice)
	}
}

// TestParseProfiles: every profile name decodes to its own profile (a
// typo in the switch would quietly run another profile's timings).
func TestParseProfiles(t *testing.T) {
	for _, p := range []Profile{ProfileLAN, ProfileVM, ProfileStorageLAN} {
		if got := mustParse(t, replaceLine(2, `profile = "`+string(p)+`"`)).Profile; got != p {
			t.Errorf("profile %q decoded as %q", p, got)
		}
	}
}

func mustParse(t *testing.T, doc string) *Config {
	t.Helper()
	cfg, err := Parse(file, []byte(doc), testFS())
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestParseErrors(t *testing.T) {
	cases := []struct {
		line int
		text string
		want string // without the "file:" prefix
	}{
		{13, `m = 1`, "13: quorum.m: 1 of 3 data nodes is not a majority (need at least 2)"},
		{13, `m = 4`, "13: quorum.m: 4 is out of range: with 3 data nodes m is 1 to 3 (a majority is at least 2)"},
		{13, `m = "2"`, `13: quorum.m: expected an integer, got string "2"`},
		{13, ``, "11: quorum.m: missing: how many of the 3 data nodes must be present (at least 2)"},
		{12, `data_nodes = [1, 2, 3, 4]`, "13: quorum.m: 2 of 4 data nodes is not a majority (need 3, or set quorum.tie_breaker)"},
		{12, `data_nodes = [1, 2, 2]`, "12: quorum.data_nodes[2]: node 2 is listed twice"},
		{12, `data_nodes = [1, 0, 3]`, "12: quorum.data_nodes[1]: node ID 0 is out of range (1 to 4294967295; 0 is reserved)"},
		{12, `data_nodes = []`, "12: quorum.data_nodes: empty: a cluster needs at least one data node"},
		{13, "m = 2\ntie_breaker = 7", "14: quorum.tie_breaker: node 7 is not one of quorum.data_nodes"},
		{13, "m = 2\nnon_data_nodes = [3]", "14: quorum.non_data_nodes[0]: node 3 is also in quorum.data_nodes: a node has one role"},
		{13, "m = 2\nquorom = 1", "14: quorum.quorom: unknown key"},
		{1, `node_id = 0`, "1: node_id: node ID 0 is out of range (1 to 4294967295; 0 is reserved)"},
		{1, `node = 1`, "node_id: missing: every node needs its cluster node ID (a number from 1)\n" + file + ":1: node: unknown key"},
		{2, `profile = "fast"`, `2: profile: "fast" is not a profile ("lan", "vm" or "storage-lan")`},
		{2, `Profile = "lan"`, "2: Profile: unknown key (did you mean profile?)"},
		{3, `data_dir = "var/lib/mdcluster"`, `3: data_dir: "var/lib/mdcluster" is not an absolute path`},
		{3, `data_dir = "/var/lib/afile"`, "3: data_dir: /var/lib/afile exists and is not a directory"},
		{4, `cluster_key_file = "/etc/mdcluster/none.key"`, "4: cluster_key_file: /etc/mdcluster/none.key does not exist (create it on one node, e.g. `openssl rand -hex 32 > /etc/mdcluster/none.key; chmod 0600 /etc/mdcluster/none.key`, and copy it to every node)"},
		{4, `cluster_key_file = "/etc/mdcluster/open.key"`, "4: cluster_key_file: /etc/mdcluster/open.key has mode 0644: every user can read the cluster key; chmod 0600 it (and make a new key if it may have leaked)"},
		{4, `cluster_key_file = "/etc/mdcluster/short.key"`, "4: cluster_key_file: /etc/mdcluster/short.key: the key is 8 bytes (read as hex), need at least 32: write e.g. `openssl rand -hex 32` to it"},
		{6, `bind_addr = "0.0.0.0"`, `6: gossip.bind_addr: "0.0.0.0" is a wildcard: the address is advertised to the other nodes, so it must be this node's storage-network address`},
		{6, `bind_addr = "node1"`, `6: gossip.bind_addr: "node1" is not an IP address`},
		{7, `port = 70000`, "7: gossip.port: 70000 is out of range (1 to 65535)"},
		{8, `seeds = ["10.0.0.2:7946", "10.0.0.3"]`, `8: gossip.seeds[1]: "10.0.0.3" is not host:port (missing port in address)`},
		{8, `seeds = "10.0.0.2:7946"`, `8: gossip.seeds: expected an array of strings, got string "10.0.0.2:7946"`},
		{10, `listen_addr = "0.0.0.0:http"`, `10: dlm.listen_addr: "0.0.0.0:http": port "http" is not a number from 0 to 65535`},
		{10, `advertise_addr = "0.0.0.0:7410"`, "9: dlm.listen_addr: missing: where the lock manager accepts its peers, e.g. \"0.0.0.0:7410\"\n" +
			file + `:10: dlm.advertise_addr: address "0.0.0.0:7410" is a wildcard address, which other nodes cannot dial`},
		{15, `timeout = "60"`, `15: fencing.timeout: "60" is not a duration (write e.g. "30s", "2m", "500ms")`},
		{15, `timeout = "-1s"`, `15: fencing.timeout: "-1s": must be positive`},
		{18, `path = "/usr/sbin/fence_noexec"`, "18: fencing.level[0].agent[0].path: fence agent /usr/sbin/fence_noexec is not executable (mode 0644)"},
		{18, `path = "/usr/sbin/fence_none"`, "18: fencing.level[0].agent[0].path: fence agent /usr/sbin/fence_none: file does not exist"},
		{19, `options = { action = "reboot" }`, "19: fencing.level[0].agent[0].options.action: set by the fencer itself (off/status, and the victim's name); it may not be configured"},
		{19, `options = { login = 1.5 }`, "19: fencing.level[0].agent[0].options.login: expected a string, integer or boolean option value, got float 1.5"},
		{19, `verfy = true`, "19: fencing.level[0].agent[0].verfy: unknown key"},
		{21, `"two" = { ip = "10.0.1.2" }`, `21: fencing.level[0].agent[0].node_options.two: "two" is not a node ID: node_options are keyed by node ID, e.g. [fencing.level[0].agent[0].node_options."2"]`},
		{23, `stamp = false`, "22: fencing.level[1]: empty level: give its agents ([[fencing.level.agent]]) or stamp = true"},
		{25, `search = ["dev/sd*"]`, `25: devices.search[0]: "dev/sd*" is not an absolute path`},
		{25, `search = ["/dev/sd[a"]`, `25: devices.search[0]: "/dev/sd[a" is not a valid glob pattern`},
		{27, `name = "md 0"`, `27: array[0].name: array name "md 0": only letters, digits, '.', '_' and '-'`},
		{27, `uuid = "3d5f6a1e:8c2b4f70:9a1d2e3f"`, `27: array[0].uuid: "3d5f6a1e:8c2b4f70:9a1d2e3f" is not an array UUID (32 hex digits, e.g. as mdadm prints it: 3d5f6a1e:8c2b4f70:9a1d2e3f:4b5c6d7e)`},
		{30, `tcp = "10.0.0.1:10809"`, `30: array[0].export.tcp: "10.0.0.1:10809" is not a loopback address (127.0.0.0/8, ::1 or localhost): NBD has no authentication, so it is served on this host only`},
		{30, `nbd_device = "/dev/sda"`, `30: array[0].export.nbd_device: "/dev/sda" is not an NBD device path (/dev/nbdN)`},
		{30, `nbd_device = "/dev/nbd70000"`, `30: array[0].export.nbd_device: "/dev/nbd70000": device number out of range 0..65535`},
		{32, `format = "logfmt"`, `32: log.format: "logfmt" is not a log format ("text" or "json")`},
		{32, `level = "trace"`, `32: log.level: "trace" is not a log level ("debug", "info", "warn" or "error")`},
		{34, `listen = "9466"`, `34: metrics.listen: "9466" is not host:port (missing port in address)`},
		{36, `socket = "/mdclusterd.sock"`, `36: control.socket: "/mdclusterd.sock": the socket needs a directory of its own (e.g. /run/mdcluster/), made root-only`},
		{36, `max_request_bytes = 100`, "36: control.max_request_bytes: 100 is out of range (1024 to 16777216)"},
		{36, ctlSock + "\n[raid]\nspeed_limit_min = 5000\nspeed_limit_max = 100", "38: raid.speed_limit_min: 5000 KiB/s is above speed_limit_max (100 KiB/s)"},
		{36, ctlSock + "\n[raid]\nspeed_limit_max = 0", "38: raid.speed_limit_max: 0 is out of range (1 to 1073741824)"},
		{36, ctlSock + "\n[raid]\nrejoin_limit = \"100ms\"", "38: raid.rejoin_limit: 100ms is too short: one re-join attempt takes at least a lockspace join (at least 1s)"},
		{36, ctlSock + "\n[raid]\nhold_wait = \"2h\"", `38: raid.hold_wait: "2h" is more than the limit of 1h0m0s`},
		{36, ctlSock + "\n[lease]\nenabled = false", "16: fencing.level: the stamp level needs the I/O lease ([lease] enabled = true): without it a fenced node never stops writing"},
		{36, ctlSock + "\n[lease]\nwatchdog = \"/dev/watchdog\"\nmargin = \"5s\"", "39: lease.margin: 5s is less than the watchdog timeout plus half the lease (15s): a hung node could still write after its fence returned"},
		{36, ctlSock + "\n[lease]\nstop_wait = \"5s\"", "38: lease.stop_wait: 5s is shorter than the stamp fence's wait (duration + margin = 15s): every survivor's requests would fail during each fence; raise it above 15s"},
		{36, ctlSock + "\n[lease]\nduration = \"10ms\"", "38: lease.duration: 10ms is too short: the lease must outlast a stamp read (at least 100ms)"},
		{36, ctlSock + "\n[lease]\nwatchdog = \"dev/watchdog\"", `38: lease.watchdog: "dev/watchdog" is not an absolute path`},
		{7, `port = 7946 7947`, "7: TOML: expected newline but got U+0037 '7'"},
		{9, `[gossip]`, "9: gossip: TOML: table gossip already exists"},
	}
	for _, c := range cases {
		doc := replaceLine(c.line, c.text)
		_, err := Parse(file, []byte(doc), testFS())
		want := file + ":" + c.want
		if c.want[0] < '0' || c.want[0] > '9' {
			want = file + ": " + c.want
		}
		if err == nil {
			t.Errorf("line %d %q: no error, want %s", c.line, c.text, want)
			continue
		}
		if !errors.Is(err, ErrInvalid) {
			t.Errorf("line %d %q: %v does not match ErrInvalid", c.line, c.text, err)
		}
		if err.Error() != want {
			t.Errorf("line %d %q:\n got %s\nwant %s", c.line, c.text, err, want)
		}
	}
}

func TestParseMissingSectionsListsEveryProblem(t *testing.T) {
	_, err := Parse(file, []byte("node_id = 2\n"), testFS())
	var es Errors
	if !errors.As(err, &es) {
		t.Fatalf("%v", err)
	}
	got := err.Error()
	for _, f := range []string{"data_dir: missing", "cluster_key_file: missing", "gossip.bind_addr: missing",
		"dlm.listen_addr: missing", "quorum.data_nodes: missing", "quorum.m: missing", "fencing.level: missing"} {
		if !strings.Contains(got, file+": "+f) {
			t.Errorf("no %q in\n%s", f, got)
		}
	}
}

func TestTieBreakerAllowsHalf(t *testing.T) {
	doc := replaceLine(12, "data_nodes = [1, 2, 3, 4]\ntie_breaker = 2")
	cfg, err := Parse(file, []byte(doc), testFS())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Quorum.TieBreaker != 2 || cfg.Quorum.Quorum != 2 || cfg.Quorum.Validate() != nil {
		t.Errorf("%+v", cfg.Quorum)
	}
}

func TestArrayUUIDNormalised(t *testing.T) {
	doc := replaceLine(27, `uuid = "3D5F6A1E-8C2B-4F70-9A1D-2E3F4B5C6D7E"`)
	cfg, err := Parse(file, []byte(doc), testFS())
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Arrays[0].UUID; got != "3d5f6a1e:8c2b4f70:9a1d2e3f:4b5c6d7e" {
		t.Errorf("uuid %s", got)
	}
}

func TestDecodeKeyForms(t *testing.T) {
	key := []byte("0123456789abcdefghijklmnopqrstu!") // 32 bytes, neither hex nor base64
	cases := []struct {
		content []byte
		form    KeyForm
	}{
		{[]byte(hex.EncodeToString(key) + "\n"), KeyHex},
		{[]byte("  " + base64.StdEncoding.EncodeToString(key) + "\n"), KeyBase64},
		{append([]byte(nil), key...), KeyRaw},
	}
	for _, c := range cases {
		k, form, err := DecodeKey(c.content)
		if err != nil || form != c.form || !bytes.Equal(k, key) {
			t.Errorf("%q: %x %s %v, want %x %s", c.content, k, form, err, key, c.form)
		}
	}
	if _, _, err := DecodeKey([]byte(base64.StdEncoding.EncodeToString(key[:20]))); err == nil ||
		!strings.Contains(err.Error(), "the key is 20 bytes (read as base64)") {
		t.Errorf("short base64 key: %v", err)
	}
}

// TestLoadRealFiles runs Load against real files: modes come from the
// file system, and a missing data directory is not created.
func TestLoadRealFiles(t *testing.T) {
	dir := t.TempDir()
	keyPath := filepath.Join(dir, "cluster.key")
	if err := os.WriteFile(keyPath, []byte(hex.EncodeToString(testKey)), 0o600); err != nil {
		t.Fatal(err)
	}
	agent := filepath.Join(dir, "fence_true")
	if err := os.WriteFile(agent, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	dataDir := filepath.Join(dir, "data")
	doc := strings.NewReplacer("/etc/mdcluster/cluster.key", keyPath, "/usr/sbin/fence_ipmilan", agent,
		"/var/lib/mdcluster", dataDir).Replace(base)
	path := filepath.Join(dir, "mdclusterd.toml")
	if err := os.WriteFile(path, []byte(doc), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Path != path || !bytes.Equal(cfg.ClusterKey, testKey) {
		t.Errorf("%s %x", cfg.Path, cfg.ClusterKey)
	}
	if _, err := os.Stat(dataDir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Load touched the data directory: %v", err)
	}
	if err := os.Chmod(keyPath, 0o604); err != nil {
		t.Fatal(err)
	}
	_, err = Load(path)
	want := path + ":4: cluster_key_file: " + keyPath + " has mode 0604: every user can read the cluster key"
	if err == nil || !strings.HasPrefix(err.Error(), want) {
		t.Errorf("world-readable key: %v\nwant %s...", err, want)
	}
	if _, err := Load(filepath.Join(dir, "none.toml")); err == nil || errors.Is(err, ErrInvalid) ||
		!strings.Contains(err.Error(), "none.toml: reading the configuration") {
		t.Errorf("missing file: %v", err)
	}
}

func TestExampleFileParses(t *testing.T) {
	data, err := os.ReadFile("../../../packaging/mdclusterd.toml.example")
	if err != nil {
		t.Fatal(err)
	}
	fsys := testFS()
	cfg, err := Parse("mdclusterd.toml.example", data, fsys)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Quorum.Quorum != 2 || len(cfg.Fencing.Levels) != 2 || cfg.Fencing.Levels[0].Agents[0].NodeOptions[3]["ip"] != "10.0.1.3" ||
		len(cfg.Arrays) != 1 || cfg.Metrics.Listen == "" {
		t.Errorf("%+v", cfg)
	}
	if cfg.Quorum.Validate() != nil || cfg.Quorum.String() != (ddraid.Config{DataNodes: []ddraid.NodeID{1, 2, 3}, Quorum: 2}).String() {
		t.Errorf("%v", cfg.Quorum)
	}
}

// TestRAIDHoldAndRejoin: the re-join bounds reach the configuration as
// written (the array layer hands them to the engine and the manager).
func TestRAIDHoldAndRejoin(t *testing.T) {
	doc := replaceLine(36, ctlSock+"\n[raid]\nhold_wait = \"2s\"\nrejoin_limit = \"90s\"")
	cfg, err := Parse(file, []byte(doc), testFS())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.RAID.HoldWait != 2*time.Second || cfg.RAID.RejoinLimit != 90*time.Second {
		t.Fatalf("raid: %+v, want hold_wait 2s and rejoin_limit 90s", cfg.RAID)
	}
}

// TestParseEmptyExportTable: an [array.export] table with no keys at all
// is refused like one without a socket (a fuzzed input once got through:
// the array then had no export socket).
func TestParseEmptyExportTable(t *testing.T) {
	lines := strings.Split(base, "\n")
	doc := strings.Join(append(append([]string(nil), lines[:28]...), lines[30:]...), "\n") // drop socket and tcp
	_, err := Parse(file, []byte(doc), testFS())
	if err == nil || !strings.Contains(err.Error(), "array[0].export.socket: missing: the unix socket path of the array's NBD export") {
		t.Fatalf("empty [array.export]: %v", err)
	}
}
