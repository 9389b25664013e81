package nbd

import (
	"bytes"
	"encoding/binary"
	"net"
	"strings"
	"testing"
	"time"
)

func dialRaw(t *testing.T, sock string) *rawClient {
	t.Helper()
	nc, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return newRaw(t, nc)
}

func TestGoReportsExportInfo(t *testing.T) {
	_, sock, _ := memServer(t, 1<<20, nil)
	r := dialRaw(t, sock)
	r.start(true)
	e := r.info(optGo, "mem", infoName, infoDescription, infoBlockSize, 999)
	if e.finalType != repAck {
		t.Fatalf("GO: final reply 0x%x %q", e.finalType, e.finalMsg)
	}
	if e.exportInfoCount != 1 || e.size != 1<<20 {
		t.Fatalf("NBD_INFO_EXPORT count %d size %d", e.exportInfoCount, e.size)
	}
	want := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendTrim | tflagSendZeroes | tflagSendFastZero | tflagCanMultiConn)
	if e.flags != want {
		t.Fatalf("transmission flags 0x%x, want 0x%x", e.flags, want)
	}
	if !e.hasName || e.name != "mem" || e.desc != "test memory" {
		t.Fatalf("name %q (sent %v), description %q", e.name, e.hasName, e.desc)
	}
	if !e.hasBlock || e.minB != 1 || e.prefB != 4096 || e.maxB != 32<<20 {
		t.Fatalf("block sizes %d/%d/%d", e.minB, e.prefB, e.maxB)
	}
	if e.other != 0 {
		t.Fatalf("%d unexpected info replies", e.other)
	}
	// GO's ACK starts transmission at once: a read works.
	c := startClient(t, r.nc, r.br, e.size, e.flags)
	r.nc.SetDeadline(time.Time{})
	if _, errno := c.read(0, 512); errno != 0 {
		t.Fatalf("read after GO: errno %d", errno)
	}
}

func TestInfoThenGoAndDefaultExport(t *testing.T) {
	_, sock, _ := memServer(t, 8192, nil)
	r := dialRaw(t, sock)
	r.start(false)
	// Without asking for the name, none is sent; INFO does not end
	// negotiation.
	e := r.info(optInfo, "")
	if e.finalType != repAck || e.size != 8192 || e.hasName {
		t.Fatalf("INFO on the default export: %+v", e)
	}
	if !e.hasBlock {
		t.Fatalf("block sizes not announced unasked")
	}
	// The empty name is the only export; asked for, its canonical name
	// comes back.
	e = r.info(optGo, "", infoName)
	if e.finalType != repAck || e.name != "mem" {
		t.Fatalf("GO on the default export: final 0x%x name %q", e.finalType, e.name)
	}
}

func TestExportNameWithAndWithoutZeroes(t *testing.T) {
	for _, noZeroes := range []bool{false, true} {
		_, sock, m := memServer(t, 4096, nil)
		copy(m.Bytes(), "hello")
		r := dialRaw(t, sock)
		r.start(noZeroes)
		r.sendOpt(optExportName, []byte("mem"))
		var b [10]byte
		if _, err := ioReadFull(r, b[:]); err != nil {
			t.Fatal(err)
		}
		if size := binary.BigEndian.Uint64(b[:]); size != 4096 {
			t.Fatalf("size %d", size)
		}
		if !noZeroes {
			pad := make([]byte, 124)
			if _, err := ioReadFull(r, pad); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(pad, make([]byte, 124)) {
				t.Fatalf("padding not zero")
			}
		}
		// The next bytes are the read reply, not more padding.
		c := startClient(t, r.nc, r.br, 4096, binary.BigEndian.Uint16(b[8:]))
		r.nc.SetDeadline(time.Time{})
		got, errno := c.read(0, 5)
		if errno != 0 || string(got) != "hello" {
			t.Fatalf("noZeroes=%v: read %q errno %d", noZeroes, got, errno)
		}
	}
}

