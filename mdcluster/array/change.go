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
	"github.com/mdcluster/mdcluster/mdcluster/store"
	"github.com/mdcluster/mdcluster/mdcluster/superblock"
)

// changeTxn is one local change in progress: this node's change lock held,
// the broadcast token held (md's metadata_update_start .. _finish), and the
// change's journal entry.
type changeTxn struct {
	m     *Manager
	what  string
	bt    *broadcast.Txn // nil when the array runs without a cluster
	seq   uint64         // journal sequence number, 0 before journal
	entry JournalEntry
	ended bool
}

// begin starts a change: it takes the local change lock and the token, and
// re-reads the members under the token (another node may have changed
// them since this node last looked). allowAssembling lets journal recovery
// run before the array is running.
func (m *Manager) begin(ctx context.Context, what string, allowAssembling bool) (*changeTxn, error) {
	m.opMu.Lock()
	m.mu.Lock()
	ph, bus, dead := m.phase, m.bus, m.dead
	m.mu.Unlock()
	if dead {
		m.opMu.Unlock()
		return nil, errCrashed
	}
	if ph != PhaseRunning && !(allowAssembling && ph == PhaseAssembling) {
		m.opMu.Unlock()
		return nil, fmt.Errorf("%s: %w (%s)", what, ErrNotRunning, ph)
	}
	t := &changeTxn{m: m, what: what}
	if bus != nil {
		bt, err := bus.Begin(ctx)
		if err != nil {
			m.opMu.Unlock()
			return nil, fmt.Errorf("%s: take the broadcast token: %w", what, err)
		}
		t.bt = bt
	}
	m.mu.Lock()
	err := m.reloadLocked(0, what+": state under the token")
	m.mu.Unlock()
	if err != nil {
		t.end(ctx)
		return nil, fmt.Errorf("%s: %w", what, err)
	}
	return t, nil
}

// end finishes the change: the journal entry is done, the token released.
// After a test crash nothing is touched.
func (t *changeTxn) end(ctx context.Context) {
	if t.ended {
		return
	}
	t.ended = true
	defer t.m.opMu.Unlock()
	if t.m.isDead() {
		return
	}
	if t.seq != 0 {
		if err := t.m.cfg.Store.Update(func(tx store.Txn) error { return t.m.jr.Done(tx, t.seq) }); err != nil {
			t.m.log.Error("journal: cannot mark the change done; it will be re-checked at the next start", "change", t.what, "err", err)
		}
		t.seq = 0
	}
	if t.bt != nil {
		if err := t.bt.End(context.WithoutCancel(ctx)); err != nil {
			t.m.log.Warn("releasing the broadcast token", "change", t.what, "err", err)
		}
	}
}

// journal appends the change's entry (durable before the change goes on).
func (t *changeTxn) journal(e JournalEntry) error {
	e.Array, e.Node, e.Started = t.m.uuid, uint32(t.m.self), t.m.cfg.Now()
	b, err := e.encode()
	if err != nil {
		return err
	}
	var seq uint64
	if err := t.m.cfg.Store.Update(func(tx store.Txn) (err error) {
		seq, err = t.m.jr.Append(tx, b)
		return err
	}); err != nil {
		return fmt.Errorf("%s: journal: %w", t.what, err)
	}
	t.seq, t.entry = seq, e
	t.m.log.Debug("journal: change recorded", "change", e.Kind, "state", e.State, "seq", seq)
	return nil
}

// setState moves the entry to state s (replacing the entry in one store
// transaction: the journal keeps entries, not updates).
func (t *changeTxn) setState(s JournalState) error {
	if t.m.isDead() {
		return errCrashed
	}
	e := t.entry
	e.State = s
	b, err := e.encode()
	if err != nil {
		return err
	}
	var seq uint64
	if err := t.m.cfg.Store.Update(func(tx store.Txn) error {
		if err := t.m.jr.Done(tx, t.seq); err != nil {
			return err
		}
		var err error
		seq, err = t.m.jr.Append(tx, b)
		return err
	}); err != nil {
		return fmt.Errorf("%s: journal state %s: %w", t.what, s, err)
	}
	t.seq, t.entry = seq, e
	return nil
}

