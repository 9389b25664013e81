package raid

import "errors"

// failMember stops using member i because of cause (an I/O error, or the
// operator). It returns a channel that is closed once OnMemberFailed has
// returned (so writes that saw the failure can wait for it to be
// recorded before they are acknowledged), or nil when the member is not
// failed: it is missing, or it holds the last in-sync copy of some block
// (md never fails the last working copy; the I/O that hit the error fails
// instead, and FailuresRefused counts it).
func (e *Engine) failMember(i int, cause error) <-chan struct{} {
	return e.fail(i, cause, true)
}

// fail is failMember; ioErr says whether an I/O error (not the operator)
// caused it, for the FailuresRefused counter.
func (e *Engine) fail(i int, cause error, ioErr bool) <-chan struct{} {
	if ioErr && errors.Is(cause, ErrIOStopped) {
		// The gate refused the I/O: the member is fine, this node stopped.
		return nil
	}
	m := e.members[i]
	e.mu.Lock()
	switch m.st() {
	case Failed:
		ch := m.failDone
		e.mu.Unlock()
		return ch
	case Missing:
		e.mu.Unlock()
		return nil
	case InSync:
		if !e.geo.Survives(func(j int) bool { return j != i && e.members[j].st() == InSync }) {
			e.mu.Unlock()
			if !ioErr {
				return nil
			}
			e.st.notFailed.Add(1)
			e.log.Error("member I/O error, but it holds the last in-sync copy of some data: not failed", "member", i, "err", cause)
			return nil
		}
	}
	m.state.Store(int32(Failed))
	ch := make(chan struct{})
	m.failDone = ch
	e.mu.Unlock()
	m.errors.Add(1)
	e.st.memberFailures.Add(1)
	e.log.Error("member failed: no more I/O to it", "member", i, "err", cause)
	go func() {
		defer close(ch)
		if f := e.cfg.OnMemberFailed; f != nil {
			f(i, cause)
		}
	}()
	return ch
}

// waitFailures waits for the failure callbacks in chs.
func waitFailures(chs []<-chan struct{}) {
	for _, ch := range chs {
		if ch != nil {
			<-ch
		}
	}
}
