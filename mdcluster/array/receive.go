package array

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/broadcast"
	"github.com/mdcluster/mdcluster/dlm"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// receive acts on one broadcast (the manager is the broadcaster's
// Receiver). It runs on the broadcast's receive loop, bounded by ctx
// (Config.ReceiveTimeout), and never takes the local change lock: a local
// change may be waiting for the token that the message's sender holds
// until this node answers.
//
// A message can arrive while the array is still assembling (the node
// receives from the moment it joins the broadcast): it is applied to the
// state read so far and reaches the engine when the engine starts.
func (m *Manager) receive(ctx context.Context, from dlm.NodeID, msg broadcast.Message) error {
	m.mu.Lock()
	ph := m.phase
	m.mu.Unlock()
	if ph == PhaseStopped || ph == PhaseStopping || ph == PhaseFailed {
		// Nothing of ours runs: whatever changed is read when the array
		// starts again.
		m.log.Debug("message while not running: nothing to apply", "msg", msg.Type, "from", from, "phase", ph)
		return nil
	}
	switch msg.Type {
	case broadcast.MetadataUpdated, broadcast.Remove, broadcast.ReAdd:
		return m.recvMetadata(ctx, from, msg)
	case broadcast.Resyncing:
		return m.recvResyncing(ctx, from, msg)
	case broadcast.NewDisk:
		return m.recvNewDisk(ctx, from, msg)
	case broadcast.BitmapNeedsSync:
		return m.recvNeedsSync(ctx, from, msg)
	case broadcast.ResyncingStart:
		m.mu.Lock()
		m.remote.From, m.remote.Target = from, msg.RaidSlot
		m.remote.Kind = SyncResync
		if msg.RaidSlot != noTarget {
			m.remote.Kind = SyncRecovery
		}
		m.mu.Unlock()
		m.log.Info("another node started syncing", "from", from, "kind", m.remote.Kind, "target", msg.RaidSlot, "from_sector", msg.Low)
		return nil
	case broadcast.ChangeCapacity, broadcast.BitmapResize:
		return fmt.Errorf("%s: %w (array size changes are not implemented)", msg.Type, ErrUnsupported)
	}
	return fmt.Errorf("%s: %w", msg.Type, broadcast.ErrUnknownType)
}

// recvMetadata re-reads the members (md's process_metadata_update and
// md_reload_sb), binds and unbinds what changed, ends this node's
// confirmation of a device the sender was adding and re-takes no-new-dev
// in CR. A failure leaves this node's state as it was and is reported to
// the sender (which undoes an add or re-add everywhere); the node retries
// on its own and stops its array if it cannot follow.
func (m *Manager) recvMetadata(ctx context.Context, from dlm.NodeID, msg broadcast.Message) error {
	why := fmt.Sprintf("%s from node %d", msg.Type, from)
	m.mu.Lock()
	err := m.reloadLocked(msg.Low, why)
	hadCand := false
	for u, c := range m.candidates {
		if c.From == from {
			hadCand = true
			delete(m.candidates, u)
			m.log.Info("the sender's add is over: candidate forgotten (not a member)", "device_uuid", bitmap.FormatUUID(u), "from", from)
		}
	}
	if hadCand {
		m.needCR = true
		m.releaseUnusedLocked()
	}
	if err == nil {
		if cerr := checkApplied(msg, m.st); cerr != nil {
			err = fmt.Errorf("%s: %w", why, cerr)
		}
	}
	if err != nil && m.diverged.IsZero() {
		m.diverged = time.Now()
	}
	m.mu.Unlock()
	m.retakeCR(ctx)
	if err != nil {
		m.log.Error("could not apply a change every node applies: retrying; the array stops here if it keeps failing", "msg", msg.Type, "from", from, "err", err)
		m.queue(maintTask{kind: taskApply})
		return err
	}
	m.wake(m.kick)
	return nil
}

