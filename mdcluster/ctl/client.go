package ctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"
)

// Client is a connection to mdclusterd's control socket. Its calls may be
// made from several goroutines; they are sent one at a time.
type Client struct {
	// MaxResponse bounds a response body (DefaultMaxResponse when 0).
	MaxResponse int

	path string
	mu   sync.Mutex
	conn net.Conn
	next uint64
}

// Dial connects to the daemon's control socket at path (DefaultSocket when
// empty). It fails with a clear error when nothing listens there; a
// refusal because the caller is not root arrives with the first call
// (the daemon checks its peer when it accepts the connection).
func Dial(ctx context.Context, path string) (*Client, error) {
	if path == "" {
		path = DefaultSocket
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("ctl: connecting to mdclusterd at %s (is it running?): %w", path, err)
	}
	return &Client{path: path, conn: conn}, nil
}

// Close closes the connection.
func (c *Client) Close() error {
	if err := c.conn.Close(); err != nil {
		return fmt.Errorf("ctl: closing the connection to %s: %w", c.path, err)
	}
	return nil
}

// Call sends one request and waits for its response. args is encoded as
// the request's args (nil for none); on success the result is decoded into
// result (unless nil). A failure the daemon reports is returned as *Error;
// anything else (the connection, a malformed response) as a wrapped error.
// When ctx ends the connection is closed, since the response can no longer
// be matched to its request.
func (c *Client) Call(ctx context.Context, command string, args, result any) error {
	req := Request{Version: Version, Command: command}
	if args != nil {
		raw, err := json.Marshal(args)
		if err != nil {
			return fmt.Errorf("ctl: %s: encoding args: %w", command, err)
		}
		req.Args = raw
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.next++
	req.ID = c.next
	body, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("ctl: %s: encoding request: %w", command, err)
	}
	stop := context.AfterFunc(ctx, func() { _ = c.conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if err := WriteFrame(c.conn, body); err != nil {
		// The daemon may have refused the connection (not root, too many
		// connections) and closed it before the request went out: its
		// answer is waiting to be read and says why.
		_ = c.conn.SetReadDeadline(time.Now().Add(time.Second))
		if rb, rerr := ReadFrame(c.conn, 64<<10); rerr == nil {
			var resp Response
			if json.Unmarshal(rb, &resp) == nil && !resp.OK && resp.Error != nil {
				return resp.Error
			}
		}
		return c.ioError(ctx, command, err)
	}
	max := c.MaxResponse
	if max <= 0 {
		max = DefaultMaxResponse
	}
	rb, err := ReadFrame(c.conn, max)
	if err != nil {
		return c.ioError(ctx, command, err)
	}
	var resp Response
	if err := json.Unmarshal(rb, &resp); err != nil {
		return fmt.Errorf("ctl: %s: malformed response from %s: %w", command, c.path, err)
	}
	if !resp.OK {
		if resp.Error == nil {
			return fmt.Errorf("ctl: %s: failed response from %s without an error", command, c.path)
		}
		return resp.Error
	}
	if resp.ID != req.ID {
		return fmt.Errorf("ctl: %s: response to request %d arrived for request %d", command, resp.ID, req.ID)
	}
	if result != nil {
		if err := json.Unmarshal(resp.Result, result); err != nil {
			return fmt.Errorf("ctl: %s: malformed result from %s: %w", command, c.path, err)
		}
	}
	return nil
}

func (c *Client) ioError(ctx context.Context, command string, err error) error {
	if ctx.Err() != nil {
		_ = c.conn.Close()
		return fmt.Errorf("ctl: %s: %w (%w)", command, ctx.Err(), err)
	}
	if errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "EOF") {
		return fmt.Errorf("ctl: %s: mdclusterd at %s closed the connection: %w", command, c.path, err)
	}
	return fmt.Errorf("ctl: %s: %w", command, err)
}

// Status returns the node's status (CmdStatus).
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var s Status
	if err := c.Call(ctx, CmdStatus, nil, &s); err != nil {
		return nil, err
	}
	return &s, nil
}

// Locks returns a lock dump (CmdLocks) of one lockspace, or of all when
// lockspace is empty.
func (c *Client) Locks(ctx context.Context, lockspace string) (*Locks, error) {
	var l Locks
	var args any
	if lockspace != "" {
		args = LocksArgs{Lockspace: lockspace}
	}
	if err := c.Call(ctx, CmdLocks, args, &l); err != nil {
		return nil, err
	}
	return &l, nil
}

// Leave asks the daemon to leave the cluster gracefully and stop
// (CmdLeave); it returns once the leave is complete.
func (c *Client) Leave(ctx context.Context) (*LeaveResult, error) {
	var r LeaveResult
	if err := c.Call(ctx, CmdLeave, nil, &r); err != nil {
		return nil, err
	}
	return &r, nil
}

// Array runs an array command (one of ArrayCommands) with its arguments,
// decoding its result into result. Until the array layer is built the
// daemon answers every one with an *Error of code CodeNotImplemented.
func (c *Client) Array(ctx context.Context, command string, args, result any) error {
	if !strings.HasPrefix(command, ArrayPrefix) {
		return fmt.Errorf("ctl: %q is not an array command (they start with %q)", command, ArrayPrefix)
	}
	return c.Call(ctx, command, args, result)
}
