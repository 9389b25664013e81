package ctl

import (
	"bytes"
	"encoding/json"
	"testing"
)

// FuzzDecodeRequest: the daemon's request decoder must never panic, and a
// request it accepts must re-encode to a request it accepts again, with the
// same command, a name safe to log, and args that are an object or absent.
func FuzzDecodeRequest(f *testing.F) {
	for _, s := range []string{
		`{"version":1,"id":1,"command":"status"}`,
		`{"version":1,"command":"locks","args":{"lockspace":"md0"}}`,
		`{"version":2,"command":"array.create","args":{}}`,
		`{"version":1,"command":"leave","args":null}`,
		`{"version":1,"command":"x","args":[]}`,
		`{}`, `[]`, `null`, ``,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		req, err := DecodeRequest(body)
		if err != nil {
			return
		}
		if checkCommand(req.Command) != nil || req.Version == 0 {
			t.Fatalf("accepted %+v", req)
		}
		if req.Args != nil && bytes.TrimSpace(req.Args)[0] != '{' {
			t.Fatalf("args not an object: %s", req.Args)
		}
		again, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		req2, err := DecodeRequest(again)
		if err != nil || req2.Command != req.Command || req2.Version != req.Version || req2.ID != req.ID {
			t.Fatalf("re-encoded %s: %+v %v", again, req2, err)
		}
	})
}

// FuzzReadFrame: the frame reader must never panic nor return a body
// longer than its limit, and must consume exactly header plus body.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{0, 0, 0, 2, '{', '}'}, 16)
	f.Add([]byte{0, 0, 0, 0}, 16)
	f.Add([]byte{0xff, 0xff, 0xff, 0xff, 1}, 16)
	f.Fuzz(func(t *testing.T, stream []byte, max int) {
		if max <= 0 || max > 1<<20 {
			max = 1 << 10
		}
		r := bytes.NewReader(stream)
		body, err := ReadFrame(r, max)
		if err != nil {
			return
		}
		if len(body) == 0 || len(body) > max {
			t.Fatalf("body of %d bytes with limit %d", len(body), max)
		}
		if consumed := len(stream) - r.Len(); consumed != 4+len(body) {
			t.Fatalf("consumed %d bytes for a body of %d", consumed, len(body))
		}
	})
}
