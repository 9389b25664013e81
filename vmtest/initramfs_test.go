package vmtest

import (
	"bytes"
	"reflect"
	"strconv"
	"testing"
)

// readNewc parses a newc archive back into name -> (mode, data), checking
// the alignment rules the kernel's unpacker relies on.
func readNewc(t *testing.T, b []byte) (names []string, modes map[string]uint32, data map[string]string) {
	t.Helper()
	modes, data = map[string]uint32{}, map[string]string{}
	field := func(h []byte, i int) int {
		v, err := strconv.ParseUint(string(h[6+8*i:14+8*i]), 16, 32)
		if err != nil {
			t.Fatalf("bad header field %d: %v", i, err)
		}
		return int(v)
	}
	off := 0
	for {
		if off%4 != 0 || off+110 > len(b) || string(b[off:off+6]) != "070701" {
			t.Fatalf("no newc header at offset %d", off)
		}
		h := b[off : off+110]
		mode, size, nameLen := field(h, 1), field(h, 6), field(h, 11)
		name := string(b[off+110 : off+110+nameLen-1])
		off += 110 + nameLen
		off += (4 - off%4) % 4
		if name == "TRAILER!!!" {
			if off != len(b) {
				t.Fatalf("%d bytes after the trailer", len(b)-off)
			}
			return
		}
		names = append(names, name)
		modes[name] = uint32(mode)
		data[name] = string(b[off : off+size])
		off += size
		off += (4 - off%4) % 4
	}
}

func TestInitramfsWritesNewc(t *testing.T) {
	r := NewInitramfs()
	r.AddFile("/init", []byte("#!/bin/sh\n"), 0o755)
	r.AddFile("lib/modules/a.ko", []byte("abcde"), 0o644)
	r.AddSymlink("bin/sh", "busybox")
	var buf bytes.Buffer
	n, err := r.WriteTo(&buf)
	if err != nil || n != int64(buf.Len()) {
		t.Fatalf("WriteTo = %d, %v; wrote %d", n, err, buf.Len())
	}
	names, modes, data := readNewc(t, buf.Bytes())
	// Directories first (parents before children; "dev" for dev/console),
	// then the rest in name order.
	want := []string{"bin", "dev", "lib", "lib/modules", "bin/sh", "dev/console", "init", "lib/modules/a.ko"}
	if !reflect.DeepEqual(names, want) {
		t.Fatalf("entries %q, want %q", names, want)
	}
	if modes["init"] != 0o100755 || data["init"] != "#!/bin/sh\n" {
		t.Errorf("init: mode %o data %q", modes["init"], data["init"])
	}
	if modes["bin/sh"] != 0o120777 || data["bin/sh"] != "busybox" {
		t.Errorf("bin/sh: mode %o data %q", modes["bin/sh"], data["bin/sh"])
	}
	if modes["dev/console"] != 0o020600 || modes["lib"] != 0o040755 {
		t.Errorf("dev/console mode %o, lib mode %o", modes["dev/console"], modes["lib"])
	}
	if data["lib/modules/a.ko"] != "abcde" {
		t.Errorf("a.ko data %q", data["lib/modules/a.ko"])
	}
}

func TestLoadOrderPutsDependenciesFirst(t *testing.T) {
	deps := map[string][]string{
		"raid10": {"md_mod"}, "raid1": {"md_mod"}, "md_mod": nil,
		"virtio_blk": {"virtio", "virtio_ring"}, "virtio": nil, "virtio_ring": nil,
		"a": {"b"}, "b": {"a"},
	}
	get := func(n string) ([]string, error) { return deps[n], nil }
	got, err := loadOrder([]string{"raid1", "raid10.ko", "virtio-blk", "md-mod"}, get)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"md_mod", "raid1", "raid10", "virtio", "virtio_ring", "virtio_blk"}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("order %q, want %q", got, want)
	}
	if _, err := loadOrder([]string{"a"}, get); err == nil {
		t.Error("a dependency cycle was accepted")
	}
}