// send broadcasts msg within the change (nothing without a cluster).
func (t *changeTxn) send(ctx context.Context, msg broadcast.Message) (broadcast.Result, error) {
	if t.bt == nil {
		return broadcast.Result{}, nil
	}
	if t.m.isDead() {
		return broadcast.Result{}, errCrashed
	}
	res, err := t.bt.Send(ctx, msg)
	if err != nil {
		t.bt = nil // a failed Send ended the transaction
		return res, fmt.Errorf("%s: broadcast %s: %w", t.what, msg.Type, err)
	}
	return res, nil
}

// problems lists the receivers that did not act on a broadcast: they
// answered with an error or did not answer in time. Nodes that had not
// joined (they read the state when they join) and nodes that died (they
// read it when they come back) are not problems.
func problems(res broadcast.Result) error {
	var errs []error
	for _, n := range slices.Sorted(func(yield func(dlm.NodeID) bool) {
		for k := range res.Failed {
			if !yield(k) {
				return
			}
		}
	}) {
		errs = append(errs, fmt.Errorf("node %d: %w", n, res.Failed[n]))
	}
	for _, n := range res.Unanswered {
		errs = append(errs, fmt.Errorf("node %d: did not answer", n))
	}
	return errors.Join(errs...)
}

// failedNodes lists the nodes problems reports.
func failedNodes(res broadcast.Result) []dlm.NodeID {
	var out []dlm.NodeID
	for n := range res.Failed {
		out = append(out, n)
	}
	out = append(out, res.Unanswered...)
	slices.Sort(out)
	return out
}

// writeSupers writes next to devs (in the order given: the commit point is
// the first write) and re-reads the members locally.
func (t *changeTxn) writeSupers(next *superblock.Superblock, devs []Device) error {
	if t.m.isDead() {
		return errCrashed
	}
	if _, err := WriteAll(next, devs); err != nil {
		var we *WriteError
		if errors.As(err, &we) {
			for _, d := range devs {
				if slices.Contains(we.Failed, d.Member.Name()) {
					t.m.memberError(d.Super.DevNumber, err)
				}
			}
			t.m.log.Error("superblock write failed on some members: they are failed cluster-wide", "change", t.what, "failed", we.Failed)
		} else {
			return fmt.Errorf("%s: write superblocks: %w", t.what, err)
		}
	}
	return nil
}

// reload re-reads the members after this node wrote them.
func (t *changeTxn) reload(minEvents uint64) error {
	t.m.mu.Lock()
	defer t.m.mu.Unlock()
	return t.m.reloadLocked(minEvents, t.what)
}

// announce broadcasts the new superblock (type typ: METADATA_UPDATED, or
// md's REMOVE / RE_ADD) and returns the receivers that did not act.
func (t *changeTxn) announce(ctx context.Context, typ broadcast.Type, dev uint32) ([]dlm.NodeID, error) {
	t.m.mu.Lock()
	msg := announcement(typ, dev, t.m.st)
	t.m.mu.Unlock()
	res, err := t.send(ctx, msg)
	if err != nil {
		return nil, err
	}
	if p := problems(res); p != nil {
		t.m.log.Warn("not every node applied the change", "change", t.what, "msg", typ, "err", p)
		return failedNodes(res), nil
	}
	t.m.log.Info("change applied on every node", "change", t.what, "msg", typ, "events", msg.Low, "acted", res.Acted, "not_joined", res.NotJoined)
	return nil, nil
}

// commit marks the journalled change committed, then passes the test
// crash point step+":committing".
func (t *changeTxn) commit(step string) error {
	if err := t.setState(StateCommitted); err != nil {
		return err
	}
	return t.m.point(step + ":committing")
}

// apply writes next to devs, reloads, and announces it (typ, dev as for
// announce), ignoring which receivers did not act.
func (t *changeTxn) apply(ctx context.Context, next *superblock.Superblock, devs []Device, typ broadcast.Type, dev uint32) error {
	if err := t.writeSupers(next, devs); err != nil {
		return err
	}
	if err := t.reload(next.Events); err != nil {
		return err
	}
	_, err := t.announce(ctx, typ, dev)
	return err
}

// state returns the current array state (m.st, read under the lock).
func (m *Manager) state() *arrayState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.st
}

// --- the changes ---

