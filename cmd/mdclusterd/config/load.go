package config

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"
)

// FS is what the checks read of the machine: the cluster key file, the
// fence agents, the data directory. Load uses the real file system; tests
// and the fuzz target pass their own.
type FS interface {
	// Stat is os.Stat.
	Stat(path string) (fs.FileInfo, error)
	// ReadFile reads at most max bytes of a file, failing if it is larger.
	ReadFile(path string, max int) ([]byte, error)
}

// OSFS is the machine's file system.
type OSFS struct{}

// Stat implements FS.
func (OSFS) Stat(path string) (fs.FileInfo, error) { return os.Stat(path) }

// ReadFile implements FS.
func (OSFS) ReadFile(path string, max int) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, int64(max)+1))
	if err != nil {
		return nil, err
	}
	if len(b) > max {
		return nil, fmt.Errorf("larger than %d bytes", max)
	}
	return b, nil
}

// Load reads and checks the configuration file at path. A bad file gives
// Errors (matching ErrInvalid) listing every problem found; a file that
// cannot be read gives an error saying so. Nothing is created or started.
func Load(path string) (*Config, error) {
	data, err := OSFS{}.ReadFile(path, MaxFileBytes)
	if err != nil {
		return nil, fmt.Errorf("%s: reading the configuration: %w", path, err)
	}
	return Parse(path, data, OSFS{})
}

// Parse checks a configuration document; name is used in error messages
// (the file's path). See Load.
func Parse(name string, data []byte, fsys FS) (*Config, error) {
	if len(data) > MaxFileBytes {
		return nil, Errors{{File: name, Msg: fmt.Sprintf("the file has %d bytes, more than the limit of %d", len(data), MaxFileBytes)}}
	}
	var doc map[string]any
	if err := toml.Unmarshal(data, &doc); err != nil {
		return nil, Errors{syntaxError(name, err)}
	}
	d := &decoder{file: name, pos: indexPositions(data), fs: fsys}
	cfg := d.decode(doc)
	if len(d.errs) > 0 {
		return nil, sortErrors(d.errs)
	}
	cfg.Path = name
	return cfg, nil
}

func syntaxError(name string, err error) *Error {
	var de *toml.DecodeError
	if errors.As(err, &de) {
		line, _ := de.Position()
		msg := de.Error()
		msg = strings.TrimPrefix(msg, "toml: ")
		return &Error{File: name, Line: line, Field: strings.Join(de.Key(), "."), Msg: "TOML: " + msg}
	}
	return &Error{File: name, Msg: "TOML: " + err.Error()}
}

// decoder pulls typed values out of the decoded document, noting every
// problem with its line and every key it used (the others are unknown).
type decoder struct {
	file string
	pos  *positions
	fs   FS
	errs []*Error
}

func (d *decoder) errorf(path, format string, a ...any) {
	d.errs = append(d.errs, &Error{File: d.file, Line: d.pos.line(path), Field: path, Msg: fmt.Sprintf(format, a...)})
}

// table is one TOML table being decoded.
type table struct {
	path  string
	m     map[string]any
	used  map[string]bool
	asked map[string]bool // every key looked up, present or not
}

func newTable(path string, m map[string]any) *table {
	return &table{path: path, m: m, used: map[string]bool{}, asked: map[string]bool{}}
}

func (t *table) key(k string) string { return join(t.path, k) }

// get returns the raw value of key and marks it used.
func (t *table) get(k string) (any, bool) {
	v, ok := t.m[k]
	t.asked[k] = true
	if ok {
		t.used[k] = true
	}
	return v, ok
}

// done reports every key of t that nothing asked for.
func (d *decoder) done(t *table) {
	var keys []string
	for k := range t.m {
		if !t.used[k] {
			keys = append(keys, k)
		}
	}
	sort.Strings(keys)
	for _, k := range keys {
		d.errorf(t.key(k), "unknown key%s", suggest(t, k))
	}
}

// suggest names a known key of t that differs from k only in case or in
// '-' for '_', the usual slips.
func suggest(t *table, k string) string {
	norm := func(s string) string { return strings.ReplaceAll(strings.ToLower(s), "-", "_") }
	for known := range t.asked {
		if norm(known) == norm(k) {
			return fmt.Sprintf(" (did you mean %s?)", t.key(known))
		}
	}
	return ""
}

func typeName(v any) string {
	switch v := v.(type) {
	case string:
		return fmt.Sprintf("string %q", v)
	case int64:
		return fmt.Sprintf("integer %d", v)
	case float64:
		return fmt.Sprintf("float %v", v)
	case bool:
		return fmt.Sprintf("boolean %v", v)
	case []any:
		return "an array"
	case map[string]any:
		return "a table"
	default:
		return fmt.Sprintf("a date or time (%v)", v)
	}
}

func (d *decoder) subtable(t *table, k string) *table {
	v, ok := t.get(k)
	if !ok {
		return newTable(t.key(k), map[string]any{})
	}
	m, ok := v.(map[string]any)
	if !ok {
		d.errorf(t.key(k), "expected a table, got %s", typeName(v))
		return newTable(t.key(k), map[string]any{})
	}
	return newTable(t.key(k), m)
}

// maxList bounds every list in the file (node IDs, seeds, levels, agents,
// arrays, globs): far above any real cluster, low enough that checking
// them stays cheap.
const maxList = 1024

// tooLong reports a list longer than maxList.
func (d *decoder) tooLong(path string, n int) bool {
	if n > maxList {
		d.errorf(path, "%d entries, at most %d", n, maxList)
		return true
	}
	return false
}

