package config

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/mdcluster/mdcluster/ddraid"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd/kernel"
	"github.com/mdcluster/mdcluster/mdcluster/membership/gossip"
)

// decode reads the whole schema. Every problem is noted; the returned
// Config is only meaningful when there is none.
func (d *decoder) decode(doc map[string]any) *Config {
	root := newTable("", doc)
	cfg := &Config{}

	if v, ok := d.integer(root, "node_id"); ok {
		if id, ok := d.nodeID("node_id", v); ok {
			cfg.NodeID = ddraid.NodeID(id)
		}
	} else if _, present := doc["node_id"]; !present {
		d.errorf("node_id", "missing: every node needs its cluster node ID (a number from 1)")
	}

	cfg.Profile = ProfileLAN
	if s, ok := d.str(root, "profile"); ok {
		switch Profile(s) {
		case ProfileLAN, ProfileStorageLAN, ProfileVM:
			cfg.Profile = Profile(s)
		default:
			d.errorf("profile", "%q is not a profile (\"lan\", \"vm\" or \"storage-lan\")", s)
		}
	}

	if s, ok := d.str(root, "data_dir"); ok {
		cfg.DataDir = d.dataDir("data_dir", s)
	} else if _, present := doc["data_dir"]; !present {
		d.errorf("data_dir", "missing: the node's state must survive restarts in a directory (e.g. /var/lib/mdcluster)")
	}

	if s, ok := d.str(root, "cluster_key_file"); ok {
		cfg.ClusterKeyFile = s
		cfg.ClusterKey = d.clusterKey("cluster_key_file", s)
	} else if _, present := doc["cluster_key_file"]; !present {
		d.errorf("cluster_key_file", "missing: the nodes authenticate each other with a shared key file")
	}

	cfg.Gossip = d.gossip(d.subtable(root, "gossip"))
	cfg.DLM = d.dlm(d.subtable(root, "dlm"))
	cfg.Quorum = d.quorum(d.subtable(root, "quorum"), cfg.NodeID)
	cfg.Fencing = d.fencing(d.subtable(root, "fencing"))
	cfg.Devices = d.devices(d.subtable(root, "devices"))
	search, _ := d.subtableMap(root, "devices")["search"].([]any)
	cfg.Arrays = d.arrays(root, len(search) > 0)
	cfg.RAID = d.raid(d.subtable(root, "raid"))
	cfg.Lease = d.lease(d.subtable(root, "lease"))
	cfg.Log = d.log(d.subtable(root, "log"))
	cfg.Metrics = d.metrics(d.subtable(root, "metrics"))
	cfg.Control = d.control(d.subtable(root, "control"))
	sh := d.subtable(root, "shutdown")
	cfg.Shutdown.LeaveTimeout = d.duration(sh, "leave_timeout", DefaultLeaveTimeout, time.Hour)
	d.done(sh)
	d.done(root)
	d.crossChecks(cfg)
	return cfg
}

// subtableMap peeks at a table without marking anything used.
func (d *decoder) subtableMap(t *table, k string) map[string]any {
	m, _ := t.m[k].(map[string]any)
	return m
}

// absPath checks that a configured path is absolute and clean: the
// daemon's working directory is not something to depend on.
func (d *decoder) absPath(field, s string) bool {
	switch {
	case s == "":
		d.errorf(field, "empty path")
		return false
	case !filepath.IsAbs(s):
		d.errorf(field, "%q is not an absolute path", s)
		return false
	case strings.ContainsRune(s, 0):
		d.errorf(field, "path contains a NUL byte")
		return false
	}
	return true
}

func (d *decoder) dataDir(field, s string) string {
	if !d.absPath(field, s) {
		return ""
	}
	fi, err := d.fs.Stat(s)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		// Created at start.
	case err != nil:
		d.errorf(field, "%s: %v", s, err)
	case !fi.IsDir():
		d.errorf(field, "%s exists and is not a directory", s)
	}
	return filepath.Clean(s)
}