// run carries out plan p under the transaction, step by step in the order
// p.Steps lists (the order the simulator runs the same plans in), with the
// test crash points name+":journalled", ":candidate", ":newdisk",
// ":confirmed", ":committing", ":written" and ":announced". It returns the
// receivers that did not act on the announcement (for fail and remove: an
// add or re-add is undone everywhere instead, and returns an error).
func (t *changeTxn) run(ctx context.Context, name string, p *ChangePlan, st *arrayState) ([]dlm.NodeID, error) {
	m := t.m
	for _, step := range p.Steps() {
		switch step {
		case StepJournal:
			if err := t.journal(p.Entry); err != nil {
				return nil, err
			}
			if err := m.point(name + ":journalled"); err != nil {
				return nil, err
			}
		case StepCandidate:
			d := p.Candidate.Member
			if st.HasBitmap {
				var src Member
				for _, s := range st.statuses() {
					if s.State == MemberInSync {
						src = st.Members[s.Dev].Member
						break
					}
				}
				if err := CopyBitmap(st.Shared, src, d); err != nil {
					return nil, fmt.Errorf("%s: %w", t.what, err)
				}
			}
			if err := writeOwnSuper(d, p.Candidate.Super); err != nil {
				return nil, fmt.Errorf("%s: write the candidate superblock: %w", t.what, err)
			}
			if err := t.setState(StateCandidate); err != nil {
				return nil, err
			}
			if err := m.point(name + ":candidate"); err != nil {
				return nil, err
			}
		case StepConfirm:
			c := p.Confirm
			missing, err := t.confirm(ctx, c.UUID, c.RaidSlot, c.Low)
			if err != nil {
				return nil, err
			}
			if p.Entry.Kind == ChangeAdd {
				if err := m.point(name + ":newdisk"); err != nil {
					return nil, err
				}
				if missing != nil {
					return nil, t.abandonAdd(ctx, p.Candidate.Member, missing)
				}
				continue
			}
			if missing != nil {
				m.log.Warn("re-add abandoned: not every node sees the device", "why", missing)
				if bad, err := t.announce(ctx, broadcast.MetadataUpdated, p.Entry.Dev); err != nil || len(bad) > 0 {
					m.log.Warn("telling the nodes to forget the candidate", "err", err, "nodes", bad)
				}
				return nil, fmt.Errorf("%s: %w: %v", t.what, ErrDeviceNotSeen, missing)
			}
			if err := m.point(name + ":confirmed"); err != nil {
				return nil, err
			}
		case StepConfirmed:
			if err := t.setState(StateConfirmed); err != nil {
				return nil, err
			}
			if err := m.point(name + ":confirmed"); err != nil {
				return nil, err
			}
		case StepCommit:
			if err := t.commit(name); err != nil {
				return nil, err
			}
		case StepMark:
			if m.isDead() {
				return nil, errCrashed
			}
			if err := writeOwnSuper(p.Mark.Member, p.Mark.Super); err != nil {
				return nil, fmt.Errorf("%s: mark its superblock removed: %w", t.what, err)
			}
		case StepWrite:
			if err := t.writeSupers(p.Next, p.Writes); err != nil {
				return nil, err
			}
			if err := m.point(name + ":written"); err != nil {
				return nil, err
			}
		case StepReload:
			if err := t.reload(p.Next.Events); err != nil {
				if p.Entry.Kind == ChangeAdd {
					return nil, t.undoAdd(ctx, p.Real.Member, p.Real.Super, fmt.Errorf("this node: %w", err))
				}
				return nil, err
			}
		case StepAnnounce:
			bad, err := t.announce(ctx, p.Announce, p.Entry.Dev)
			if err != nil {
				return nil, err
			}
			if err := m.point(name + ":announced"); err != nil {
				return nil, err
			}
			if len(bad) > 0 {
				switch p.Entry.Kind {
				case ChangeAdd:
					return nil, t.undoAdd(ctx, p.Real.Member, p.Real.Super, fmt.Errorf("nodes %v could not bind the device", bad))
				case ChangeReAdd:
					return nil, t.undoReAdd(ctx, p.Entry.Dev, bad)
				}
			}
			return bad, nil
		}
	}
	return nil, nil
}

// Fail marks member dev faulty on every node (mdadm --fail): the new
// superblock is written to the other members, then METADATA_UPDATED makes
// every node stop I/O to it. Failing the last copy of some data is
// refused. A node that cannot apply the failure stops its array rather than
// keep writing to the member (see docs/array.md).
func (m *Manager) Fail(ctx context.Context, dev uint32) error {
	t, err := m.begin(ctx, fmt.Sprintf("fail device %d", dev), false)
	if err != nil {
		return err
	}
	defer t.end(ctx)
	st := m.state()
	p, err := planFail(st, dev, m.cfg.Now())
	if err != nil {
		return err
	}
	bad, err := t.run(ctx, "fail", p, st)
	if err != nil {
		return err
	}
	if len(bad) > 0 {
		m.log.Warn("a failure must complete everywhere: nodes that could not apply it retry and stop their array if they cannot", "dev", dev, "nodes", bad)
	}
	m.log.Info("member failed cluster-wide", "dev", dev, "path", p.Entry.Path)
	m.wake(m.kick)
	return nil
}

