// Package ctl is the control protocol between mdclusterd and its local
// clients (mdadm-go, scripts, tests): the wire format, the request decoder
// the daemon uses, the result types, and a Client.
//
// # Wire format
//
// The daemon listens on a unix stream socket (by default DefaultSocket,
// mode 0600 in a directory only root can enter) and serves only peers whose
// SO_PEERCRED uid is 0. Every message in either direction is a frame:
//
//	length  4 bytes, big-endian, 1 ≤ length ≤ the receiver's limit
//	body    length bytes of JSON (one object)
//
// A request body is
//
//	{"version": 1, "id": 7, "command": "status", "args": {...}}
//
// and its response
//
//	{"version": 1, "id": 7, "ok": true,  "result": {...}}
//	{"version": 1, "id": 7, "ok": false, "error": {"code": "not_implemented", "message": "..."}}
//
// version is the protocol version (Version); a request of another version is
// answered with code "unsupported_version" in this version's format, so an
// old client learns what it talks to. id is the client's, echoed unchanged
// (0 if absent). command is one of the Cmd* names; args is the command's
// argument object (absent or null for none). Unknown fields are refused
// (code "bad_request"): a newer client that sends an argument this daemon
// does not know gets an error instead of having it ignored.
//
// A connection carries any number of requests; the daemon answers them one
// at a time, in order, so a client may pipeline. The daemon closes a
// connection idle for longer than its configured idle timeout, after a
// request it could not frame (too large, truncated), and after refusing a
// peer. Requests are bounded (control.max_request_bytes in the daemon's
// configuration, at most MaxRequestLimit); responses by the client's limit
// (DefaultMaxResponse).
//
// # Compatibility
//
// Within a protocol version, result objects only gain fields and commands
// are only added. A change that an old client would misread takes a new
// version.
package ctl

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// Version is the protocol version this package speaks.
const Version = 1

// DefaultSocket is where mdclusterd listens unless its configuration says
// otherwise (control.socket), and where clients look by default.
const DefaultSocket = "/run/mdcluster/mdclusterd.sock"

// Limits of the wire format.
const (
	// DefaultMaxRequest is the daemon's default bound on a request body:
	// far more than any command's arguments need, small enough that a
	// client cannot make the daemon buffer much.
	DefaultMaxRequest = 64 << 10
	// MaxRequestLimit is the largest request bound a daemon may be
	// configured with.
	MaxRequestLimit = 16 << 20
	// DefaultMaxResponse is the client's default bound on a response body.
	// A lock dump of a busy node is the largest response; the daemon
	// refuses to send a larger one (code "too_large") rather than have the
	// client drop the connection.
	DefaultMaxResponse = 64 << 20
	// MaxCommandLen bounds a command name.
	MaxCommandLen = 64
)

// Commands of protocol version 1.
const (
	// CmdStatus: the node, its view, the quorum arithmetic and the fencing
	// history. No arguments; result Status.
	CmdStatus = "status"
	// CmdLocks: a lock dump in the spirit of dlm_tool lockdebug. Arguments
	// LocksArgs; result Locks.
	CmdLocks = "locks"
	// CmdLeave: leave the cluster gracefully and stop the daemon. No
	// arguments; result LeaveResult, sent once the leave is complete (or
	// has failed); the daemon exits afterwards.
	CmdLeave = "leave"
	// ArrayPrefix starts the array commands ("array.create",
	// "array.assemble", "array.add", ...). They go to the array layer; a
	// daemon without one answers code "not_implemented".
	ArrayPrefix = "array."
)

// Array commands the daemon routes to its array layer; their arguments
// and results are in array.go (more commands are declared there).
const (
	CmdArrayCreate   = "array.create"
	CmdArrayAssemble = "array.assemble"
	CmdArrayStop     = "array.stop"
	CmdArrayAdd      = "array.add"
	CmdArrayRemove   = "array.remove"
	CmdArrayFail     = "array.fail"
	CmdArrayReAdd    = "array.re_add"
	CmdArrayDetail   = "array.detail"
	CmdArrayList     = "array.list"
)

// ArrayCommands lists the array commands of this protocol version, in the
// order mdadm documents its modes. A command not listed is unknown.
var ArrayCommands = []string{CmdArrayCreate, CmdArrayAssemble, CmdArrayStop, CmdArrayAdd,
	CmdArrayAddSpare, CmdArrayRemove, CmdArrayFail, CmdArrayReAdd, CmdArrayClusterConfirm,
	CmdArrayDetail, CmdArrayReadwrite, CmdArrayWait, CmdArrayGrow, CmdArrayList}

// Error codes carried in a failed response's error.code.
const (
	CodeBadRequest         = "bad_request"         // the request did not decode or its arguments are invalid
	CodeUnsupportedVersion = "unsupported_version" // the request's protocol version is not Version
	CodeUnknownCommand     = "unknown_command"     // no such command
	CodeNotImplemented     = "not_implemented"     // the command exists but its layer is not built yet
	CodePermissionDenied   = "permission_denied"   // the peer is not root
	CodeTooLarge           = "too_large"           // the request or the response exceeds its bound
	CodeBusy               = "busy"                // the daemon's connection limit is reached
	CodeUnavailable        = "unavailable"         // the daemon is starting or stopping
	CodeFailed             = "failed"              // the command ran and failed; message says why
	CodeInternal           = "internal"            // a bug; message says what
)

