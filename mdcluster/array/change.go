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
	entry journalEntry
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
func (t *changeTxn) journal(e journalEntry) error {
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
	events := t.m.st.Events()
	good := t.m.goodDeviceLocked()
	t.m.mu.Unlock()
	raid := good
	if typ == broadcast.Remove || typ == broadcast.ReAdd {
		raid = dev
	}
	res, err := t.send(ctx, broadcast.Message{Type: typ, RaidSlot: raid, Low: events})
	if err != nil {
		return nil, err
	}
	if p := problems(res); p != nil {
		t.m.log.Warn("not every node applied the change", "change", t.what, "msg", typ, "err", p)
		return failedNodes(res), nil
	}
	t.m.log.Info("change applied on every node", "change", t.what, "msg", typ, "events", events, "acted", res.Acted, "not_joined", res.NotJoined)
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

// applyAt is apply with the test crash points step+":written" (after the
// write) and step+":announced" (after the announcement); it returns the
// receivers that did not act.
func (t *changeTxn) applyAt(ctx context.Context, step string, next *superblock.Superblock, devs []Device, typ broadcast.Type, dev uint32) ([]dlm.NodeID, error) {
	m := t.m
	if err := t.writeSupers(next, devs); err != nil {
		return nil, err
	}
	if err := m.point(step + ":written"); err != nil {
		return nil, err
	}
	if err := t.reload(next.Events); err != nil {
		return nil, err
	}
	bad, err := t.announce(ctx, typ, dev)
	if err != nil {
		return nil, err
	}
	if err := m.point(step + ":announced"); err != nil {
		return nil, err
	}
	return bad, nil
}

// state returns the current array state (m.st, read under the lock).
func (m *Manager) state() *arrayState {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.st
}

// goodDeviceLocked is md's good_device_nr: the first in-sync member, from
// which receivers may reload the superblock.
func (m *Manager) goodDeviceLocked() uint32 {
	for _, s := range m.st.statuses() {
		if s.State == MemberInSync {
			return s.Dev
		}
	}
	return 0
}

// --- the changes ---

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
	rec := st.Members[dev]
	if rec == nil {
		return fmt.Errorf("fail device %d: %w: no such member", dev, ErrRefusedChange)
	}
	if rec.State == MemberFaulty {
		return fmt.Errorf("fail device %d: %w: already faulty", dev, ErrRefusedChange)
	}
	if rec.State == MemberInSync {
		sh := st.Shared
		if !Enough(sh.Level, sh.Layout, int(sh.RaidDisks), func(slot int) bool {
			h := st.slotHolder(slot)
			return h != nil && h.State == MemberInSync && h.Dev != dev
		}) {
			return fmt.Errorf("fail device %d: %w: it holds the last in-sync copy of some data", dev, ErrRefusedChange)
		}
	}
	if err := t.journal(journalEntry{Kind: ChangeFail, State: StatePrepared, BaseEvents: st.Events(), Dev: dev,
		DeviceUUID: rec.DeviceUUID, Path: rec.Path, Slot: rec.Slot}); err != nil {
		return err
	}
	if err := m.point("fail:journalled"); err != nil {
		return err
	}
	next, err := Fail(st.Shared, dev)
	if err != nil {
		return fmt.Errorf("fail device %d: %w", dev, err)
	}
	next = BumpEvents(next, m.cfg.Now())
	if err := t.commit("fail"); err != nil {
		return err
	}
	bad, err := t.applyAt(ctx, "fail", next, st.devices(), broadcast.MetadataUpdated, dev)
	if err != nil {
		return err
	}
	if len(bad) > 0 {
		m.log.Warn("a failure must complete everywhere: nodes that could not apply it retry and stop their array if they cannot", "dev", dev, "nodes", bad)
	}
	m.log.Info("member failed cluster-wide", "dev", dev, "path", rec.Path)
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
	rec := st.Members[dev]
	if rec == nil {
		return fmt.Errorf("remove device %d: %w: no such member", dev, ErrRefusedChange)
	}
	if rec.State != MemberFaulty && rec.State != MemberSpare {
		return fmt.Errorf("remove device %d: %w: it is %s: hot remove failed: Device or resource busy (fail it first)", dev, ErrRefusedChange, rec.State)
	}
	if err := t.journal(journalEntry{Kind: ChangeRemove, State: StatePrepared, BaseEvents: st.Events(), Dev: dev,
		DeviceUUID: rec.DeviceUUID, Path: rec.Path, Slot: rec.Slot}); err != nil {
		return err
	}
	if err := m.point("remove:journalled"); err != nil {
		return err
	}
	next := st.Shared
	if rec.State == MemberFaulty {
		if next, err = Remove(st.Shared, dev); err != nil {
			return fmt.Errorf("remove device %d: %w", dev, err)
		}
	}
	next = BumpEvents(next, m.cfg.Now())
	devs := st.devicesExcept(dev)
	if err := t.commit("remove"); err != nil {
		return err
	}
	if rec.State == MemberSpare {
		mark := clone(rec.Super)
		if dev < uint32(len(mark.DevRoles)) {
			mark.DevRoles[dev] = superblock.RoleFaulty
		}
		mark.UpdateChecksum()
		if err := writeOwnSuper(rec.Member, mark); err != nil {
			return fmt.Errorf("remove device %d: mark its superblock removed: %w", dev, err)
		}
	}
	if _, err := t.applyAt(ctx, "remove", next, devs, broadcast.Remove, dev); err != nil {
		return err
	}
	m.log.Info("member removed cluster-wide", "dev", dev, "path", rec.Path)
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
		inUse = st.inUse()
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
	if err := m.checkNewDevice(d, st); err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w", what, err)
	}
	shared, devNo, err := AddSpare(st.Shared, inUse)
	if err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w", what, err)
	}
	var like *superblock.Superblock
	for _, s := range st.statuses() {
		if s.State == MemberInSync {
			like = st.Members[s.Dev].Super
			break
		}
	}
	if like == nil {
		return MemberStatus{}, fmt.Errorf("%s: no in-sync member to model the new superblock on", what)
	}
	real, err := NewDevice(shared, like, devNo, d, m.cfg.Rand)
	if err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w: %v", what, ErrRefusedChange, err)
	}
	base := st.Events()
	if err := t.journal(journalEntry{Kind: ChangeAdd, State: StatePrepared, BaseEvents: base, Dev: devNo,
		DeviceUUID: real.DeviceUUID, Path: path, Slot: -1}); err != nil {
		return MemberStatus{}, err
	}
	if err := m.point("add:journalled"); err != nil {
		return MemberStatus{}, err
	}
	// 1. The candidate: bitmap copy, then the superblock under the
	// candidate UUID.
	if st.HasBitmap {
		var src Member
		for _, s := range st.statuses() {
			if s.State == MemberInSync {
				src = st.Members[s.Dev].Member
				break
			}
		}
		if err := CopyBitmap(st.Shared, src, d); err != nil {
			return MemberStatus{}, fmt.Errorf("%s: %w", what, err)
		}
	}
	cand := clone(real)
	cand.SetUUID = candidateUUID(m.uuid)
	cand.UpdateChecksum()
	if err := writeOwnSuper(d, cand); err != nil {
		return MemberStatus{}, fmt.Errorf("%s: write the candidate superblock: %w", what, err)
	}
	if err := t.setState(StateCandidate); err != nil {
		return MemberStatus{}, err
	}
	if err := m.point("add:candidate"); err != nil {
		return MemberStatus{}, err
	}
	// 2, 3. Confirmation.
	missing, err := t.confirm(ctx, real.DeviceUUID, devNo, base)
	if err != nil {
		return MemberStatus{}, err
	}
	if err := m.point("add:newdisk"); err != nil {
		return MemberStatus{}, err
	}
	if missing != nil {
		return MemberStatus{}, t.abandonAdd(ctx, d, missing)
	}
	if err := t.setState(StateConfirmed); err != nil {
		return MemberStatus{}, err
	}
	if err := m.point("add:confirmed"); err != nil {
		return MemberStatus{}, err
	}
	// 4. Commit: the new device first.
	next := BumpEvents(shared, m.cfg.Now())
	if err := t.commit("add"); err != nil {
		return MemberStatus{}, err
	}
	devs := append([]Device{{Member: d, Super: real}}, st.devices()...)
	if err := t.writeSupers(next, devs); err != nil {
		return MemberStatus{}, err
	}
	if err := m.point("add:written"); err != nil {
		return MemberStatus{}, err
	}
	if err := t.reload(next.Events); err != nil {
		return MemberStatus{}, t.undoAdd(ctx, d, real, fmt.Errorf("this node: %w", err))
	}
	bad, err := t.announce(ctx, broadcast.MetadataUpdated, devNo)
	if err != nil {
		return MemberStatus{}, err
	}
	if err := m.point("add:announced"); err != nil {
		return MemberStatus{}, err
	}
	if len(bad) > 0 {
		return MemberStatus{}, t.undoAdd(ctx, d, real, fmt.Errorf("nodes %v could not bind the device", bad))
	}
	m.mu.Lock()
	var out MemberStatus
	if r := m.st.Members[devNo]; r != nil {
		out = r.MemberStatus
	}
	m.mu.Unlock()
	m.log.Info("device added on every node", "dev", devNo, "path", path, "device_uuid", bitmap.FormatUUID(real.DeviceUUID))
	m.wake(m.kick)
	return out, nil
}