// retakeCR puts no-new-dev back to CR when this node dropped it to
// confirm a device.
func (m *Manager) retakeCR(ctx context.Context) {
	m.mu.Lock()
	nnd, need := m.noNewDev, m.needCR
	m.mu.Unlock()
	if nnd == nil || (!need && nnd.Mode() == dlm.CR) {
		return
	}
	if nnd.Mode() == dlm.CR {
		m.mu.Lock()
		m.needCR = false
		m.mu.Unlock()
		return
	}
	lctx, cancel := context.WithTimeout(ctx, m.cfg.LockTimeout)
	err := nnd.Convert(lctx, dlm.CR, 0)
	cancel()
	m.mu.Lock()
	m.needCR = err != nil
	m.mu.Unlock()
	if err != nil {
		m.log.Warn("re-taking no-new-dev in CR failed; retried later", "err", err)
		m.queue(maintTask{kind: taskRetakeCR})
	}
}

// recvResyncing installs another node's resync window (md's
// process_suspend_info): this node's writes into it wait and its reads
// there are not balanced. It returns once no write of this node into the
// window is in flight, so that the sender copies a window nobody writes.
// RESYNCING{0,0} clears the window and wakes this node's own sync work
// (it may have been waiting for the resync lock).
func (m *Manager) recvResyncing(ctx context.Context, from dlm.NodeID, msg broadcast.Message) error {
	w := Window{Lo: msg.Low, Hi: msg.High}
	m.mu.Lock()
	m.remote.Seen++
	if !w.Active() {
		if m.remote.From == from || !m.remote.Window.Active() {
			m.remote.Window = Window{}
		}
		w = m.remote.Window
	} else {
		m.remote.From, m.remote.Window = from, w
		m.remote.Hints[workKey(m.remote.Kind, m.remote.Target)] = w.Lo
	}
	on := m.engineOn
	m.mu.Unlock()
	if on {
		if err := m.cfg.Engine.SetRemoteWindow(ctx, w); err != nil {
			return fmt.Errorf("install node %d's resync window [%d,%d): %w", from, w.Lo, w.Hi, err)
		}
	}
	if !w.Active() {
		m.log.Info("remote resync window cleared", "from", from)
		m.wake(m.kick)
	} else {
		m.log.Debug("remote resync window", "from", from, "lo", w.Lo, "hi", w.Hi)
	}
	return nil
}

// workKey names a sync for the takeover hints.
func workKey(k SyncKind, target uint32) string {
	if k == SyncRecovery {
		return fmt.Sprintf("recovery:%d", target)
	}
	return "resync"
}

// recvNewDisk looks for the device being added among this node's
// configured paths, by its device UUID (md's process_add_new_disk, the
// udev rule and mdadm --cluster-confirm in one). Found: the device is
// remembered as a candidate, no-new-dev drops to NL, and the answer is
// "acted". Not found: with Config.OnNewDisk set, this node waits (at most
// NewDiskTimeout) for ClusterConfirm, which can name the device at
// another path or say it is missing; otherwise, or on "missing", it
// answers ErrDeviceNotFound, keeps no-new-dev in CR, and the add fails
// everywhere.
func (m *Manager) recvNewDisk(ctx context.Context, from dlm.NodeID, msg broadcast.Message) error {
	m.mu.Lock()
	f, ok := m.findDeviceLocked(msg.UUID)
	hook := m.cfg.OnNewDisk
	var w *confirmWait
	if !ok && hook != nil {
		w = &confirmWait{uuid: msg.UUID, slot: msg.RaidSlot, done: make(chan string, 1)}
		m.confirmW = w
	}
	m.mu.Unlock()
	if w != nil {
		hook(msg.UUID, msg.RaidSlot)
		wctx, cancel := context.WithTimeout(ctx, m.cfg.NewDiskTimeout)
		var path string
		select {
		case path = <-w.done:
		case <-wctx.Done():
			m.log.Warn("timeout on a new disk adding: no confirmation", "device_uuid", bitmap.FormatUUID(msg.UUID), "waited", m.cfg.NewDiskTimeout)
		}
		cancel()
		m.mu.Lock()
		if m.confirmW == w {
			m.confirmW = nil
		}
		if path != "" {
			f, ok = m.findDeviceLocked(msg.UUID)
		}
		m.mu.Unlock()
	}
	if !ok {
		m.log.Warn("device being added is not visible here: answering missing", "device_uuid", bitmap.FormatUUID(msg.UUID),
			"dev", msg.RaidSlot, "from", from, "paths", m.cfg.Devices)
		return NewDiskAnswer(msg, nil, fmt.Sprint(m.cfg.Devices))
	}
	if err := NewDiskAnswer(msg, f.Super, f.Path); err != nil {
		return err
	}
	m.mu.Lock()
	m.candidates[msg.UUID] = &candidate{From: from, Dev: msg.RaidSlot, UUID: msg.UUID, Path: f.Path, BaseEvents: msg.Low, At: time.Now()}
	nnd := m.noNewDev
	alive := slices.Contains(m.view, from)
	m.mu.Unlock()
	if nnd != nil && nnd.Mode() == dlm.CR {
		lctx, cancel := context.WithTimeout(ctx, m.cfg.LockTimeout)
		err := nnd.Convert(lctx, dlm.NL, 0)
		cancel()
		if err != nil {
			return fmt.Errorf("confirm device %s: drop %s to NL: %w", bitmap.FormatUUID(msg.UUID), NoNewDevLock, err)
		}
	}
	m.log.Info("device being added found here: confirmed", "device_uuid", bitmap.FormatUUID(msg.UUID), "dev", msg.RaidSlot,
		"path", f.Path, "from", from)
	if !alive {
		// A broadcast finished on behalf of a sender that died: nobody
		// will follow it up; resolve it from the disk.
		m.queue(maintTask{kind: taskDeparted, nodes: []dlm.NodeID{from}})
	}
	return nil
}

