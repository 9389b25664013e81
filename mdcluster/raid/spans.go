package raid

import (
	"sort"
	"sync"
	"sync/atomic"
)

// span is a half-open byte range [lo, hi).
type span struct{ lo, hi int64 }

// spanSet is a set of array byte ranges, kept sorted and merged. The
// engine keeps the ranges whose copies may differ (not yet resynced) in
// one: reads there go to the first in-sync copy, as md reads past its
// resync point. An atomic count lets the read path skip the lock when the
// set is empty, which is nearly always.
type spanSet struct {
	mu    sync.Mutex
	spans []span
	n     atomic.Int32
}

// add inserts [lo, hi).
func (s *spanSet) add(lo, hi int64) {
	if lo >= hi {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	i := sort.Search(len(s.spans), func(i int) bool { return s.spans[i].hi >= lo })
	j := i
	for j < len(s.spans) && s.spans[j].lo <= hi {
		lo, hi = min(lo, s.spans[j].lo), max(hi, s.spans[j].hi)
		j++
	}
	s.spans = append(s.spans[:i], append([]span{{lo, hi}}, s.spans[j:]...)...)
	s.n.Store(int32(len(s.spans)))
}

// remove deletes [lo, hi) from the set.
func (s *spanSet) remove(lo, hi int64) {
	if lo >= hi || s.n.Load() == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []span
	for _, x := range s.spans {
		if x.hi <= lo || x.lo >= hi {
			out = append(out, x)
			continue
		}
		if x.lo < lo {
			out = append(out, span{x.lo, lo})
		}
		if x.hi > hi {
			out = append(out, span{hi, x.hi})
		}
	}
	s.spans = out
	s.n.Store(int32(len(s.spans)))
}

// overlaps reports whether [lo, hi) meets the set.
func (s *spanSet) overlaps(lo, hi int64) bool {
	if s.n.Load() == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	i := sort.Search(len(s.spans), func(i int) bool { return s.spans[i].hi > lo })
	return i < len(s.spans) && s.spans[i].lo < hi
}

// list returns a copy of the spans.
func (s *spanSet) list() []span {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]span(nil), s.spans...)
}