// clusterKey checks the key file (exists, regular, not readable or
// writable by every user) and reads the key from it.
func (d *decoder) clusterKey(field, path string) []byte {
	if !d.absPath(field, path) {
		return nil
	}
	fi, err := d.fs.Stat(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			d.errorf(field, "%s does not exist (create it on one node, e.g. `openssl rand -hex 32 > %s; chmod 0600 %s`, and copy it to every node)", path, path, path)
		} else {
			d.errorf(field, "%s: %v", path, err)
		}
		return nil
	}
	if !fi.Mode().IsRegular() {
		d.errorf(field, "%s is not a regular file", path)
		return nil
	}
	if perm := fi.Mode().Perm(); perm&0o006 != 0 {
		d.errorf(field, "%s has mode %04o: every user can %s the cluster key; chmod 0600 it (and make a new key if it may have leaked)",
			path, perm, map[bool]string{true: "read", false: "write"}[perm&0o004 != 0])
		return nil
	}
	content, err := d.fs.ReadFile(path, MaxKeyFileBytes)
	if err != nil {
		d.errorf(field, "%s: %v", path, err)
		return nil
	}
	key, _, err := DecodeKey(content)
	if err != nil {
		d.errorf(field, "%s: %v", path, err)
		return nil
	}
	return key
}

// splitHostPort checks "host:port" with a numeric port in [minPort, 65535].
func (d *decoder) splitHostPort(field, s string, minPort int) (string, int, bool) {
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		d.errorf(field, "%q is not host:port (%v)", s, stripAddrErr(err))
		return "", 0, false
	}
	p, err := strconv.Atoi(port)
	if err != nil || p < minPort || p > 65535 {
		d.errorf(field, "%q: port %q is not a number from %d to 65535", s, port, minPort)
		return "", 0, false
	}
	return host, p, true
}

func stripAddrErr(err error) string {
	var ae *net.AddrError
	if errors.As(err, &ae) {
		return ae.Err
	}
	return err.Error()
}

func (d *decoder) gossip(t *table) Gossip {
	g := Gossip{Port: DefaultGossipPort}
	if s, ok := d.str(t, "bind_addr"); ok {
		ip := net.ParseIP(s)
		switch {
		case ip == nil:
			d.errorf(t.key("bind_addr"), "%q is not an IP address", s)
		case ip.IsUnspecified():
			d.errorf(t.key("bind_addr"), "%q is a wildcard: the address is advertised to the other nodes, so it must be this node's storage-network address", s)
		default:
			g.BindAddr = s
		}
	} else if _, present := t.m["bind_addr"]; !present {
		d.errorf(t.key("bind_addr"), "missing: the node's storage-network IP address, which the other nodes reach it at")
	}
	g.Port = int(d.intRange(t, "port", DefaultGossipPort, 1, 65535))
	if seeds, ok := d.strs(t, "seeds"); ok {
		seen := map[string]bool{}
		for i, s := range seeds {
			f := fmt.Sprintf("%s[%d]", t.key("seeds"), i)
			host, _, ok := d.splitHostPort(f, s, 1)
			switch {
			case !ok:
			case host == "":
				d.errorf(f, "%q has no host", s)
			case seen[s]:
				d.errorf(f, "%q is listed twice", s)
			default:
				g.Seeds = append(g.Seeds, s)
			}
			seen[s] = true
		}
	}
	d.done(t)
	return g
}

func (d *decoder) dlm(t *table) DLM {
	var c DLM
	if s, ok := d.str(t, "listen_addr"); ok {
		if _, _, ok := d.splitHostPort(t.key("listen_addr"), s, 0); ok {
			c.ListenAddr = s
		}
	} else if _, present := t.m["listen_addr"]; !present {
		d.errorf(t.key("listen_addr"), "missing: where the lock manager accepts its peers, e.g. \"0.0.0.0:7410\"")
	}
	if s, ok := d.str(t, "advertise_addr"); ok {
		if err := gossip.CheckDialAddr(s); err != nil {
			d.errorf(t.key("advertise_addr"), "%v", err)
		} else {
			c.AdvertiseAddr = s
		}
	}
	d.done(t)
	return c
}