// Remove removes a faulty member or a spare (mdadm --remove). A removed
// spare's own superblock is marked removed first (its role for itself set
// to faulty) so that it is never found as a spare again; a removed faulty
// member keeps its old superblock, from which ReAdd can bring it back.
// REMOVE{raid_slot} makes every node unbind it.
func (m *Manager) Remove(ctx context.Context, dev uint32) error {
	t, err := m.begin(ctx, fmt.Sprintf("remove device %d", dev), false)
	if err != nil {
		return err
	}
	defer t.end(ctx)
	st := m.state()
	p, err := planRemove(st, dev, m.cfg.Now())
	if err != nil {
		return err
	}
	if _, err := t.run(ctx, "remove", p, st); err != nil {
		return err
	}
	m.log.Info("member removed cluster-wide", "dev", dev, "path", p.Entry.Path)
	return nil
}

// writeOwnSuper writes one device's superblock and syncs it.
func writeOwnSuper(d Member, sb *superblock.Superblock) error {
	b, err := encodeSuper(sb)
	if err != nil {
		return err
	}
	if _, err := d.WriteAt(b, int64(sb.SuperOffset)*superblock.SectorSize); err != nil {
		return err
	}
	return d.Sync()
}

// zeroSuper wipes a device's v1.2 superblock.
func zeroSuper(d Member) error {
	if _, err := d.WriteAt(make([]byte, 4096), superblock.V12Offset*superblock.SectorSize); err != nil {
		return err
	}
	return d.Sync()
}

// ZeroSuper wipes a device's v1.2 superblock, as the recovery of an add
// that never committed does to the candidate superblock it left.
func ZeroSuper(d Member) error { return zeroSuper(d) }

// WriteOwnSuper writes one device's own superblock (a candidate, a
// removal mark) and syncs it.
func WriteOwnSuper(d Member, sb *superblock.Superblock) error { return writeOwnSuper(d, sb) }

// AddSpare adds the device at path to the array on every node (mdadm
// --add), md's add-new-disk protocol without udev:
//
//  1. under the token, the device gets the array's superblock for its new
//     device number under the candidate UUID (so that nobody adopts it
//     yet) and a copy of the bitmap; the change is journalled;
//  2. NEWDISK{device UUID, device number} asks every node to find the
//     device among its own configured paths (by UUID: the path may
//     differ); a node that finds it drops no-new-dev to NL and answers
//     found, one that does not answers with an error;
//  3. the add goes on only if every node answered found and the NOQUEUE EX
//     on no-new-dev is granted (every node dropped its CR); otherwise the
//     candidate superblock is wiped and METADATA_UPDATED makes every node
//     forget it: no node keeps the device;
//  4. the device's real superblock is written first (the commit point),
//     then the others with the events bumped; METADATA_UPDATED makes every
//     node re-read the members and bind the device as a spare (and re-take
//     no-new-dev in CR);
//  5. if some node could not bind it, the add is undone the same way;
//  6. the sync loop of some node (under the resync lock) puts the spare
//     into an empty slot and rebuilds it if the array is degraded.
//
// The steps are PlanAdd's plan, run in ChangePlan.Steps order.
func (m *Manager) AddSpare(ctx context.Context, path string) (MemberStatus, error) {
	what := "add " + path
	t, err := m.begin(ctx, what, false)
	if err != nil {
		return MemberStatus{}, err
	}
	defer t.end(ctx)
	m.mu.Lock()
	st := m.st
	d, err := m.claimLocked(path)
	var inUse []uint32
	if err == nil {
		for _, f := range m.scanLocked() {
			if f.Super.SetUUID == m.uuid || f.Super.SetUUID == candidateUUID(m.uuid) {
				inUse = append(inUse, f.Super.DevNumber)
			}
		}
		for _, c := range m.candidates {
			inUse = append(inUse, c.Dev)
		}
	}
	m.mu.Unlock()
	if err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w", what, err)
	}
	defer m.unclaim(path)
	p, err := planAdd(st, d, path, inUse, m.cfg.Rand, m.cfg.Now())
	if err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w", what, err)
	}
	if _, err := t.run(ctx, "add", p, st); err != nil {
		return MemberStatus{}, err
	}
	out := m.memberStatus(p.Entry.Dev)
	m.log.Info("device added on every node", "dev", p.Entry.Dev, "path", path, "device_uuid", bitmap.FormatUUID(p.Entry.DeviceUUID))
	m.wake(m.kick)
	return out, nil
}

