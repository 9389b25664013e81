// Package crashtest holds the RAID engine's multi-process crash test (its
// tests only): three node processes (mdcluster/node: membership and the
// lock manager over TCP on 127.0.0.1) share file-backed members through
// mdcluster/raid with their bitmap slots held by bitmap/ownership; one is
// killed with SIGKILL at chosen device operations while all three write,
// and the test checks that the survivors resync exactly the dead slot's
// dirty chunks, that every copy ends identical, and that every
// acknowledged durable write reads back; the "-aio" arrays do the same
// over the engine's native AIO write path, stopping the victim with a
// request's mirror writes in flight. See docs/raid.md ("Crash test").
//
// It lives in its own package, not in mdcluster/raid, so that the engine's
// own tests do not link the node runtime.
package crashtest
