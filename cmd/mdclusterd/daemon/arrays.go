package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/mdcluster/mdcluster/cmd/mdclusterd/config"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/ctl"
	"github.com/mdcluster/mdcluster/mdcluster/fence"
	"github.com/mdcluster/mdcluster/mdcluster/node"
	"github.com/mdcluster/mdcluster/mdcluster/store"
	"github.com/prometheus/client_golang/prometheus"
)

// ArrayLayer is the seam for what is being built on other branches: the
// array manager (create, assemble, add, remove, fail, re-add; its journal
// in the state store), the RAID engine and the NBD export. The daemon owns
// the node runtime, the control socket, metrics and the process's life;
// the array layer plugs in through this interface and nothing else.
//
// The daemon calls, in order: Start once the node runtime is up (before
// READY=1 is sent to systemd); Command for every "array.*" control request,
// concurrently; on a graceful stop Quiesce before the node leaves the
// cluster; and Close last, after the node has left or on an immediate
// stop (Quiesce is then skipped or cut short by its context).
type ArrayLayer interface {
	// Start assembles the configured arrays (ArrayEnv.Config.Arrays),
	// starts their exports and registers the layer's metrics. An error
	// stops the daemon's start: nothing keeps running.
	Start(ctx context.Context, env ArrayEnv) error
	// Command runs one array control command (ctl.Array* names). Its
	// result is encoded as the response's JSON result. Return a *ctl.Error
	// to choose the error code; any other error is sent as code "failed"
	// with its message.
	Command(ctx context.Context, command string, args json.RawMessage) (any, error)
	// Quiesce prepares a graceful leave: stop array I/O, flush the
	// write-intent bitmap, release the bitmap slot and every lock, so that
	// the others need not fence or recover this node. It must return when
	// ctx ends (the leave timeout, or a second signal).
	Quiesce(ctx context.Context) error
	// Close releases everything the layer holds. The node runtime is
	// closed after it.
	Close() error
}

// ArrayEnv is what the daemon hands the array layer.
type ArrayEnv struct {
	// Node is the node runtime; open lockspaces through Node.Open so that
	// recovery waits for them.
	Node *node.Node
	// Store is the node's state store (array configurations, journal).
	Store store.Store
	// Config is the daemon's configuration (Arrays, Devices).
	Config *config.Config
	// Logger is the daemon's logger.
	Logger *slog.Logger
	// Metrics is where the layer registers its collectors; metric names
	// under mdcluster_array_, mdcluster_broadcast_, mdcluster_resync_ and
	// mdcluster_io_ are reserved for it.
	Metrics prometheus.Registerer
	// Locker wraps a lockspace so that every lock operation through it is
	// counted and timed in the DLM metrics; lock users (bitmap ownership,
	// broadcast) should take their locks through it.
	Locker func(*dlm.Lockspace) dlm.Locker
	// SetStamper installs the storage generation stamper that the
	// configured stamp fencing level uses (fence.StampFencer). Until it is
	// called, that level fails with a clear error.
	SetStamper func(fence.GenerationStamper)
}

// ViewObserver is implemented by an array layer that follows the node's
// view generation and quorum (the storage lease stops array I/O without
// quorum or when the members carry a newer generation). SetView is called
// on the agreement's goroutine: it must not block.
type ViewObserver interface {
	SetView(gen uint64, quorate bool)
}

// NoArrays is the array layer of a daemon built before the array manager
// exists: it assembles nothing and answers every array command with code
// "not_implemented", so clients get a clear answer instead of a hang or
// an unknown command.
type NoArrays struct{}

// Start implements ArrayLayer. Configured arrays are logged as not
// assembled, so the operator sees why their exports are missing.
func (NoArrays) Start(_ context.Context, env ArrayEnv) error {
	for _, a := range env.Config.Arrays {
		id := a.Name
		if id == "" {
			id = a.UUID
		}
		env.Logger.Warn("array not assembled: the array layer is not built into this mdclusterd yet", "array", id,
			"export_socket", a.ExportSocket)
	}
	return nil
}

// Command implements ArrayLayer.
func (NoArrays) Command(_ context.Context, command string, _ json.RawMessage) (any, error) {
	return nil, ctl.Errorf(ctl.CodeNotImplemented, "%s: not implemented yet: the array manager is not built into this mdclusterd", command)
}

// Quiesce implements ArrayLayer: there is no array I/O to stop.
func (NoArrays) Quiesce(context.Context) error { return nil }

// Close implements ArrayLayer.
func (NoArrays) Close() error { return nil }

// stamperSlot is the GenerationStamper the configured stamp level uses: it
// forwards to whatever the array layer installs, and fails clearly before.
type stamperSlot struct {
	s atomic.Pointer[fence.GenerationStamper]
}

// errNoStamper says why a stamp fence cannot be done yet.
var errNoStamper = errors.New("no member devices to stamp: the array layer has not provided a generation stamper (no array is assembled, or the array layer is not built into this mdclusterd)")

func (s *stamperSlot) set(st fence.GenerationStamper) {
	if st == nil {
		s.s.Store(nil)
		return
	}
	s.s.Store(&st)
}

// Stamp implements fence.GenerationStamper.
func (s *stamperSlot) Stamp(ctx context.Context, gen uint64) error {
	p := s.s.Load()
	if p == nil {
		return fmt.Errorf("storage stamp of generation %d: %w", gen, errNoStamper)
	}
	return (*p).Stamp(ctx, gen)
}