// quorum reads and checks the m-of-n data-node quorum, with ddraid's rules
// and a message that says which field to change.
func (d *decoder) quorum(t *table, self ddraid.NodeID) ddraid.Config {
	var q ddraid.Config
	ids := func(k string) []ddraid.NodeID {
		raw, ok := d.ints(t, k)
		if !ok {
			return nil
		}
		var out []ddraid.NodeID
		seen := map[ddraid.NodeID]bool{}
		for i, v := range raw {
			f := fmt.Sprintf("%s[%d]", t.key(k), i)
			id, ok := d.nodeID(f, v)
			if !ok {
				continue
			}
			if seen[ddraid.NodeID(id)] {
				d.errorf(f, "node %d is listed twice", id)
				continue
			}
			seen[ddraid.NodeID(id)] = true
			out = append(out, ddraid.NodeID(id))
		}
		return out
	}
	q.DataNodes = ids("data_nodes")
	if _, present := t.m["data_nodes"]; !present {
		d.errorf(t.key("data_nodes"), "missing: the IDs of the nodes that hold array data (they alone vote)")
	} else if arr, ok := t.m["data_nodes"].([]any); ok && len(arr) == 0 {
		d.errorf(t.key("data_nodes"), "empty: a cluster needs at least one data node")
	}
	q.NonDataNodes = ids("non_data_nodes")
	for i, id := range q.NonDataNodes {
		if slices.Contains(q.DataNodes, id) {
			d.errorf(fmt.Sprintf("%s[%d]", t.key("non_data_nodes"), i), "node %d is also in %s: a node has one role", id, t.key("data_nodes"))
		}
	}
	if v, ok := d.integer(t, "tie_breaker"); ok && v != 0 {
		if id, ok := d.nodeID(t.key("tie_breaker"), v); ok {
			if !slices.Contains(q.DataNodes, ddraid.NodeID(id)) {
				d.errorf(t.key("tie_breaker"), "node %d is not one of %s", id, t.key("data_nodes"))
			} else {
				q.TieBreaker = ddraid.NodeID(id)
			}
		}
	}
	n := len(q.DataNodes)
	m, ok := d.integer(t, "m")
	switch {
	case !ok:
		if _, present := t.m["m"]; !present {
			d.errorf(t.key("m"), "missing: how many of the %d data nodes must be present (at least %d)", n, n/2+1)
		}
	case n == 0:
	case m < 1 || m > int64(n):
		d.errorf(t.key("m"), "%d is out of range: with %d data nodes m is 1 to %d (a majority is at least %d)", m, n, n, n/2+1)
	case 2*m < int64(n):
		d.errorf(t.key("m"), "%d of %d data nodes is not a majority (need at least %d)", m, n, n/2+1)
	case 2*m == int64(n) && q.TieBreaker == ddraid.NoNode:
		d.errorf(t.key("m"), "%d of %d data nodes is not a majority (need %d, or set %s)", m, n, n/2+1, t.key("tie_breaker"))
	default:
		q.Quorum = int(m)
	}
	d.done(t)
	return q
}

