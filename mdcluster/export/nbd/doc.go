// Package nbd serves block devices over the Network Block Device protocol.
//
// Each storage node exports its arrays this way: userspace clients (libnbd's
// nbdinfo and nbdcopy, fio's nbd engine, qemu) connect to a unix socket or a
// loopback TCP port, and the kernel's NBD client is handed one end of a
// socket pair (ServeTransmission) so the array appears as /dev/nbdN. The
// server is small on purpose: no NBD library is available to the project,
// and every line of it reads untrusted input.
//
// # What is implemented
//
// Negotiation is fixed newstyle only (old style and plain newstyle clients
// are refused): NBD_OPT_GO and NBD_OPT_INFO (with NBD_INFO_EXPORT,
// NBD_INFO_NAME, NBD_INFO_DESCRIPTION and NBD_INFO_BLOCK_SIZE, the last
// always sent), NBD_OPT_EXPORT_NAME, NBD_OPT_LIST, NBD_OPT_ABORT and the
// no-zeroes flag. Every other option, including STARTTLS, STRUCTURED_REPLY
// and the metadata-context options, is answered NBD_REP_ERR_UNSUP, which
// every client tried copes with: the Linux kernel never negotiates
// structured replies, and libnbd falls back to simple replies.
//
// Transmission uses simple replies only: READ, WRITE, FLUSH, TRIM,
// WRITE_ZEROES (NO_HOLE, FAST_ZERO) and DISC, with FUA. CACHE and
// BLOCK_STATUS are not advertised and are answered EINVAL, like unknown
// commands and flags. Requests run concurrently, up to Config.MaxInFlight
// per connection, and replies go out as they complete, in any order,
// batched into one writev when several are ready. A large write that is
// alone in flight on its connection is handed to the backend in pieces as
// its data arrives, so that a client at queue depth 1 does not wait for the
// transfer and then for the device (Stats.StreamedWrites).
//
// # Errors
//
// A request the server can refuse is refused with an error reply and
// changes nothing; a stream it cannot parse (bad magic, a write too large
// to read past, a stalled request) closes the connection. Either way the
// server logs at a bounded rate and counts it (Stats). Error numbers:
//
//   - EINVAL: unknown command or flag, a command not advertised (FLUSH
//     without Capabilities.Flush, ...), a read or trim past the end, a
//     request not aligned to the minimum block size, a read or write over
//     the maximum payload, FLUSH with an offset or length.
//   - ENOSPC: a write or write-zeroes past the end; a backend's ENOSPC,
//     EDQUOT or EFBIG.
//   - EPERM: a write, trim or write-zeroes on a read-only export; a
//     backend's ErrReadOnly, EPERM, EROFS or EACCES.
//   - ENOTSUP: FAST_ZERO write-zeroes the backend cannot do fast
//     (ErrNotFast).
//   - ESHUTDOWN: requests received after Close began; a backend's
//     ErrShutdown.
//   - EIO: any other backend error, and short reads.
//
// # Use
//
//	srv, err := nbd.NewServer(nbd.Config{Exports: []nbd.Export{{Name: "md0", Backend: b}}})
//	l, err := nbd.ListenUnix("/run/mdcluster/nbd.sock")
//	go srv.Serve(l)
//	...
//	srv.Close()
//
// Then, for example, nbdinfo 'nbd+unix:///md0?socket=/run/mdcluster/nbd.sock'.
// docs/export.md has more, with the limits and the tools.
package nbd