func ioReadFull(r *rawClient, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := r.br.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

func TestExportNameUnknownCloses(t *testing.T) {
	s, sock, _ := memServer(t, 4096, nil)
	r := dialRaw(t, sock)
	r.start(true)
	r.sendOpt(optExportName, []byte("nope"))
	r.expectClosed()
	waitFor(t, "failure counted", func() bool { return s.Stats().HandshakeFailures == 1 })
}

func TestListAndMultipleExports(t *testing.T) {
	a, b := NewMemBackend(4096), NewMemBackend(8192)
	copy(b.Bytes(), "bbb")
	_, sock := startServer(t, Config{DefaultExport: "b", Exports: []Export{
		{Name: "a", Backend: a},
		{Name: "b", Description: "second", Backend: b},
	}})
	r := dialRaw(t, sock)
	r.start(true)
	rs := r.expectFinal(optList, nil, repAck)
	var names, texts []string
	for _, m := range rs[:len(rs)-1] {
		if m.typ != repServer {
			t.Fatalf("LIST reply type 0x%x", m.typ)
		}
		n := binary.BigEndian.Uint32(m.data)
		names = append(names, string(m.data[4:4+n]))
		texts = append(texts, string(m.data[4+n:]))
	}
	if strings.Join(names, ",") != "a,b" || texts[1] != "second" {
		t.Fatalf("LIST: names %q texts %q", names, texts)
	}
	r.expectFinal(optList, []byte{0}, repErrInvalid)
	if e := r.info(optInfo, "a"); e.size != 4096 {
		t.Fatalf("INFO a: size %d", e.size)
	}
	e := r.info(optGo, "")
	if e.finalType != repAck || e.size != 8192 {
		t.Fatalf("GO default (b): %+v", e)
	}
	c := startClient(t, r.nc, r.br, e.size, e.flags)
	r.nc.SetDeadline(time.Time{})
	if got, _ := c.read(0, 3); string(got) != "bbb" {
		t.Fatalf("default export served %q", got)
	}
}

func TestNoDefaultExport(t *testing.T) {
	_, sock := startServer(t, Config{Exports: []Export{
		{Name: "a", Backend: NewMemBackend(512)}, {Name: "b", Backend: NewMemBackend(512)},
	}})
	r := dialRaw(t, sock)
	r.start(true)
	if e := r.info(optGo, ""); e.finalType != repErrUnknown || e.exportInfoCount != 0 {
		t.Fatalf("GO with no default export: %+v", e)
	}
	r.sendOpt(optExportName, nil)
	r.expectClosed()
}

func TestAbort(t *testing.T) {
	s, sock, _ := memServer(t, 4096, nil)
	r := dialRaw(t, sock)
	r.start(true)
	r.expectFinal(optAbort, []byte("ignored"), repAck)
	r.expectClosed()
	waitFor(t, "connection gone", func() bool { return s.Stats().ConnectionsActive == 0 })
	if st := s.Stats(); st.HandshakeFailures != 0 {
		t.Fatalf("abort counted as a failure: %+v", st)
	}
}

func TestUnsupportedOptionsKeepNegotiationInStep(t *testing.T) {
	s, sock, _ := memServer(t, 4096, func(c *Config) { c.MaxOptionLength = 1024 })
	r := dialRaw(t, sock)
	r.start(true)
	r.expectFinal(optStructuredReply, nil, repErrUnsup)
	r.expectFinal(optStartTLS, nil, repErrUnsup)
	r.expectFinal(optSetMetaContext, []byte("0123456789"), repErrUnsup)
	r.expectFinal(optExtendedHeaders, nil, repErrUnsup)
	r.expectFinal(12345, bytes.Repeat([]byte{0xff}, 100), repErrUnsup)
	r.expectFinal(optInfo, bytes.Repeat([]byte{1}, 5000), repErrTooBig) // over MaxOptionLength: skipped
	// Malformed GO payloads: a name running past the data, a count that
	// does not match, too short.
	r.expectFinal(optGo, []byte{0, 0, 0, 9, 'm', 'e', 'm', 0, 0}, repErrInvalid)
	r.expectFinal(optGo, []byte{0, 0, 0, 3, 'm', 'e', 'm', 0, 2, 0, 1}, repErrInvalid)
	r.expectFinal(optGo, []byte{0, 0}, repErrInvalid)
	r.expectFinal(optGo, appendInfoRequest(nil, infoRequest{name: "other"}), repErrUnknown)
	if e := r.info(optGo, "mem"); e.finalType != repAck {
		t.Fatalf("GO after refused options: 0x%x %q", e.finalType, e.finalMsg)
	}
	if got := s.Stats().OptionsRefused; got != 10 {
		t.Fatalf("OptionsRefused %d, want 10", got)
	}
}

func TestBadHandshakesClose(t *testing.T) {
	cases := []struct {
		name string
		send func(r *rawClient)
	}{
		{"unknown client flag", func(r *rawClient) { r.clientFlags(flagCFixedNewstyle | 4) }},
		{"not fixed newstyle", func(r *rawClient) { r.clientFlags(0) }},
		{"bad option magic", func(r *rawClient) {
			r.clientFlags(flagCFixedNewstyle)
			b := optBytes(optGo, nil)
			b[0] ^= 1
			r.write(b)
		}},
		{"export name over MaxOptionLength", func(r *rawClient) {
			// EXPORT_NAME has no error reply, so even a skippable
			// length ends the connection.
			r.clientFlags(flagCFixedNewstyle)
			r.write(optBytes(optExportName, make([]byte, 20<<10))[:16])
		}},
		{"oldstyle-looking garbage", func(r *rawClient) { r.write([]byte("NBDMAGIC\x00\x42\x02\x81\x86\x12\x53")) }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s, sock, _ := memServer(t, 4096, nil)
			r := dialRaw(t, sock)
			if _, err := r.greeting(); err != nil {
				t.Fatal(err)
			}
			tc.send(r)
			r.expectClosed()
			waitFor(t, "failure counted", func() bool { return s.Stats().HandshakeFailures == 1 })
		})
	}
}