func (d *decoder) fencing(t *table) Fencing {
	f := Fencing{Timeout: d.duration(t, "timeout", DefaultFenceTimeout, time.Hour)}
	levels := d.tables(t, "level")
	if _, present := t.m["level"]; !present {
		d.errorf(t.key("level"), "missing: at least one fencing level ([[fencing.level]] with agents, or stamp = true); without fencing a failed node's locks could never be recovered")
	}
	stamps := 0
	for _, lt := range levels {
		var lv FenceLevel
		stamp, _ := d.boolean(lt, "stamp")
		agents := d.tables(lt, "agent")
		_, hasAgents := lt.m["agent"]
		switch {
		case stamp && hasAgents:
			d.errorf(lt.path, "a level is either stamp = true or a list of agents, not both")
		case !stamp && !hasAgents:
			d.errorf(lt.path, "empty level: give its agents ([[%s.agent]]) or stamp = true", t.key("level"))
		case stamp:
			lv.Stamp = true
			stamps++
			if stamps == 2 {
				d.errorf(lt.path, "the storage stamp is already a level above")
			}
		}
		for _, at := range agents {
			lv.Agents = append(lv.Agents, d.agent(at))
		}
		if arr, ok := lt.m["agent"].([]any); ok && len(arr) == 0 {
			d.errorf(lt.key("agent"), "empty list of agents")
		}
		d.done(lt)
		f.Levels = append(f.Levels, lv)
	}
	d.done(t)
	return f
}

func (d *decoder) agent(t *table) FenceAgent {
	var a FenceAgent
	if s, ok := d.str(t, "path"); ok {
		if d.absPath(t.key("path"), s) {
			fi, err := d.fs.Stat(s)
			switch {
			case err != nil:
				d.errorf(t.key("path"), "fence agent %s: %v", s, unwrapPathErr(err))
			case !fi.Mode().IsRegular():
				d.errorf(t.key("path"), "fence agent %s is not a regular file", s)
			case fi.Mode().Perm()&0o111 == 0:
				d.errorf(t.key("path"), "fence agent %s is not executable (mode %04o)", s, fi.Mode().Perm())
			default:
				a.Path = s
			}
		}
	} else if _, present := t.m["path"]; !present {
		d.errorf(t.key("path"), "missing: the fence agent's executable, e.g. /usr/sbin/fence_ipmilan")
	}
	a.Timeout = d.duration(t, "timeout", 0, time.Hour)
	a.Verify, _ = d.boolean(t, "verify")
	if _, present := t.m["options"]; present {
		ot := d.subtable(t, "options")
		a.Options = d.stringMap(ot)
		d.checkOptions(ot, a.Options)
	}
	if _, present := t.m["node_options"]; present {
		nt := d.subtable(t, "node_options")
		a.NodeOptions = map[ddraid.NodeID]map[string]string{}
		if d.tooLong(nt.path, len(nt.m)) {
			nt.m = nil
		}
		for k := range nt.m {
			nt.used[k] = true
			f := nt.key(k)
			v, err := strconv.ParseInt(k, 10, 64)
			if err != nil {
				d.errorf(f, "%q is not a node ID: node_options are keyed by node ID, e.g. [%s.\"2\"]", k, nt.path)
				continue
			}
			id, ok := d.nodeID(f, v)
			if !ok {
				continue
			}
			sub := d.subtable(nt, k)
			opts := d.stringMap(sub)
			d.checkOptions(sub, opts)
			a.NodeOptions[ddraid.NodeID(id)] = opts
		}
	}
	d.done(t)
	return a
}

// checkOptions refuses what the fence agent adapter would refuse when
// fencing, so the mistake shows at start, not during a failure.
func (d *decoder) checkOptions(t *table, opts map[string]string) {
	for k, v := range opts {
		switch {
		case k == "action" || k == "nodename":
			d.errorf(t.key(k), "set by the fencer itself (off/status, and the victim's name); it may not be configured")
		case k == "" || strings.ContainsAny(k, "= \t\r\n#"):
			d.errorf(t.key(k), "not a valid agent option name")
		case strings.ContainsAny(v, "\r\n"):
			d.errorf(t.key(k), "the value contains a line break")
		}
	}
}

