package ctl

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

func TestFrameRoundTrip(t *testing.T) {
	var buf bytes.Buffer
	for _, body := range []string{`{"a":1}`, "x", strings.Repeat("y", 1000)} {
		if err := WriteFrame(&buf, []byte(body)); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []string{`{"a":1}`, "x", strings.Repeat("y", 1000)} {
		got, err := ReadFrame(&buf, 1000)
		if err != nil || string(got) != want {
			t.Fatalf("got %q %v, want %q", got, err, want)
		}
	}
	if _, err := ReadFrame(&buf, 10); err != io.EOF {
		t.Errorf("end of stream: %v, want io.EOF", err)
	}
}

func TestReadFrameRefusesBeforeAllocating(t *testing.T) {
	var hdr [4]byte
	binary.BigEndian.PutUint32(hdr[:], 1<<31)
	// Only the header is there: a reader that trusted the length would
	// allocate 2 GiB and then fail; ReadFrame must refuse from the header.
	_, err := ReadFrame(bytes.NewReader(hdr[:]), 64<<10)
	if !errors.Is(err, ErrFrameTooLarge) || !strings.Contains(err.Error(), "2147483648 bytes announced, limit 65536") {
		t.Errorf("%v", err)
	}
	binary.BigEndian.PutUint32(hdr[:], 0)
	if _, err := ReadFrame(bytes.NewReader(hdr[:]), 10); !errors.Is(err, ErrEmptyFrame) {
		t.Errorf("empty frame: %v", err)
	}
	binary.BigEndian.PutUint32(hdr[:], 8)
	if _, err := ReadFrame(bytes.NewReader(append(hdr[:], "abc"...)), 10); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated body: %v", err)
	}
	if _, err := ReadFrame(bytes.NewReader(hdr[:2]), 10); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("truncated header: %v", err)
	}
}

func TestDecodeRequest(t *testing.T) {
	req, err := DecodeRequest([]byte(`{"version":1,"id":9,"command":"locks","args":{"lockspace":"md0"}}`))
	if err != nil || req.Version != 1 || req.ID != 9 || req.Command != CmdLocks {
		t.Fatalf("%+v %v", req, err)
	}
	var la LocksArgs
	if err := DecodeArgs(req.Args, &la); err != nil || la.Lockspace != "md0" {
		t.Errorf("args %+v %v", la, err)
	}
	if req, err := DecodeRequest([]byte(`{"version":1,"command":"status","args":null}`)); err != nil || req.Args != nil {
		t.Errorf("null args: %+v %v", req, err)
	}
	bad := map[string]string{
		`{"version":1,"command":"status","extra":1}`:  `unknown field "extra"`,
		`{"version":1,"command":"status"} {}`:         "data after its JSON object",
		`{"command":"status"}`:                        "no version",
		`{"version":1}`:                               "no command",
		`{"version":1,"command":"Status"}`:            `command name "Status": only a-z`,
		`{"version":1,"command":"status","args":[1]}`: "args must be a JSON object",
		`{"version":1,"command":"status","args":"x"}`: "args must be a JSON object",
		`[1,2]`: "not a valid JSON request object",
		`{"version":1,"command":"` + strings.Repeat("a", 65) + `"}`: "command name of 65 bytes (at most 64)",
	}
	for body, want := range bad {
		if _, err := DecodeRequest([]byte(body)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v, want %q", body, err, want)
		}
	}
	if err := DecodeArgs(json.RawMessage(`{"lockspace":"md0","x":1}`), &la); err == nil || !strings.Contains(err.Error(), `unknown field "x"`) {
		t.Errorf("unknown arg: %v", err)
	}
}

func TestErrorIsByCode(t *testing.T) {
	err := error(Errorf(CodeNotImplemented, "array create: not implemented yet"))
	if !errors.Is(err, &Error{Code: CodeNotImplemented}) || errors.Is(err, &Error{Code: CodeBusy}) {
		t.Error("errors.Is must match on the code alone")
	}
	if err.Error() != "mdclusterd: array create: not implemented yet" {
		t.Errorf("%q", err.Error())
	}
}

func TestStatusText(t *testing.T) {
	s := Status{Node: NodeInfo{ID: 1, DLMAdvertised: "127.0.0.1:7410"}, State: "running",
		View:   View{Generation: 4, Members: []uint32{1, 2, 3}},
		Quorum: Quorum{ExpectedVotes: 3, TotalVotes: 3, Quorum: 2, Quorate: true, Summary: "3 of 3 data nodes present (need 2): quorate"},
		Members: []Member{{ID: 1, Self: true, DataNode: true, Votes: 1, InView: true, Alive: true},
			{ID: 2, DataNode: true, Votes: 1, InView: true, Alive: true, DLMAddr: "127.0.0.1:7411", DLMConnected: true}},
		Fencing: []FenceRecord{{Victim: 3, Generation: 3, Started: time.Unix(0, 0).UTC(), Seconds: 0.25, OK: false, Error: "agent failed"}}}
	var b bytes.Buffer
	if err := s.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Node ID:          1", "Quorate:          Yes", "Expected votes:   3", "Total votes:      3",
		"Quorum:           2", "127.0.0.1:7410 (local)", "127.0.0.1:7411 (connected)", "node 3 for view 3 in 0.250s: FAILED: agent failed"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %q in\n%s", want, b.String())
		}
	}
}

func TestLocksText(t *testing.T) {
	l := Locks{Node: 1, Lockspaces: []Lockspace{{Name: "md0", Resources: []Resource{
		{Name: "bitmap0001", Master: 1, LVB: "0a0b", LVBSeq: 3,
			Granted: []Lock{{ID: "10001", Node: 1, Owner: 1, Mode: "PW"}},
			Waiting: []Lock{{ID: "20004", Node: 2, Owner: 1, Mode: "IV", Requested: "EX"}}},
		{Name: "token", Master: 2, Granted: []Lock{{ID: "10002", Node: 1, Owner: 1, Mode: "CR"}}},
	}}}}
	var b bytes.Buffer
	if err := l.WriteText(&b); err != nil {
		t.Fatal(err)
	}
	want := `Lockspace "md0" (node 1)

Resource len 10 "bitmap0001"
Master Copy
LVB: 0a 0b seq 3
Granted Queue
10001 PW        Local owner 1
Conversion Queue
Waiting Queue
20004 IV (EX)   Remote:   2 owner 1

Resource len  5 "token"
Master:2
Granted Queue
10002 CR        Local owner 1
Conversion Queue
Waiting Queue
`
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}
