package broadcast

import (
	"bytes"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/mdcluster/mdcluster/dlm"
)

// TestTypeNumbers pins md-cluster's message type numbers: they travel
// between nodes and md only ever appends new ones.
func TestTypeNumbers(t *testing.T) {
	want := map[Type]string{0: "METADATA_UPDATED", 1: "RESYNCING", 2: "NEWDISK", 3: "REMOVE", 4: "RE_ADD",
		5: "BITMAP_NEEDS_SYNC", 6: "CHANGE_CAPACITY", 7: "BITMAP_RESIZE", 8: "RESYNCING_START"}
	for ty, name := range want {
		if ty.String() != name || !ty.Known() {
			t.Fatalf("type %d is %q (known %v), want %q", uint32(ty), ty, ty.Known(), name)
		}
	}
	if Type(9).Known() || Type(9).String() != "type(9)" {
		t.Fatalf("type 9: %v %v", Type(9).Known(), Type(9))
	}
}

// TestEnvelopeLayout checks every field's offset against md's struct
// cluster_msg and the documented trailer.
func TestEnvelopeLayout(t *testing.T) {
	e := Envelope{Msg: Message{Type: NewDisk, Slot: 2, Low: 0x1122334455667788, High: 0x99aabbccddeeff00, RaidSlot: 0xdeadbeef},
		Seq: 0x0102030405060708, Sender: 3, Toggle: 1}
	for i := range e.Msg.UUID {
		e.Msg.UUID[i] = byte(0xa0 + i)
	}
	b := e.Encode(LVBSize)
	le := binary.LittleEndian
	if len(b) != 64 || le.Uint32(b[0:]) != 2 || le.Uint32(b[4:]) != 2 || le.Uint64(b[8:]) != e.Msg.Low ||
		le.Uint64(b[16:]) != e.Msg.High || !bytes.Equal(b[24:40], e.Msg.UUID[:]) || le.Uint32(b[40:]) != 0xdeadbeef ||
		!bytes.Equal(b[44:48], []byte{0, 0, 0, 0}) || le.Uint64(b[48:]) != e.Seq || le.Uint32(b[56:]) != 3 ||
		b[60] != 1 || b[61] != 1 || !bytes.Equal(b[62:64], []byte{0, 0}) {
		t.Fatalf("layout: %x", b)
	}
	got, err := DecodeEnvelope(b)
	if err != nil || got != e {
		t.Fatalf("decode: %+v %v", got, err)
	}
	// A longer value block: the extra bytes are zero and ignored.
	got, err = DecodeEnvelope(e.Encode(128))
	if err != nil || got != e {
		t.Fatalf("decode from 128 bytes: %+v %v", got, err)
	}
}

// TestEnvelopeUnknownTypeDecodes: a type from a newer node decodes; it is
// answered as unknown, never dropped.
func TestEnvelopeUnknownTypeDecodes(t *testing.T) {
	e := Envelope{Msg: Message{Type: 1000, Slot: 0}, Seq: 5, Sender: 1}
	got, err := DecodeEnvelope(e.Encode(LVBSize))
	if err != nil || got.Msg.Type != 1000 {
		t.Fatalf("%+v %v", got, err)
	}
}