// memberStatus returns member dev's status as the manager knows it now
// (zero if the array has no such member).
func (m *Manager) memberStatus(dev uint32) MemberStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	if r := m.st.Members[dev]; r != nil {
		return r.MemberStatus
	}
	return MemberStatus{}
}

// noNewDevRetry bounds the retries of the no-new-dev EX (see confirm).
const noNewDevRetry = time.Second

// confirm broadcasts NEWDISK and checks md's no-new-dev lock. missing is
// nil when every node confirmed, else the nodes (and reasons) that did
// not.
func (t *changeTxn) confirm(ctx context.Context, devUUID [16]byte, devNo uint32, base uint64) (missing error, err error) {
	m := t.m
	res, err := t.send(ctx, broadcast.Message{Type: broadcast.NewDisk, UUID: devUUID, RaidSlot: devNo, Low: base})
	if err != nil {
		return nil, err
	}
	if p := problems(res); p != nil {
		return p, nil
	}
	if t.bt == nil {
		return nil, nil
	}
	m.mu.Lock()
	nnd := m.noNewDev
	m.mu.Unlock()
	if nnd == nil {
		return nil, fmt.Errorf("%s: %s lock not held", t.what, NoNewDevLock)
	}
	// Every receiver that confirmed has dropped its CR before answering,
	// but the lock manager sends down-conversions without waiting, so the
	// master may not have applied them yet: the NOQUEUE EX asks for
	// blocking callbacks (which make a node that already dropped send it
	// at once) and is retried for a short, bounded while. A node that
	// really holds CR keeps refusing it.
	deadline := time.Now().Add(min(m.cfg.LockTimeout, noNewDevRetry))
	for {
		lctx, cancel := context.WithTimeout(ctx, m.cfg.LockTimeout)
		err = nnd.Convert(lctx, dlm.EX, dlm.NoQueue|dlm.NoQueueBast)
		cancel()
		if !errors.Is(err, dlm.ErrAgain) || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	switch {
	case errors.Is(err, dlm.ErrAgain):
		return fmt.Errorf("some node did not confirm the device: %s EX refused (a node still holds CR)", NoNewDevLock), nil
	case err != nil:
		return nil, fmt.Errorf("%s: %s EX: %w", t.what, NoNewDevLock, err)
	}
	lctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), m.cfg.LockTimeout)
	err = nnd.Convert(lctx, dlm.CR, 0)
	cancel()
	if err != nil {
		m.mu.Lock()
		m.needCR = true
		m.mu.Unlock()
		m.log.Warn("no-new-dev back to CR failed; retried later", "err", err)
	}
	m.log.Info("every node confirmed the device", "device_uuid", bitmap.FormatUUID(devUUID), "dev", devNo, "acted", res.Acted)
	return nil, nil
}

// abandonAdd undoes an add that some node did not confirm: the candidate
// superblock is wiped and METADATA_UPDATED makes every node forget it and
// re-take no-new-dev in CR.
func (t *changeTxn) abandonAdd(ctx context.Context, d Member, why error) error {
	m := t.m
	m.log.Warn("add abandoned: not every node sees the device; undoing it everywhere", "change", t.what, "why", why)
	if err := t.setState(StateUndoing); err != nil {
		return err
	}
	if err := m.point("add:undoing"); err != nil {
		return err
	}
	if err := zeroSuper(d); err != nil {
		return fmt.Errorf("%s: %w: %v; and wiping the candidate superblock failed: %v", t.what, ErrDeviceNotSeen, why, err)
	}
	if bad, err := t.announce(ctx, broadcast.MetadataUpdated, 0); err != nil || len(bad) > 0 {
		m.log.Warn("telling the nodes to forget the candidate", "err", err, "nodes", bad)
	}
	return fmt.Errorf("%s: %w: %v", t.what, ErrDeviceNotSeen, why)
}