func unwrapPathErr(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

func (d *decoder) devices(t *table) Devices {
	var dv Devices
	if globs, ok := d.strs(t, "search"); ok {
		for i, g := range globs {
			f := fmt.Sprintf("%s[%d]", t.key("search"), i)
			if !d.absPath(f, g) {
				continue
			}
			if _, err := filepath.Match(g, ""); err != nil {
				d.errorf(f, "%q is not a valid glob pattern", g)
				continue
			}
			dv.Search = append(dv.Search, g)
		}
	}
	if b, ok := d.boolean(t, "shared_kernel"); ok {
		dv.Shared = b
	}
	d.done(t)
	return dv
}

// arrays reads the [[array]] blocks.
func (d *decoder) arrays(root *table, haveSearch bool) []Array {
	var out []Array
	seen := map[string]string{}
	for _, t := range d.tables(root, "array") {
		var a Array
		name, hasName := d.str(t, "name")
		uuid, hasUUID := d.str(t, "uuid")
		switch {
		case hasName && hasUUID:
			d.errorf(t.path, "give the array's name or its uuid, not both")
		case hasName:
			if err := checkArrayName(name); err != nil {
				d.errorf(t.key("name"), "%v", err)
			} else {
				a.Name = name
			}
		case hasUUID:
			u, err := normalizeUUID(uuid)
			if err != nil {
				d.errorf(t.key("uuid"), "%v", err)
			} else {
				a.UUID = u
			}
		default:
			if _, n := t.m["name"]; !n {
				if _, u := t.m["uuid"]; !u {
					d.errorf(t.path, "an array needs its name or its uuid")
				}
			}
		}
		id := a.Name + a.UUID
		if prev, dup := seen["array "+id]; dup && id != "" {
			d.errorf(t.path, "the same array as %s", prev)
		}
		seen["array "+id] = t.path
		ex := d.subtable(t, "export")
		_, hasExport := t.m["export"]
		if !hasExport {
			d.errorf(t.key("export"), "missing: where to export the array ([%s] with socket = \"/run/mdcluster/<name>.nbd\")", "array.export")
		}
		if s, ok := d.str(ex, "socket"); ok {
			if d.absPath(ex.key("socket"), s) {
				if prev, dup := seen["socket "+s]; dup {
					d.errorf(ex.key("socket"), "%s is also the socket of %s", s, prev)
				}
				seen["socket "+s] = t.path
				a.ExportSocket = s
			}
		} else if _, present := ex.m["socket"]; !present && hasExport {
			// An [array.export] table without a socket, empty or not (a
			// missing table is reported above).
			d.errorf(ex.key("socket"), "missing: the unix socket path of the array's NBD export")
		}
		if s, ok := d.str(ex, "tcp"); ok {
			if host, _, ok := d.splitHostPort(ex.key("tcp"), s, 1); ok {
				ip := net.ParseIP(host)
				if host != "localhost" && (ip == nil || !ip.IsLoopback()) {
					d.errorf(ex.key("tcp"), "%q is not a loopback address (127.0.0.0/8, ::1 or localhost): NBD has no authentication, so it is served on this host only", s)
				} else if prev, dup := seen["tcp "+s]; dup {
					d.errorf(ex.key("tcp"), "%s is also the TCP export of %s", s, prev)
				} else {
					seen["tcp "+s] = t.path
					a.ExportTCP = s
				}
			}
		}
		if s, ok := d.str(ex, "nbd_device"); ok {
			if _, err := kernel.ParseDevice(s); err != nil {
				d.errorf(ex.key("nbd_device"), "%v", err)
			} else if prev, dup := seen["nbd "+s]; dup {
				d.errorf(ex.key("nbd_device"), "%s is also the NBD device of %s", s, prev)
			} else {
				seen["nbd "+s] = t.path
				a.NBDDevice = s
			}
		}
		d.done(ex)
		if !haveSearch {
			d.errorf(t.path, "devices.search is empty: there is nowhere to look for this array's members")
		}
		d.done(t)
		out = append(out, a)
	}
	return out
}

// checkArrayName accepts md array names as mdadm writes them (at most 32
// bytes of letters, digits, '.', '_' and '-').
func checkArrayName(s string) error {
	if s == "" || len(s) > 32 {
		return fmt.Errorf("array name %q: 1 to 32 characters", s)
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == '-') {
			return fmt.Errorf("array name %q: only letters, digits, '.', '_' and '-'", s)
		}
	}
	return nil
}