// ClusterConfirm answers a pending NEWDISK for device number raidSlot
// (mdadm --cluster-confirm raidSlot:path): path names the device being
// added as this node sees it (it is then looked for there, in addition to
// the configured paths, from now on), or "missing" says this node cannot
// see it. Without a pending request it fails with md's "Spurious cluster
// confirmation".
func (m *Manager) ClusterConfirm(raidSlot uint32, path string) error {
	m.mu.Lock()
	w := m.confirmW
	m.mu.Unlock()
	if w == nil || w.slot != raidSlot {
		return fmt.Errorf("cluster confirm %d:%s: %w: Spurious cluster confirmation", raidSlot, path, ErrRefusedChange)
	}
	if path == "missing" {
		w.done <- ""
		return nil
	}
	// Read-only: recvNewDisk claims the device once it finds it here.
	m.mu.Lock()
	d, err := m.openProbe(path)
	m.mu.Unlock()
	if err != nil {
		return fmt.Errorf("cluster confirm %d:%s: %w", raidSlot, path, err)
	}
	defer closeMember(d)
	sectors, err := memberSectors(d)
	if err != nil {
		return err
	}
	sb, err := superblock.Probe(d, sectors)
	if err != nil || sb.DeviceUUID != w.uuid {
		return fmt.Errorf("cluster confirm %d:%s: %w: it is not the device being added (%s)", raidSlot, path, ErrRefusedChange, bitmap.FormatUUID(w.uuid))
	}
	m.mu.Lock()
	if !slices.Contains(m.cfg.Devices, path) {
		m.cfg.Devices = append(slices.Clone(m.cfg.Devices), path)
	}
	m.mu.Unlock()
	select {
	case w.done <- path:
	default:
		return errors.New("cluster confirm: already answered")
	}
	return nil
}

// recvNeedsSync: the sender left with work behind (md's BITMAP_NEEDS_SYNC:
// a resync it did not finish, or dirty bits in its slot). Its window is
// dropped, its progress remembered for whoever takes the sync over, and
// its slot is probed until it is released, then recovered like a dead
// node's.
func (m *Manager) recvNeedsSync(ctx context.Context, from dlm.NodeID, msg broadcast.Message) error {
	m.mu.Lock()
	clear := m.remote.From == from && m.remote.Window.Active()
	if m.remote.From == from {
		key := workKey(m.remote.Kind, m.remote.Target)
		if msg.Low > m.remote.Hints[key] {
			m.remote.Hints[key] = msg.Low
		}
		m.remote.Window = Window{}
	}
	on := m.engineOn
	m.mu.Unlock()
	if clear && on {
		if err := m.cfg.Engine.SetRemoteWindow(ctx, Window{}); err != nil {
			return err
		}
	}
	m.log.Info("node left with work behind: its slot is recovered and its sync taken over", "from", from, "slot", msg.Slot, "resume_at", msg.Low)
	m.queue(maintTask{kind: taskProbeSlot, slot: int(msg.Slot), until: time.Now().Add(m.cfg.SlotProbeLimit)})
	m.wake(m.kick)
	return nil
}