func TestTooManyOptions(t *testing.T) {
	s, sock, _ := memServer(t, 4096, func(c *Config) { c.MaxOptions = 3 })
	r := dialRaw(t, sock)
	r.start(true)
	for i := 0; i < 3; i++ {
		r.expectFinal(optStructuredReply, nil, repErrUnsup)
	}
	// The server hangs up rather than wait for a fourth.
	r.expectClosed()
	waitFor(t, "failure counted", func() bool { return s.Stats().HandshakeFailures == 1 })
}

func TestHandshakeDeadlineFreesSlot(t *testing.T) {
	s, sock, _ := memServer(t, 4096, func(c *Config) {
		c.MaxConnections = 1
		c.HandshakeTimeout = 200 * time.Millisecond
	})
	// A client that connects and then says nothing holds the only slot...
	silent := dialRaw(t, sock)
	if _, err := silent.greeting(); err != nil {
		t.Fatal(err)
	}
	// ...so a second one is refused at once,
	refused := dialRaw(t, sock)
	refused.expectClosed()
	// until the deadline drops the silent one.
	start := time.Now()
	silent.expectClosed()
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("silent client dropped after %v", d)
	}
	waitFor(t, "slot free", func() bool { return s.Stats().ConnectionsActive == 0 })
	c := dialGo(t, sock, "mem")
	if _, errno := c.read(0, 1); errno != 0 {
		t.Fatalf("read: %d", errno)
	}
	st := s.Stats()
	if st.Timeouts != 1 || st.ConnectionsRefused != 1 || st.HandshakeFailures != 1 {
		t.Fatalf("stats %+v", st)
	}
}

func TestMinBlockSizeNeedsBlockSizeInfo(t *testing.T) {
	caps := NewMemBackend(0).Capabilities()
	caps.MinBlockSize = 512
	h := &hookBackend{Backend: NewMemBackend(1 << 16), caps: &caps}
	_, sock := startServer(t, Config{Exports: []Export{{Name: "x", Backend: h}}})
	r := dialRaw(t, sock)
	r.start(true)
	if e := r.info(optGo, "x"); e.finalType != repErrBlockSizeReq || e.minB != 512 {
		t.Fatalf("GO without block size request: %+v", e)
	}
	e := r.info(optGo, "x", infoBlockSize)
	if e.finalType != repAck {
		t.Fatalf("GO with block size request: 0x%x", e.finalType)
	}
	c := startClient(t, r.nc, r.br, e.size, e.flags)
	r.nc.SetDeadline(time.Time{})
	if _, errno := c.read(512, 512); errno != 0 {
		t.Fatalf("aligned read: %d", errno)
	}
	for _, rq := range [][2]uint64{{1, 512}, {512, 100}} {
		if _, errno := c.read(rq[0], uint32(rq[1])); errno != errnoInval {
			t.Fatalf("unaligned read %v: errno %d, want EINVAL", rq, errno)
		}
	}
}

func TestConfigErrors(t *testing.T) {
	m := NewMemBackend(4096)
	bad := func(c Capabilities) Backend { return &hookBackend{Backend: m, caps: &c} }
	cases := map[string]Config{
		"no exports":        {},
		"duplicate":         {Exports: []Export{{Name: "a", Backend: m}, {Name: "a", Backend: m}}},
		"no backend":        {Exports: []Export{{Name: "a"}}},
		"long name":         {Exports: []Export{{Name: strings.Repeat("x", 4097), Backend: m}}},
		"bad utf8":          {Exports: []Export{{Name: "\xff", Backend: m}}},
		"unknown default":   {DefaultExport: "b", Exports: []Export{{Name: "a", Backend: m}}},
		"min not pow2":      {Exports: []Export{{Name: "a", Backend: bad(Capabilities{MinBlockSize: 3})}}},
		"min too big":       {Exports: []Export{{Name: "a", Backend: bad(Capabilities{MinBlockSize: 128 << 10})}}},
		"pref below min":    {Exports: []Export{{Name: "a", Backend: bad(Capabilities{MinBlockSize: 4096, PreferredBlockSize: 512})}}},
		"max below pref":    {Exports: []Export{{Name: "a", Backend: bad(Capabilities{PreferredBlockSize: 4096, MaxPayload: 512})}}},
		"payload too big":   {MaxPayload: 1 << 32, Exports: []Export{{Name: "a", Backend: m}}},
		"payload below min": {MaxPayload: 256, Exports: []Export{{Name: "a", Backend: bad(Capabilities{MinBlockSize: 512})}}},
	}
	for name, cfg := range cases {
		if _, err := NewServer(cfg); err == nil {
			t.Errorf("%s: NewServer accepted the config", name)
		}
	}
}