// normalizeUUID accepts an array UUID with any ':' or '-' separators and
// returns it in mdadm's form.
func normalizeUUID(s string) (string, error) {
	h := strings.NewReplacer(":", "", "-", "").Replace(strings.ToLower(s))
	if len(h) != 32 || !isHex([]byte(h)) {
		return "", fmt.Errorf("%q is not an array UUID (32 hex digits, e.g. as mdadm prints it: 3d5f6a1e:8c2b4f70:9a1d2e3f:4b5c6d7e)", s)
	}
	return h[0:8] + ":" + h[8:16] + ":" + h[16:24] + ":" + h[24:32], nil
}

func (d *decoder) log(t *table) Log {
	l := Log{Format: DefaultLogFormat, Level: DefaultLogLevel}
	if s, ok := d.str(t, "format"); ok {
		if s != "text" && s != "json" {
			d.errorf(t.key("format"), "%q is not a log format (\"text\" or \"json\")", s)
		} else {
			l.Format = s
		}
	}
	if s, ok := d.str(t, "level"); ok {
		switch s {
		case "debug", "info", "warn", "error":
			l.Level = s
		default:
			d.errorf(t.key("level"), "%q is not a log level (\"debug\", \"info\", \"warn\" or \"error\")", s)
		}
	}
	d.done(t)
	return l
}

func (d *decoder) metrics(t *table) Metrics {
	m := Metrics{MaxConnections: DefaultMetricsConnections}
	if s, ok := d.str(t, "listen"); ok && s != "" {
		if _, _, ok := d.splitHostPort(t.key("listen"), s, 0); ok {
			m.Listen = s
		}
	}
	m.MaxConnections = int(d.intRange(t, "max_connections", DefaultMetricsConnections, 1, 1024))
	d.done(t)
	return m
}

func (d *decoder) control(t *table) Control {
	c := Control{Socket: ctl.DefaultSocket}
	if s, ok := d.str(t, "socket"); ok {
		switch {
		case !d.absPath(t.key("socket"), s):
		case len(s) > 107:
			d.errorf(t.key("socket"), "%q is %d bytes; a unix socket path has at most 107", s, len(s))
		case filepath.Dir(s) == "/":
			d.errorf(t.key("socket"), "%q: the socket needs a directory of its own (e.g. /run/mdcluster/), made root-only", s)
		default:
			c.Socket = filepath.Clean(s)
		}
	}
	c.MaxRequestBytes = int(d.intRange(t, "max_request_bytes", ctl.DefaultMaxRequest, 1024, ctl.MaxRequestLimit))
	c.MaxConnections = int(d.intRange(t, "max_connections", DefaultControlConnections, 1, 1024))
	c.IdleTimeout = d.duration(t, "idle_timeout", DefaultIdleTimeout, time.Hour)
	c.RefusedLogInterval = d.duration(t, "refused_log_interval", DefaultRefusedLogInterval, 24*time.Hour)
	d.done(t)
	return c
}

func (d *decoder) raid(t *table) RAID {
	r := RAID{SpeedLimitMin: d.intRange(t, "speed_limit_min", DefaultSpeedLimitMin, 1, 1<<30),
		SpeedLimitMax: d.intRange(t, "speed_limit_max", DefaultSpeedLimitMax, 1, 1<<30)}
	if r.SpeedLimitMin > r.SpeedLimitMax {
		d.errorf(t.key("speed_limit_min"), "%d KiB/s is above speed_limit_max (%d KiB/s)", r.SpeedLimitMin, r.SpeedLimitMax)
	}
	r.HoldWait = d.duration(t, "hold_wait", DefaultHoldWait, time.Hour)
	r.RejoinLimit = d.duration(t, "rejoin_limit", DefaultRejoinLimit, 24*time.Hour)
	if r.RejoinLimit > 0 && r.RejoinLimit < time.Second {
		d.errorf(t.key("rejoin_limit"), "%v is too short: one re-join attempt takes at least a lockspace join (at least 1s)", r.RejoinLimit)
	}
	d.done(t)
	return r
}