// checkNewDevice refuses a device that is already a member or carries
// another array's superblock.
func (m *Manager) checkNewDevice(d Member, st *arrayState) error {
	sectors, err := memberSectors(d)
	if err != nil {
		return err
	}
	sb, err := superblock.Probe(d, sectors)
	if err != nil {
		return nil // no superblock: a fresh device
	}
	switch sb.SetUUID {
	case m.uuid:
		if r := st.Members[sb.DevNumber]; r != nil && r.DeviceUUID == sb.DeviceUUID {
			return fmt.Errorf("%w: it is already member %d (%s)", ErrRefusedChange, r.Dev, r.State)
		}
		if own := sb.Role(); own < superblock.RoleMax {
			return fmt.Errorf("%w: it held slot %d of this array: re-add it", ErrRefusedChange, own)
		}
		return nil // a removed spare
	case candidateUUID(m.uuid):
		return nil // an abandoned candidate
	}
	return fmt.Errorf("%w: it carries a superblock of array %s: zero it first (mdadm --zero-superblock)", ErrRefusedChange, bitmap.FormatUUID(sb.SetUUID))
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
	dev, slot := dsb.DevNumber, int(dsb.Role())
	if dsb.Role() >= superblock.RoleMax || slot >= int(st.Shared.RaidDisks) {
		return MemberStatus{}, fmt.Errorf("%s: %w: it held no slot (role %#x): add it as a spare", what, ErrRefusedChange, dsb.Role())
	}
	if r := st.Members[dev]; r != nil && r.State != MemberFaulty {
		return MemberStatus{}, fmt.Errorf("%s: %w: device %d is %s", what, ErrRefusedChange, dev, r.State)
	}
	if h := st.slotHolder(slot); h != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w: slot %d is held by device %d now: add it as a spare", what, ErrRefusedChange, slot, h.Dev)
	}
	base := st.Events()
	if err := t.journal(journalEntry{Kind: ChangeReAdd, State: StatePrepared, BaseEvents: base, Dev: dev,
		DeviceUUID: dsb.DeviceUUID, Path: path, Slot: slot}); err != nil {
		return MemberStatus{}, err
	}
	if err := m.point("re-add:journalled"); err != nil {
		return MemberStatus{}, err
	}
	missing, err := t.confirm(ctx, dsb.DeviceUUID, dev, base)
	if err != nil {
		return MemberStatus{}, err
	}
	if missing != nil {
		m.log.Warn("re-add abandoned: not every node sees the device", "why", missing)
		if bad, err := t.announce(ctx, broadcast.MetadataUpdated, dev); err != nil || len(bad) > 0 {
			m.log.Warn("telling the nodes to forget the candidate", "err", err, "nodes", bad)
		}
		return MemberStatus{}, fmt.Errorf("%s: %w: %v", what, ErrDeviceNotSeen, missing)
	}
	if err := m.point("re-add:confirmed"); err != nil {
		return MemberStatus{}, err
	}
	next := st.Shared
	if dev < uint32(len(next.DevRoles)) && next.DevRoles[dev] == superblock.RoleFaulty {
		next = clone(next)
		next.DevRoles[dev] = superblock.RoleSpare
	}
	if next, err = ReAdd(next, dsb); err != nil {
		return MemberStatus{}, fmt.Errorf("%s: %w: %v", what, ErrRefusedChange, err)
	}
	next = BumpEvents(next, m.cfg.Now())
	own := Recovering(dsb, 0, st.HasBitmap)
	if err := t.commit("re-add"); err != nil {
		return MemberStatus{}, err
	}
	devs := append(st.devices(), Device{Member: d, Super: own})
	bad, err := t.applyAt(ctx, "re-add", next, devs, broadcast.ReAdd, dev)
	if err != nil {
		return MemberStatus{}, err
	}
	if len(bad) > 0 {
		// Undo: the member goes back out (removed).
		m.log.Warn("re-add undone everywhere: not every node could bind the device", "nodes", bad)
		if err := t.setState(StateUndoing); err != nil {
			return MemberStatus{}, err
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
			return MemberStatus{}, err
		}
		if err := t.reload(undo.Events); err != nil {
			return MemberStatus{}, err
		}
		if b2, err := t.announce(ctx, broadcast.MetadataUpdated, dev); err != nil || len(b2) > 0 {
			m.log.Error("undo of the re-add not applied everywhere", "err", err, "nodes", b2)
		}
		return MemberStatus{}, fmt.Errorf("%s: undone on every node: nodes %v could not bind it", what, bad)
	}
	m.mu.Lock()
	var out MemberStatus
	if r := m.st.Members[dev]; r != nil {
		out = r.MemberStatus
	}
	m.mu.Unlock()
	m.log.Info("member re-added on every node; it recovers from the union of the bitmaps", "dev", dev, "slot", slot, "path", path)
	m.wake(m.kick)
	return out, nil
}
