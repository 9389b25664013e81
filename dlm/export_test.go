package dlm

// retag sets a lock's callback tag (tests adopt orphans before they know
// which one the core picks). The completion of the adoption is already
// queued with the old tag, so it is rewritten too.
func (c *Core) retag(id LockID, tag any) {
	if l := c.lookup(id); l != nil {
		l.tag = tag
	}
	for i := range c.out {
		if c.out[i].Lock == id {
			c.out[i].Tag = tag
		}
	}
}
