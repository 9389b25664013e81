package gossip

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"
)

var metaTestKey = []byte("gossip metadata test cluster key")

func mustMetaKey(t testing.TB, clusterKey []byte) []byte {
	t.Helper()
	k, err := DeriveMetaKey(clusterKey)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// sealMeta appends a valid MAC to a hand-made body, to test the parser
// behind the MAC.
func sealMeta(key []byte, id NodeID, body []byte) []byte {
	return append(bytes.Clone(body), metaMAC(key, id, body)...)
}

func field(typ byte, val string) []byte {
	b := []byte{typ}
	b = binary.BigEndian.AppendUint16(b, uint16(len(val)))
	return append(b, val...)
}

func TestDeriveMetaKey(t *testing.T) {
	if _, err := DeriveMetaKey([]byte("short")); err == nil {
		t.Fatal("a 5-byte cluster key was accepted")
	}
	k := mustMetaKey(t, metaTestKey)
	g, err := DeriveKey(metaTestKey)
	if err != nil {
		t.Fatal(err)
	}
	if len(k) != 32 || bytes.Equal(k, g) || bytes.Equal(k, mustMetaKey(t, []byte("another cluster's key, 32 bytes."))) {
		t.Fatal("the metadata key must be 32 bytes, differ from the gossip key and differ per cluster")
	}
}

func TestMetaRoundTrip(t *testing.T) {
	key := mustMetaKey(t, metaTestKey)
	for _, m := range []Meta{{}, {DLMAddr: "10.0.0.7:7410"}, {DLMAddr: "[fd00::7]:7410"}, {DLMAddr: "node7.storage.example:7410"}} {
		b, err := EncodeMeta(key, 7, m)
		if err != nil {
			t.Fatalf("%+v: %v", m, err)
		}
		if len(b) > 512 {
			t.Fatalf("%+v: %d bytes, over memberlist's 512", m, len(b))
		}
		got, err := DecodeMeta(key, 7, b)
		if err != nil || got != m {
			t.Fatalf("%+v: decoded %+v, %v", m, got, err)
		}
	}
	// An address of the longest size allowed fits memberlist's limit.
	long := strings.Repeat("a", metaMaxAddr-len(":7410")) + ":7410"
	b, err := EncodeMeta(key, 7, Meta{DLMAddr: long})
	if err != nil || len(b) > 512 {
		t.Fatalf("longest address: %d bytes, %v", len(b), err)
	}
}

func TestMetaRefusesBadAddresses(t *testing.T) {
	key := mustMetaKey(t, metaTestKey)
	for _, addr := range []string{
		"0.0.0.0:7410", "[::]:7410", ":7410", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:65536", "10.0.0.1:x",
		"bad host:1", "h\x00st:1", strings.Repeat("a", 300) + ":1",
	} {
		if _, err := EncodeMeta(key, 7, Meta{DLMAddr: addr}); err == nil {
			t.Errorf("EncodeMeta accepted DLM address %q", addr)
		}
		// The same address from another node (who might run other code) is
		// refused by the decoder.
		rec := sealMeta(key, 7, append([]byte{MetaVersion}, field(metaDLMAddr, addr)...))
		if _, err := DecodeMeta(key, 7, rec); !errors.Is(err, ErrMetaMalformed) {
			t.Errorf("DecodeMeta of DLM address %q: %v, want ErrMetaMalformed", addr, err)
		}
	}
}

func TestMetaAuthentication(t *testing.T) {
	key := mustMetaKey(t, metaTestKey)
	b, err := EncodeMeta(key, 7, Meta{DLMAddr: "10.0.0.7:7410"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := DecodeMeta(key, 8, b); !errors.Is(err, ErrMetaAuth) {
		t.Fatalf("node 7's record presented as node 8's: %v", err)
	}
	if _, err := DecodeMeta(mustMetaKey(t, []byte("another cluster's key, 32 bytes.")), 7, b); !errors.Is(err, ErrMetaAuth) {
		t.Fatalf("record checked with another cluster's key: %v", err)
	}
	for i := range b {
		c := bytes.Clone(b)
		c[i] ^= 0x20
		if m, err := DecodeMeta(key, 7, c); !errors.Is(err, ErrMetaAuth) {
			t.Fatalf("byte %d flipped: %+v, %v", i, m, err)
		}
	}
	for _, n := range []int{0, 1, metaMinLen - 1} {
		if _, err := DecodeMeta(key, 7, b[:n]); !errors.Is(err, ErrMetaMalformed) {
			t.Fatalf("%d bytes: %v", n, err)
		}
	}
	if _, err := DecodeMeta(key, 7, make([]byte, 513)); !errors.Is(err, ErrMetaMalformed) {
		t.Fatalf("513 bytes: %v", err)
	}
}

// TestMetaParser checks the parser behind a valid MAC: what a newer node
// may add is skipped, what no node may send is refused with a reason.
func TestMetaParser(t *testing.T) {
	key := mustMetaKey(t, metaTestKey)
	addr := field(metaDLMAddr, "10.0.0.7:7410")
	cat := func(parts ...[]byte) []byte { return bytes.Join(parts, nil) }
	ok := []struct {
		name string
		body []byte
	}{
		{"unknown fields are skipped", cat([]byte{MetaVersion}, field(99, "from a newer node"), addr, field(200, ""))},
		{"empty record", []byte{MetaVersion}},
	}
	for _, tc := range ok {
		m, err := DecodeMeta(key, 7, sealMeta(key, 7, tc.body))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if tc.name == "unknown fields are skipped" && m.DLMAddr != "10.0.0.7:7410" {
			t.Fatalf("%s: %+v", tc.name, m)
		}
	}
	bad := []struct {
		body []byte
		want string
	}{
		{cat([]byte{2}, addr), "version 2"},
		{cat([]byte{MetaVersion}, addr, addr), "twice"},
		{cat([]byte{MetaVersion}, field(0, "x")), "reserved"},
		{cat([]byte{MetaVersion}, addr[:len(addr)-1]), "only"},
		{cat([]byte{MetaVersion}, addr, []byte{1, 0}), "stray"},
	}
	for _, tc := range bad {
		m, err := DecodeMeta(key, 7, sealMeta(key, 7, tc.body))
		if !errors.Is(err, ErrMetaMalformed) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("body %x: %+v, %v; want ErrMetaMalformed mentioning %q", tc.body, m, err, tc.want)
		}
	}
}

// FuzzDecodeMeta feeds the decoder arbitrary records, both as they come
// (nearly all fail the MAC) and sealed with a valid MAC, so that the parser
// behind it is explored too. The decoder must never panic; whatever it
// accepts must be a dialable address and survive a round trip.
func FuzzDecodeMeta(f *testing.F) {
	key := mustMetaKey(f, metaTestKey)
	good, _ := EncodeMeta(key, 7, Meta{DLMAddr: "10.0.0.7:7410"})
	f.Add(good)
	f.Add(good[:len(good)-metaMACLen])
	f.Add([]byte{MetaVersion})
	f.Add(bytes.Join([][]byte{{MetaVersion}, field(99, "x"), field(metaDLMAddr, "[fd00::1]:1")}, nil))
	f.Add([]byte{MetaVersion, metaDLMAddr, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, b []byte) {
		if m, err := DecodeMeta(key, 7, b); err == nil {
			if !bytes.Equal(b, good) {
				// Only a record made with the key verifies.
				t.Fatalf("an unsealed record %x verified as %+v", b, m)
			}
		}
		if len(b) == 0 {
			return
		}
		m, err := DecodeMeta(key, 7, sealMeta(key, 7, b))
		if err != nil {
			if !errors.Is(err, ErrMetaMalformed) {
				t.Fatalf("sealed record %x: %v, want ErrMetaMalformed", b, err)
			}
			return
		}
		if m.DLMAddr != "" {
			if err := CheckDialAddr(m.DLMAddr); err != nil {
				t.Fatalf("accepted an undialable address: %v", err)
			}
		}
		enc, err := EncodeMeta(key, 7, m)
		if err != nil {
			t.Fatalf("re-encoding %+v: %v", m, err)
		}
		if m2, err := DecodeMeta(key, 7, enc); err != nil || m2 != m {
			t.Fatalf("round trip of %+v: %+v, %v", m, m2, err)
		}
	})
}

// metaLog records OnMeta calls and alive-set changes in one sequence.
type metaLog struct {
	mu     sync.Mutex
	events []string // "meta <id> <addr>", "gone <id>", "alive <ids>"
	addrs  map[NodeID]string
	gone   map[NodeID]bool
}

func (l *metaLog) onMeta(id NodeID, m Meta, gone bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if gone {
		l.events = append(l.events, "gone "+id.String())
		l.gone[id] = true
		return
	}
	l.events = append(l.events, "meta "+id.String()+" "+m.DLMAddr)
	l.addrs[id] = m.DLMAddr
	delete(l.gone, id)
}

func (l *metaLog) onChange(alive []NodeID) {
	l.mu.Lock()
	defer l.mu.Unlock()
	s := make([]string, len(alive))
	for i, id := range alive {
		s[i] = id.String()
	}
	l.events = append(l.events, "alive "+strings.Join(s, ","))
}

func (l *metaLog) addr(id NodeID) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.addrs[id]
}

// index returns the position of the first event with prefix, or -1.
func (l *metaLog) index(prefix string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, e := range l.events {
		if strings.HasPrefix(e, prefix) {
			return i
		}
	}
	return -1
}

// TestDetectorPublishesMeta runs two memberlist instances: each learns the
// other's DLM address before the other is reported alive; an update
// (SetMeta) reaches the other node; records that do not verify (garbage,
// or another node's valid record) are refused, counted and logged once,
// and the address learned before stays; a node that dies is reported gone.
func TestDetectorPublishesMeta(t *testing.T) {
	if testing.Short() {
		t.Skip("real memberlist instances and timers")
	}
	var logs syncBuf
	logger := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelWarn}))
	start := func(id NodeID, addr string) (*Detector, *metaLog) {
		l := &metaLog{addrs: map[NodeID]string{}, gone: map[NodeID]bool{}}
		d, err := NewDetector(Config{Self: id, ClusterKey: metaTestKey, Profile: Fast, Logger: logger,
			Meta: Meta{DLMAddr: addr}, OnMeta: l.onMeta}, l.onChange, nil)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Shutdown() })
		return d, l
	}
	d1, l1 := start(1, "127.0.0.1:7001")
	d2, l2 := start(2, "127.0.0.1:7002")
	if err := d2.Join([]string{d1.Addr()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "both addresses learned", func() bool {
		return l1.addr(2) == "127.0.0.1:7002" && l2.addr(1) == "127.0.0.1:7001"
	})
	waitFor(t, 10*time.Second, "both alive", func() bool { return l1.index("alive 1,2") >= 0 && l2.index("alive 1,2") >= 0 })
	for i, l := range []*metaLog{l1, l2} {
		other := NodeID(2 - i)
		if m, a := l.index("meta "+other.String()), l.index("alive 1,2"); m < 0 || m > a {
			t.Fatalf("node %d: node %d reported alive (event %d) before its metadata (event %d)", i+1, other, a, m)
		}
	}

	if err := d2.SetMeta(Meta{DLMAddr: "127.0.0.1:7003"}, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the updated address", func() bool { return l1.addr(2) == "127.0.0.1:7003" })
	if err := d2.SetMeta(Meta{DLMAddr: "0.0.0.0:7003"}, time.Second); err == nil {
		t.Fatal("SetMeta accepted a wildcard address")
	}

	// Node 2 publishes records that do not verify: garbage, then node 3's
	// valid record (replayed as its own).
	key := mustMetaKey(t, metaTestKey)
	node3s, _ := EncodeMeta(key, 3, Meta{DLMAddr: "10.9.9.9:1"})
	for i, rec := range [][]byte{bytes.Repeat([]byte{0xa5}, 40), node3s} {
		d2.metaMu.Lock()
		d2.metaBytes = rec
		d2.metaMu.Unlock()
		if err := d2.ml.UpdateNode(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		waitFor(t, 10*time.Second, "the bad record rejected", func() bool { return d1.MetaRejected() >= uint64(i+1) })
	}
	if got := l1.addr(2); got != "127.0.0.1:7003" {
		t.Fatalf("node 1 uses DLM address %q for node 2 after bad records, want the last good one", got)
	}
	if n := strings.Count(logs.String(), "ignoring a node's gossip metadata"); n != 1 {
		t.Fatalf("%d log lines for 2 bad records within a minute, want 1:\n%s", n, logs.String())
	}
	if !strings.Contains(logs.String(), "failed authentication") {
		t.Fatalf("the log does not say why:\n%s", logs.String())
	}

	d2.Shutdown()
	waitFor(t, 10*time.Second, "node 2 reported gone", func() bool {
		l1.mu.Lock()
		defer l1.mu.Unlock()
		return l1.gone[2]
	})
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
