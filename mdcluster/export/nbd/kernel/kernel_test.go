package kernel

import (
	"strings"
	"testing"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
)

// decoded is a CONNECT request's attributes read back.
type decoded struct {
	u64   map[uint16]uint64
	index int
	fds   []int
	id    string
	items int // nests inside SOCKETS, whatever their type
	bad   []uint16
}

func decodeConnect(t *testing.T, b []byte) decoded {
	t.Helper()
	d := decoded{u64: map[uint16]uint64{}, index: -1}
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		t.Fatal(err)
	}
	for ad.Next() {
		switch ad.Type() {
		case attrIndex:
			d.index = int(ad.Uint32())
		case attrSizeBytes, attrBlockSizeBytes, attrTimeout, attrServerFlags, attrClientFlags, attrDeadConnTimeout:
			if n := len(ad.Bytes()); n != 8 {
				t.Errorf("attribute %d: %d bytes, the kernel reads a u64", ad.Type(), n)
			}
			d.u64[ad.Type()] = ad.Uint64()
		case attrBackendID:
			d.id = ad.String()
		case attrSockets:
			ad.Nested(func(items *netlink.AttributeDecoder) error {
				for items.Next() {
					d.items++
					if items.Type() != sockItem {
						d.bad = append(d.bad, items.Type())
						continue
					}
					items.Nested(func(it *netlink.AttributeDecoder) error {
						for it.Next() {
							if it.Type() == sockFD {
								d.fds = append(d.fds, int(it.Uint32()))
							}
						}
						return nil
					})
				}
				return nil
			})
		default:
			d.bad = append(d.bad, ad.Type())
		}
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	return d
}

func TestConnectAttributes(t *testing.T) {
	o := Options{Index: 3, Size: 64 << 20, BlockSize: 4096, ServerFlags: 0x1ab,
		Timeout: 1500 * time.Millisecond, DeadConnTimeout: 0, BackendID: "md0 1234", DestroyOnDisconnect: true}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	b, err := connectAttrs(o, []int{7, 9})
	if err != nil {
		t.Fatal(err)
	}
	d := decodeConnect(t, b)
	if d.index != 3 {
		t.Errorf("index %d, want 3", d.index)
	}
	want := map[uint16]uint64{attrSizeBytes: 64 << 20, attrBlockSizeBytes: 4096, attrServerFlags: 0x1ab,
		attrTimeout: 2 /* rounded up, never 0 = none */, attrDeadConnTimeout: 0, attrClientFlags: clientFlagDestroyOnDisconnect}
	for k, v := range want {
		if got, ok := d.u64[k]; !ok || got != v {
			t.Errorf("attribute %d = %d (present %v), want %d", k, got, ok, v)
		}
	}
	if len(d.fds) != 2 || d.fds[0] != 7 || d.fds[1] != 9 || d.items != 2 || len(d.bad) != 0 {
		t.Errorf("sockets %v (items %d, unexpected types %v), want [7 9] each in its own SOCK_ITEM", d.fds, d.items, d.bad)
	}
	if d.id != "md0 1234" {
		t.Errorf("backend id %q", d.id)
	}

	// Any index: no INDEX attribute at all (the kernel then picks one);
	// no timeout: no TIMEOUT attribute (0 would be the same, but absent
	// is what the kernel documents).
	o = Options{Index: AnyIndex, Size: 1 << 20}
	if err := o.validate(); err != nil {
		t.Fatal(err)
	}
	b, err = connectAttrs(o, []int{4})
	if err != nil {
		t.Fatal(err)
	}
	d = decodeConnect(t, b)
	if d.index != -1 {
		t.Errorf("index %d sent for AnyIndex", d.index)
	}
	if _, ok := d.u64[attrTimeout]; ok {
		t.Error("TIMEOUT sent without a timeout")
	}
	if d.u64[attrBlockSizeBytes] != 512 {
		t.Errorf("default block size %d, want 512", d.u64[attrBlockSizeBytes])
	}
	if _, err := connectAttrs(o, nil); err == nil {
		t.Error("a CONNECT without sockets was encoded")
	}
}

func TestOptionsValidate(t *testing.T) {
	for _, c := range []struct {
		o    Options
		want string
	}{
		{Options{Index: -2, Size: 4096}, "out of range"},
		{Options{Index: MaxIndex + 1, Size: 4096}, "out of range"},
		{Options{Size: 0}, "must be positive"},
		{Options{Size: 4096, BlockSize: 1000}, "power of two"},
		{Options{Size: 1 << 20, BlockSize: 8192}, "power of two"},
		{Options{Size: 4096 + 512, BlockSize: 4096}, "not a multiple"},
		{Options{Size: 4096, Timeout: -time.Second}, "negative"},
		{Options{Size: 4096, BackendID: strings.Repeat("x", 300)}, "at most 256"},
	} {
		err := c.o.validate()
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want one containing %q", c.o, err, c.want)
		}
	}
}

func TestParseDevice(t *testing.T) {
	for in, want := range map[string]int{"/dev/nbd0": 0, "/dev/nbd15": 15, "/dev/nbd65535": 65535} {
		if n, err := ParseDevice(in); err != nil || n != want {
			t.Errorf("ParseDevice(%q) = %d, %v", in, n, err)
		}
		if Device(want) != in {
			t.Errorf("Device(%d) = %q", want, Device(want))
		}
	}
	for _, bad := range []string{"", "nbd0", "/dev/nbd", "/dev/nbd-1", "/dev/nbd01", "/dev/nbd65536", "/dev/sda", "/dev/nbd0p1", "/dev/nbd99999999999999999999"} {
		if _, err := ParseDevice(bad); err == nil {
			t.Errorf("ParseDevice(%q) accepted", bad)
		}
	}
}

func TestParseStatusAndReplyIndex(t *testing.T) {
	ae := netlink.NewAttributeEncoder()
	ae.Nested(attrDeviceList, func(l *netlink.AttributeEncoder) error {
		for i, c := range []uint8{1, 0, 1} {
			l.Nested(deviceItem, func(it *netlink.AttributeEncoder) error {
				it.Uint32(deviceIndex, uint32(i*2))
				it.Uint8(deviceConnected, c)
				return nil
			})
		}
		return nil
	})
	b, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	st, err := parseStatus([]genetlink.Message{{Data: b}})
	if err != nil {
		t.Fatal(err)
	}
	if len(st) != 3 || !st[0] || st[2] || !st[4] {
		t.Errorf("status %v, want map[0:true 2:false 4:true]", st)
	}
	ae = netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, 11)
	b, _ = ae.Encode()
	if n, ok := replyIndex([]genetlink.Message{{Data: nil}, {Data: b}}); !ok || n != 11 {
		t.Errorf("reply index %d %v, want 11", n, ok)
	}
	if _, ok := replyIndex([]genetlink.Message{{Data: nil}}); ok {
		t.Error("an index found in an empty reply")
	}
}