// Request is one decoded request.
type Request struct {
	// Version is the protocol version the client speaks.
	Version int `json:"version"`
	// ID is the client's request number, echoed in the response.
	ID uint64 `json:"id,omitempty"`
	// Command names the command (Cmd*).
	Command string `json:"command"`
	// Args is the command's argument object, undecoded; nil for none.
	Args json.RawMessage `json:"args,omitempty"`
}

// Response is one response.
type Response struct {
	Version int             `json:"version"`
	ID      uint64          `json:"id,omitempty"`
	OK      bool            `json:"ok"`
	Result  json.RawMessage `json:"result,omitempty"`
	Error   *Error          `json:"error,omitempty"`
}

// Error is a failed response's error: a stable code for programs and a
// message for people. Clients get it back as the error of their call;
// errors.Is(err, &ctl.Error{Code: ctl.CodeNotImplemented}) matches on the
// code alone.
type Error struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// Error returns the message, prefixed with the daemon's name so that a
// CLI can print it as it is.
func (e *Error) Error() string {
	if e.Message == "" {
		return "mdclusterd: " + e.Code
	}
	return "mdclusterd: " + e.Message
}

// Is matches another *Error with the same code, whatever its message.
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// Errorf builds an *Error with a code and a formatted message.
func Errorf(code, format string, a ...any) *Error {
	return &Error{Code: code, Message: fmt.Sprintf(format, a...)}
}

// ErrFrameTooLarge is wrapped by ReadFrame when a frame announces more than
// the reader's limit. The frame's body has not been read: the connection
// cannot be resynchronised and must be closed.
var ErrFrameTooLarge = errors.New("frame too large")

// ErrEmptyFrame is wrapped by ReadFrame for a frame of length 0.
var ErrEmptyFrame = errors.New("empty frame")

// ReadFrame reads one frame and returns its body. It reads the body only
// once its length is known to be within max, so a peer cannot make it
// allocate more than max bytes. io.EOF is returned unwrapped when the
// stream ends cleanly before a frame; a frame cut short is
// io.ErrUnexpectedEOF.
func ReadFrame(r io.Reader, max int) ([]byte, error) {
	var hdr [4]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		return nil, fmt.Errorf("ctl: reading frame header: %w", err)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	if n == 0 {
		return nil, fmt.Errorf("ctl: %w", ErrEmptyFrame)
	}
	if uint64(n) > uint64(max) {
		return nil, fmt.Errorf("ctl: %w: %d bytes announced, limit %d", ErrFrameTooLarge, n, max)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(r, body); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, fmt.Errorf("ctl: reading a frame of %d bytes: %w", n, err)
	}
	return body, nil
}

// WriteFrame writes body as one frame (a single Write, so concurrent
// writers on one connection would not interleave within a frame; callers
// still serialise their frames).
func WriteFrame(w io.Writer, body []byte) error {
	if len(body) == 0 {
		return fmt.Errorf("ctl: writing a frame: %w", ErrEmptyFrame)
	}
	if uint64(len(body)) > 1<<32-1 {
		return fmt.Errorf("ctl: writing a frame: %w: %d bytes", ErrFrameTooLarge, len(body))
	}
	buf := make([]byte, 4+len(body))
	binary.BigEndian.PutUint32(buf, uint32(len(body)))
	copy(buf[4:], body)
	if _, err := w.Write(buf); err != nil {
		return fmt.Errorf("ctl: writing a frame of %d bytes: %w", len(body), err)
	}
	return nil
}

// DecodeRequest decodes and checks one request body. It refuses anything
// that is not exactly one JSON object of Request's fields (unknown fields,
// trailing data, a missing or malformed command, args that are not an
// object or null). The error says what is wrong; it is meant to be sent
// back as code "bad_request". The version is not checked here (the caller
// answers another version with "unsupported_version").
func DecodeRequest(body []byte) (Request, error) {
	var req Request
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return Request{}, fmt.Errorf("request is not a valid JSON request object: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Request{}, errors.New("request has data after its JSON object")
	}
	if req.Version == 0 {
		return Request{}, errors.New("request has no version (want \"version\": 1)")
	}
	if err := checkCommand(req.Command); err != nil {
		return Request{}, err
	}
	if len(req.Args) > 0 {
		a := bytes.TrimSpace(req.Args)
		switch {
		case bytes.Equal(a, []byte("null")):
			req.Args = nil
		case len(a) == 0 || a[0] != '{':
			return Request{}, fmt.Errorf("command %s: args must be a JSON object", req.Command)
		}
	}
	return req, nil
}

// checkCommand refuses empty, overlong and odd command names, so that the
// name can be logged and used as a metric label without escaping.
func checkCommand(c string) error {
	if c == "" {
		return errors.New("request has no command")
	}
	if len(c) > MaxCommandLen {
		return fmt.Errorf("command name of %d bytes (at most %d)", len(c), MaxCommandLen)
	}
	for i := 0; i < len(c); i++ {
		b := c[i]
		if !(b >= 'a' && b <= 'z' || b >= '0' && b <= '9' || b == '.' || b == '-' || b == '_') {
			return fmt.Errorf("command name %q: only a-z, 0-9, '.', '-' and '_' are allowed", c)
		}
	}
	return nil
}

// DecodeArgs decodes a request's args into v, refusing unknown fields and
// trailing data. Nil args leave v as it is (every argument optional).
func DecodeArgs(args json.RawMessage, v any) error {
	if len(args) == 0 {
		return nil
	}
	dec := json.NewDecoder(bytes.NewReader(args))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("invalid args: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return errors.New("invalid args: data after the args object")
	}
	return nil
}