// TestEnvelopeMalformed: each inconsistency is refused with ErrMalformed,
// and an all-zero block with ErrEmpty.
func TestEnvelopeMalformed(t *testing.T) {
	good := Envelope{Msg: Message{Type: Remove, Slot: 1}, Seq: 9, Sender: 2}.Encode(LVBSize)
	cases := map[string]func(b []byte) []byte{
		"short":            func(b []byte) []byte { return b[:63] },
		"padding":          func(b []byte) []byte { b[45] = 1; return b },
		"version":          func(b []byte) []byte { b[60] = 2; return b },
		"reserved trailer": func(b []byte) []byte { b[63] = 1; return b },
		"trailer flags":    func(b []byte) []byte { b[61] = 2; return b },
		"sequence 0":       func(b []byte) []byte { clear(b[48:56]); return b },
		"no sender":        func(b []byte) []byte { clear(b[56:60]); return b },
		"sender too high":  func(b []byte) []byte { binary.LittleEndian.PutUint32(b[56:], MaxNode+1); return b },
		"slot not sender's": func(b []byte) []byte {
			binary.LittleEndian.PutUint32(b[4:], 5)
			return b
		},
		"junk past 64": func(b []byte) []byte { return append(b, 0, 1) },
	}
	for name, mut := range cases {
		_, err := DecodeEnvelope(mut(bytes.Clone(good)))
		if !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := DecodeEnvelope(make([]byte, LVBSize)); !errors.Is(err, ErrEmpty) {
		t.Errorf("zero block: %v", err)
	}
}

// TestReplyRoundTrip: replies keep their fields; long or invalid text is
// cut at a rune boundary and stays valid UTF-8.
func TestReplyRoundTrip(t *testing.T) {
	for _, r := range []Reply{
		{Seq: 1, Node: 1, Status: StatusActed},
		{Seq: 1 << 60, Node: MaxNode, Status: StatusFailed, Text: "device not found"},
		{Seq: 7, Node: 2, Status: Status(200), Text: "from a newer version"},
	} {
		got, err := DecodeReply(r.Encode(LVBSize))
		if err != nil || got != r {
			t.Fatalf("%+v: %+v %v", r, got, err)
		}
	}
	long := strings.Repeat("é", 40) // 80 bytes
	got, err := DecodeReply(Reply{Seq: 1, Node: 1, Status: StatusFailed, Text: long}.Encode(LVBSize))
	if err != nil || len(got.Text) > MaxReplyText || !utf8.ValidString(got.Text) || !strings.HasPrefix(long, got.Text) || len(got.Text) < MaxReplyText-1 {
		t.Fatalf("long text: %q %v", got.Text, err)
	}
	got, err = DecodeReply(Reply{Seq: 1, Node: 1, Status: StatusFailed, Text: "bad\xff"}.Encode(LVBSize))
	if err != nil || !utf8.ValidString(got.Text) {
		t.Fatalf("invalid text: %q %v", got.Text, err)
	}
}

func TestReplyMalformed(t *testing.T) {
	good := Reply{Seq: 3, Node: 2, Status: StatusFailed, Text: "x"}.Encode(LVBSize)
	cases := map[string]func(b []byte) []byte{
		"short":         func(b []byte) []byte { return b[:10] },
		"version":       func(b []byte) []byte { b[14] = 9; return b },
		"reserved":      func(b []byte) []byte { b[15] = 1; return b },
		"node 0":        func(b []byte) []byte { clear(b[8:12]); return b },
		"text too long": func(b []byte) []byte { b[13] = 49; return b },
		"after text":    func(b []byte) []byte { b[20] = 'y'; return b },
		"not utf-8":     func(b []byte) []byte { b[16] = 0xff; return b },
	}
	for name, mut := range cases {
		if _, err := DecodeReply(mut(bytes.Clone(good))); !errors.Is(err, ErrMalformed) {
			t.Errorf("%s: %v", name, err)
		}
	}
}

func TestTokenStateRoundTrip(t *testing.T) {
	s := TokenState{LastSeq: 77, Unfinished: true, Joined: []dlm.NodeID{1, 2, 9, MaxNode}, Laggards: []dlm.NodeID{9}}
	b := s.Encode(LVBSize)
	if b[16] != 0b11 || b[17] != 0b1 || b[39] != 0x80 || b[41] != 1 || b[9] != 1 {
		t.Fatalf("layout: %x", b)
	}
	got, err := DecodeTokenState(b)
	if err != nil || got.LastSeq != 77 || !got.Unfinished || len(got.Joined) != 4 || got.Joined[3] != MaxNode || len(got.Laggards) != 1 {
		t.Fatalf("%+v %v", got, err)
	}
	b[9] = 2
	if _, err := DecodeTokenState(b); !errors.Is(err, ErrMalformed) {
		t.Fatalf("unknown flag: %v", err)
	}
	if _, err := DecodeTokenState(make([]byte, 64)); !errors.Is(err, ErrEmpty) {
		t.Fatalf("empty: %v", err)
	}
}

func TestAckLockName(t *testing.T) {
	if AckLock(1, 0) != "ack0000.0" || AckLock(12, 1) != "ack0011.1" || AckLock(3, 3) != "ack0002.1" {
		t.Fatal(AckLock(1, 0), AckLock(12, 1))
	}
}

// FuzzDecodeEnvelope: decoding any value block never panics; whatever
// decodes is consistent and re-encodes to the same bytes.
func FuzzDecodeEnvelope(f *testing.F) {
	f.Add(Envelope{Msg: Message{Type: NewDisk, Slot: 2, Low: 1, High: 2, RaidSlot: 3}, Seq: 1, Sender: 3}.Encode(LVBSize))
	f.Add(Envelope{Msg: Message{Type: 77}, Seq: 1 << 63, Sender: 1}.Encode(LVBSize + 8))
	f.Add(make([]byte, LVBSize))
	f.Add([]byte{1, 2, 3})
	f.Fuzz(func(t *testing.T, b []byte) {
		e, err := DecodeEnvelope(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrEmpty) {
				t.Fatalf("error %v is neither ErrMalformed nor ErrEmpty", err)
			}
			return
		}
		if e.Seq == 0 || e.Sender == 0 || e.Sender > MaxNode || e.Msg.Slot != uint32(e.Sender)-1 {
			t.Fatalf("decoded an inconsistent envelope %+v", e)
		}
		if !bytes.Equal(e.Encode(len(b)), b) {
			t.Fatalf("%x decodes to %+v, which encodes to %x", b, e, e.Encode(len(b)))
		}
	})
}

// FuzzDecodeReply: decoding any ack value block never panics; whatever
// decodes re-encodes to the same bytes.
func FuzzDecodeReply(f *testing.F) {
	f.Add(Reply{Seq: 1, Node: 2, Status: StatusFailed, Text: "no such disk"}.Encode(LVBSize))
	f.Add(Reply{Seq: 1, Node: 1}.Encode(LVBSize))
	f.Add(make([]byte, LVBSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := DecodeReply(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrEmpty) {
				t.Fatalf("error %v is neither ErrMalformed nor ErrEmpty", err)
			}
			return
		}
		if !bytes.Equal(r.Encode(len(b)), b) {
			t.Fatalf("%x decodes to %+v, which encodes to %x", b, r, r.Encode(len(b)))
		}
	})
}

// FuzzDecodeTokenState: decoding any token value block never panics;
// whatever decodes re-encodes to the same bytes.
func FuzzDecodeTokenState(f *testing.F) {
	f.Add(TokenState{LastSeq: 3, Joined: []dlm.NodeID{1, 2}}.Encode(LVBSize))
	f.Add(make([]byte, LVBSize))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := DecodeTokenState(b)
		if err != nil {
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrEmpty) {
				t.Fatalf("error %v is neither ErrMalformed nor ErrEmpty", err)
			}
			return
		}
		if !bytes.Equal(s.Encode(len(b)), b) {
			t.Fatalf("%x decodes to %+v, which encodes to %x", b, s, s.Encode(len(b)))
		}
	})
}
