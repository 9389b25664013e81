package dlm

import (
	"bytes"
	"errors"
	"reflect"
	"strings"
	"testing"
)

func sampleMessages() []message {
	lvb := bytes.Repeat([]byte{0xab}, 16)
	return []message{
		{typ: msgLookup, name: "bitmap0001"},
		{typ: msgLookupReply, name: "token", master: 3},
		{typ: msgRemove, name: "resync"},
		{typ: msgRequest, lock: 7, name: "message", mode: EX, flags: NoQueue | ValBlk, bast: true},
		{typ: msgRequest, lock: 8, name: "ack", mode: CR},
		{typ: msgConvert, lock: 9, mode: NL, flags: ValBlk | Convert, wid: 3, lvb: lvb},
		{typ: msgUnlock, lock: 10, flags: IVValBlk},
		{typ: msgCancel, lock: 11, status: StatusTimeout},
		{typ: msgCast, lock: 12, status: StatusOK, mode: PW, sbf: ValNotValid, seq: 99, lvb: lvb},
		{typ: msgCast, lock: 13, status: StatusAgain, mode: ModeIV},
		{typ: msgBast, lock: 14, mode: PR},
		{typ: msgNotMaster, lock: 15},
		{typ: msgNames, names: []string{"a", "bitmap0002"}, last: true},
		{typ: msgNames},
		{typ: msgLocksDone},
		{typ: msgRecoverLock, lock: 16, name: "token", mode: PW, rqmode: ModeIV, flags: ValBlk, seq: 4, lvb: lvb},
		{typ: msgRecoverLock, lock: 17, name: "r", mode: PR, rqmode: CW, bad: true},
		{typ: msgWriteAck, wid: 5},
		{typ: msgRecoverWrite, wid: 6, seq: 7, name: "r", lvb: lvb},
	}
}

func TestMessageRoundTrip(t *testing.T) {
	for _, m := range sampleMessages() {
		b := appendMessage(nil, &m)
		got, err := decodeMessage(b, 16)
		if err != nil {
			t.Fatalf("%v: %v", m.typ, err)
		}
		if len(got.lvb) == 0 {
			got.lvb = nil
		}
		got.name, got.nameb = string(got.nameb), nil
		for _, n := range got.namesb {
			got.names = append(got.names, string(n))
		}
		got.namesb = nil
		if !reflect.DeepEqual(got, m) {
			t.Fatalf("%v: got %+v want %+v", m.typ, got, m)
		}
	}
}

func TestMessageDecodeRejects(t *testing.T) {
	valid := appendMessage(nil, &message{typ: msgRequest, lock: 1, name: "r", mode: EX})
	for _, tc := range []struct {
		name string
		b    []byte
		want string
	}{
		{"empty", nil, "truncated"},
		{"unknown type", []byte{0x7f}, "unknown message type"},
		{"truncated", valid[:len(valid)-1], "truncated"},
		{"trailing bytes", append(bytes.Clone(valid), 0), "bytes after"},
		{"bad mode", []byte{byte(msgBast), 1, 0, 0, 0, 0, 0, 0, 0, 9}, "bad mode"},
		{"empty name", []byte{byte(msgLookup), 0}, "name length 0"},
		{"long lvb", appendMessage(nil, &message{typ: msgConvert, lock: 1, mode: NL, lvb: make([]byte, 32)}), "LVB of 32 bytes"},
		{"bad cancel status", []byte{byte(msgCancel), 1, 0, 0, 0, 0, 0, 0, 0, 0}, "cancel with status"},
	} {
		_, err := decodeMessage(tc.b, 16)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err %v, want one containing %q", tc.name, err, tc.want)
		}
	}
}

// FuzzDecodeMessage: the decoder never panics, and whatever it accepts
// encodes back to the same bytes.
func FuzzDecodeMessage(f *testing.F) {
	for _, m := range sampleMessages() {
		f.Add(appendMessage(nil, &m))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := decodeMessage(b, 16)
		if err != nil {
			return
		}
		m.name = string(m.nameb)
		for _, n := range m.namesb {
			m.names = append(m.names, string(n))
		}
		if again := appendMessage(nil, &m); !bytes.Equal(again, b) {
			t.Fatalf("re-encoding %x gave %x", b, again)
		}
	})
}

// A payload may carry several messages back to back; decodeNext takes them
// one at a time and a damaged one is reported, not skipped.
func TestMessageBatch(t *testing.T) {
	var batch []byte
	msgs := sampleMessages()
	for _, m := range msgs {
		batch = appendMessage(batch, &m)
	}
	rest := batch
	for i := range msgs {
		var m message
		var err error
		rest, err = decodeNext(rest, 16, &m)
		if err != nil {
			t.Fatalf("message %d: %v", i, err)
		}
		if m.typ != msgs[i].typ {
			t.Fatalf("message %d: type %v, want %v", i, m.typ, msgs[i].typ)
		}
	}
	if len(rest) != 0 {
		t.Fatalf("%d bytes left", len(rest))
	}
	two := appendMessage(appendMessage(nil, &msgs[0]), &msgs[1])
	var first, second message
	rest, err := decodeNext(two[:len(two)-1], 16, &first)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := decodeNext(rest, 16, &second); !errors.Is(err, ErrInvalid) {
		t.Fatalf("truncated second message: err %v", err)
	}
}

// FuzzDecodeBatch: walking a payload of back-to-back messages never panics
// and always makes progress.
func FuzzDecodeBatch(f *testing.F) {
	var all []byte
	for _, m := range sampleMessages() {
		all = appendMessage(all, &m)
		f.Add(appendMessage(nil, &m))
	}
	f.Add(all)
	f.Fuzz(func(t *testing.T, b []byte) {
		for len(b) > 0 {
			var m message
			rest, err := decodeNext(b, 16, &m)
			if err != nil {
				return
			}
			if len(rest) >= len(b) {
				t.Fatalf("no progress on %x", b)
			}
			b = rest
		}
	})
}