func (d *decoder) lease(t *table) Lease {
	l := Lease{Enabled: true}
	if b, ok := d.boolean(t, "enabled"); ok {
		l.Enabled = b
	}
	l.Duration = d.duration(t, "duration", DefaultLeaseDuration, time.Hour)
	l.Margin = d.duration(t, "margin", DefaultLeaseMargin, time.Hour)
	l.StopWait = d.duration(t, "stop_wait", 0, time.Hour)
	if l.StopWait == 0 {
		// A stamp fence holds every survivor's I/O from its stamp until the
		// new view is installed, duration + margin later: the default lets
		// their requests wait that out (plus a lease) instead of failing.
		l.StopWait = max(DefaultLeaseStopWait, l.FenceWait()+l.Duration)
	}
	if l.Duration < 100*time.Millisecond {
		d.errorf(t.key("duration"), "%v is too short: the lease must outlast a stamp read (at least 100ms)", l.Duration)
	}
	if s, ok := d.str(t, "watchdog"); ok && s != "" {
		if d.absPath(t.key("watchdog"), s) {
			l.Watchdog = filepath.Clean(s)
		}
	}
	l.WatchdogTimeout = d.duration(t, "watchdog_timeout", DefaultWatchdogTimeout, time.Hour)
	if l.Watchdog != "" {
		if l.WatchdogTimeout < time.Second {
			d.errorf(t.key("watchdog_timeout"), "%v: watchdogs count whole seconds", l.WatchdogTimeout)
		}
		if need := l.WatchdogTimeout + l.Duration/2; l.Margin < need {
			d.errorf(t.key("margin"), "%v is less than the watchdog timeout plus half the lease (%v): a hung node could still write after its fence returned", l.Margin, need)
		}
		if !l.Enabled {
			d.errorf(t.key("watchdog"), "the watchdog is fed by the lease, which is disabled")
		}
	}
	d.done(t)
	return l
}

// crossChecks looks at fields together.
func (d *decoder) crossChecks(cfg *Config) {
	for _, lv := range cfg.Fencing.Levels {
		if lv.Stamp && cfg.Lease.Enabled && cfg.Lease.StopWait < cfg.Lease.FenceWait() {
			d.errorf("lease.stop_wait", "%v is shorter than the stamp fence's wait (duration + margin = %v): every survivor's requests would fail during each fence; raise it above %v",
				cfg.Lease.StopWait, cfg.Lease.FenceWait(), cfg.Lease.FenceWait())
		}
		if lv.Stamp && !cfg.Lease.Enabled {
			d.errorf("fencing.level", "the stamp level needs the I/O lease ([lease] enabled = true): without it a fenced node never stops writing")
		}
	}
	if cfg.Metrics.Listen != "" && cfg.Metrics.Listen == cfg.DLM.ListenAddr {
		d.errorf("metrics.listen", "%s is also dlm.listen_addr", cfg.Metrics.Listen)
	}
	for _, a := range cfg.Arrays {
		if a.ExportSocket != "" && a.ExportSocket == cfg.Control.Socket {
			d.errorf("control.socket", "%s is also an array's export socket", a.ExportSocket)
		}
	}
	if cfg.DataDir != "" && cfg.Control.Socket != "" && strings.HasPrefix(cfg.Control.Socket, cfg.DataDir+"/") {
		d.errorf("control.socket", "%s is inside data_dir; keep the state store's directory to itself", cfg.Control.Socket)
	}
}