// undoAdd takes a committed add back off the disk because some node could
// not bind the device: the device's superblock is wiped (it was the
// commit point), the others get the events bumped, and METADATA_UPDATED
// makes every node unbind it.
func (t *changeTxn) undoAdd(ctx context.Context, d Member, real *superblock.Superblock, why error) error {
	m := t.m
	m.log.Warn("add undone everywhere: not every node could bind the device", "change", t.what, "why", why)
	if err := t.setState(StateUndoing); err != nil {
		return err
	}
	if err := m.point("add:undoing"); err != nil {
		return err
	}
	if err := zeroSuper(d); err != nil {
		return fmt.Errorf("%s: undo: wipe the device's superblock: %w (it stays a spare everywhere)", t.what, err)
	}
	m.mu.Lock()
	err := m.reloadLocked(0, t.what+": undo")
	st := m.st
	m.mu.Unlock()
	if err != nil {
		return fmt.Errorf("%s: undo: %w", t.what, err)
	}
	next := BumpEvents(st.Shared, m.cfg.Now())
	if err := t.writeSupers(next, st.devices()); err != nil {
		return err
	}
	if err := t.reload(next.Events); err != nil {
		return err
	}
	if bad, err := t.announce(ctx, broadcast.MetadataUpdated, real.DevNumber); err != nil || len(bad) > 0 {
		m.log.Error("undo of the add not applied everywhere", "err", err, "nodes", bad)
	}
	return fmt.Errorf("%s: undone on every node: %w", t.what, why)
}

// ReAdd puts a failed or removed member back into the slot its own
// superblock names (mdadm --re-add). Every node must see it (NEWDISK and
// no-new-dev, as for an add). It then recovers from the union of every
// node's bitmap slot (md's gather_bitmaps): a chunk written while the
// member was out is dirty in the slot of whichever node wrote it, because
// no node clears bits while the array is degraded.
func (m *Manager) ReAdd(ctx context.Context, path string) (MemberStatus, error) {
	what := "re-add " + path
	t, err := m.begin(ctx, what, false)
	if err != nil {
		return MemberStatus{}, err
	}
	defer t.end(ctx)
	m.mu.Lock()
	st := m.st
	d, err := m.claimLocked(path)
	m.mu.Unlock()
	if err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w", what, err)
	}
	defer m.unclaim(path)
	sectors, err := memberSectors(d)
	if err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w", what, err)
	}
	dsb, err := superblock.Probe(d, sectors)
	if err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w: no superblock (add it instead): %v", what, ErrRefusedChange, err)
	}
	if dsb.SetUUID != m.uuid {
		return MemberStatus{}, fmt.Errorf("%s: %w: it belongs to array %s", what, ErrRefusedChange, bitmap.FormatUUID(dsb.SetUUID))
	}
	p, err := planReAdd(st, d, dsb, path, m.cfg.Now())
	if err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w", what, err)
	}
	if _, err := t.run(ctx, "re-add", p, st); err != nil {
		return MemberStatus{}, err
	}
	out := m.memberStatus(p.Entry.Dev)
	m.log.Info("member re-added on every node; it recovers from the union of the bitmaps", "dev", p.Entry.Dev, "slot", p.Entry.Slot, "path", path)
	m.wake(m.kick)
	return out, nil
}

// undoReAdd takes a committed re-add back because nodes bad could not
// bind the member: it goes back out (removed) everywhere.
func (t *changeTxn) undoReAdd(ctx context.Context, dev uint32, bad []dlm.NodeID) error {
	m := t.m
	m.log.Warn("re-add undone everywhere: not every node could bind the device", "nodes", bad)
	if err := t.setState(StateUndoing); err != nil {
		return err
	}
	m.mu.Lock()
	cur := m.st
	m.mu.Unlock()
	undo := clone(cur.Shared)
	undo.DevRoles[dev] = superblock.RoleSpare
	undo = BumpEvents(undo, m.cfg.Now())
	var keep []Device
	for _, x := range cur.devices() {
		if x.Super.DevNumber != dev {
			keep = append(keep, x)
		}
	}
	if err := t.writeSupers(undo, keep); err != nil {
		return err
	}
	if err := t.reload(undo.Events); err != nil {
		return err
	}
	if b2, err := t.announce(ctx, broadcast.MetadataUpdated, dev); err != nil || len(b2) > 0 {
		m.log.Error("undo of the re-add not applied everywhere", "err", err, "nodes", b2)
	}
	return fmt.Errorf("%s: undone on every node: nodes %v could not bind it", t.what, bad)
}