// tables returns an array of tables ([[key]] blocks, or an array of
// inline tables).
func (d *decoder) tables(t *table, k string) []*table {
	v, ok := t.get(k)
	if !ok {
		return nil
	}
	arr, ok := v.([]any)
	if !ok {
		if m, isTable := v.(map[string]any); isTable {
			// [key] where [[key]] was meant.
			_ = m
			d.errorf(t.key(k), "expected an array of tables ([[%s]] blocks), got a single table ([%s])", t.key(k), t.key(k))
		} else {
			d.errorf(t.key(k), "expected an array of tables ([[%s]] blocks), got %s", t.key(k), typeName(v))
		}
		return nil
	}
	if d.tooLong(t.key(k), len(arr)) {
		return nil
	}
	var out []*table
	for i, el := range arr {
		p := fmt.Sprintf("%s[%d]", t.key(k), i)
		m, ok := el.(map[string]any)
		if !ok {
			d.errorf(p, "expected a table, got %s", typeName(el))
			continue
		}
		out = append(out, newTable(p, m))
	}
	return out
}

func (d *decoder) str(t *table, k string) (string, bool) {
	v, ok := t.get(k)
	if !ok {
		return "", false
	}
	s, ok := v.(string)
	if !ok {
		d.errorf(t.key(k), "expected a string, got %s", typeName(v))
		return "", false
	}
	return s, true
}

func (d *decoder) integer(t *table, k string) (int64, bool) {
	v, ok := t.get(k)
	if !ok {
		return 0, false
	}
	i, ok := v.(int64)
	if !ok {
		d.errorf(t.key(k), "expected an integer, got %s", typeName(v))
		return 0, false
	}
	return i, true
}

func (d *decoder) boolean(t *table, k string) (bool, bool) {
	v, ok := t.get(k)
	if !ok {
		return false, false
	}
	b, ok := v.(bool)
	if !ok {
		d.errorf(t.key(k), "expected true or false, got %s", typeName(v))
		return false, false
	}
	return b, true
}

// duration reads a Go duration string ("30s", "1m30s"); it must be
// positive and at most max.
func (d *decoder) duration(t *table, k string, def, max time.Duration) time.Duration {
	s, ok := d.str(t, k)
	if !ok {
		return def
	}
	v, err := time.ParseDuration(s)
	switch {
	case err != nil:
		d.errorf(t.key(k), "%q is not a duration (write e.g. \"30s\", \"2m\", \"500ms\")", s)
		return def
	case v <= 0:
		d.errorf(t.key(k), "%q: must be positive", s)
		return def
	case v > max:
		d.errorf(t.key(k), "%q is more than the limit of %v", s, max)
		return def
	}
	return v
}

// strings reads an array of strings.
func (d *decoder) strs(t *table, k string) ([]string, bool) {
	v, ok := t.get(k)
	if !ok {
		return nil, false
	}
	arr, ok := v.([]any)
	if !ok {
		d.errorf(t.key(k), "expected an array of strings, got %s", typeName(v))
		return nil, false
	}
	if d.tooLong(t.key(k), len(arr)) {
		return nil, false
	}
	out := make([]string, 0, len(arr))
	good := true
	for i, el := range arr {
		s, ok := el.(string)
		if !ok {
			d.errorf(fmt.Sprintf("%s[%d]", t.key(k), i), "expected a string, got %s", typeName(el))
			good = false
			continue
		}
		out = append(out, s)
	}
	return out, good
}

// ints reads an array of integers.
func (d *decoder) ints(t *table, k string) ([]int64, bool) {
	v, ok := t.get(k)
	if !ok {
		return nil, false
	}
	arr, ok := v.([]any)
	if !ok {
		d.errorf(t.key(k), "expected an array of integers, got %s", typeName(v))
		return nil, false
	}
	if d.tooLong(t.key(k), len(arr)) {
		return nil, false
	}
	out := make([]int64, 0, len(arr))
	good := true
	for i, el := range arr {
		n, ok := el.(int64)
		if !ok {
			d.errorf(fmt.Sprintf("%s[%d]", t.key(k), i), "expected an integer, got %s", typeName(el))
			good = false
			continue
		}
		out = append(out, n)
	}
	return out, good
}

// intRange reads an integer in [lo, hi], or def when absent.
func (d *decoder) intRange(t *table, k string, def, lo, hi int64) int64 {
	v, ok := d.integer(t, k)
	if !ok {
		return def
	}
	if v < lo || v > hi {
		d.errorf(t.key(k), "%d is out of range (%d to %d)", v, lo, hi)
		return def
	}
	return v
}

// nodeID checks one node ID value.
func (d *decoder) nodeID(path string, v int64) (uint32, bool) {
	if v < 1 || v > 1<<32-1 {
		d.errorf(path, "node ID %d is out of range (1 to %d; 0 is reserved)", v, uint32(1<<32-1))
		return 0, false
	}
	return uint32(v), true
}

// stringMap reads a table of option values (strings; integers and
// booleans are taken in their TOML spelling, as agents get them as text).
func (d *decoder) stringMap(t *table) map[string]string {
	out := map[string]string{}
	if d.tooLong(t.path, len(t.m)) {
		for k := range t.m {
			t.used[k] = true
		}
		return out
	}
	for k, v := range t.m {
		t.used[k] = true
		switch v := v.(type) {
		case string:
			out[k] = v
		case int64:
			out[k] = strconv.FormatInt(v, 10)
		case bool:
			out[k] = strconv.FormatBool(v)
		default:
			d.errorf(t.key(k), "expected a string, integer or boolean option value, got %s", typeName(v))
		}
	}
	return out
}
