package dlm

import "sort"

// LockInfo describes one lock, for dumps and tests.
type LockInfo struct {
	// ID identifies the lock. In Space and Lockspace dumps it is the ID
	// the lock's own node (Node) gives it, the one Lock.ID returns there,
	// so one lock shows the same ID on its node and on its master; 0 for
	// an orphan mastered here (it has no handle; adopting it gives it a
	// new ID). In Core's own dumps it is the core's LockID.
	ID LockID
	// Node is the node the lock belongs to (filled in by Space.Dump).
	Node      NodeID
	Owner     OwnerID
	State     string // "granted", "converting" or "waiting"
	Granted   Mode   // ModeIV for a waiting request
	Requested Mode   // ModeIV when nothing is pending
	Flags     Flags  // flags of the latest request or conversion
	Orphan    bool
}

// ResourceInfo describes one resource and its queues, in the spirit of
// dlm_tool lockdebug.
type ResourceInfo struct {
	Name string
	// Master is the node mastering the resource (filled in by Space.Dump).
	// When it is another node, the queues hold only this node's locks as
	// this node knows them.
	Master     NodeID
	Granted    []LockInfo
	Converting []LockInfo
	Waiting    []LockInfo
	// LVB is a copy of the resource's value block (nil if never written).
	LVB         []byte
	LVBSeq      uint32
	ValNotValid bool
	// Idle: the master keeps the resource cached with no locks (Linux: on
	// the toss list), with its LVB, so that the next request finds both
	// without a directory lookup. It is dropped when the cache is full or
	// at recovery.
	Idle bool
}

func lockInfo(l *lkb) LockInfo {
	return LockInfo{
		ID: l.id, Owner: l.owner, State: l.state.String(),
		Granted: l.grmode, Requested: l.rqmode, Flags: l.exflags, Orphan: l.orphan,
	}
}

func (r *resource) info() ResourceInfo {
	ri := ResourceInfo{Name: r.name, LVBSeq: r.lvbSeq, ValNotValid: r.valNotValid, Idle: r.empty()}
	if r.lvb != nil {
		ri.LVB = append([]byte(nil), r.lvb...)
	}
	for l := r.granted.head; l != nil; l = l.next {
		ri.Granted = append(ri.Granted, lockInfo(l))
	}
	for l := r.convert.head; l != nil; l = l.next {
		ri.Converting = append(ri.Converting, lockInfo(l))
	}
	for l := r.wait.head; l != nil; l = l.next {
		ri.Waiting = append(ri.Waiting, lockInfo(l))
	}
	return ri
}

// Resource describes the named resource, if the core knows it (it may be
// cached with no locks).
func (c *Core) Resource(name string) (ResourceInfo, bool) {
	r := c.res[name]
	if r == nil {
		return ResourceInfo{}, false
	}
	return r.info(), true
}

// Resources describes every resource that has locks, sorted by name.
func (c *Core) Resources() []ResourceInfo { return c.resources(false, nil) }

// resources describes the resources with locks, and the idle cached ones
// too when idle is set, sorted by name. lockID, when not nil, rewrites
// each lock's description from its lock block (Space uses it to show the
// IDs its callers know).
func (c *Core) resources(idle bool, lockID func(*lkb, *LockInfo)) []ResourceInfo {
	var out []ResourceInfo
	for _, r := range c.res {
		if !r.empty() || idle {
			ri := r.info()
			if lockID != nil {
				for _, q := range []struct {
					q  *queue
					li []LockInfo
				}{{&r.granted, ri.Granted}, {&r.convert, ri.Converting}, {&r.wait, ri.Waiting}} {
					i := 0
					for l := q.q.head; l != nil; l = l.next {
						lockID(l, &q.li[i])
						i++
					}
				}
			}
			out = append(out, ri)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// LockInfo describes one lock.
func (c *Core) LockInfo(id LockID) (LockInfo, bool) {
	l := c.lookup(id)
	if l == nil {
		return LockInfo{}, false
	}
	return lockInfo(l), true
}
