package nbd

import (
	"encoding/binary"
	"fmt"
)

// Wire constants of the NBD protocol (fixed newstyle negotiation, simple
// replies). Values from the protocol description; all integers on the wire
// are big-endian.
const (
	magicInit     = 0x4e42444d41474943 // "NBDMAGIC", the server's first 8 bytes
	magicOpt      = 0x49484156454f5054 // "IHAVEOPT", newstyle magic and option prefix
	magicOptReply = 0x3e889045565a9    // every fixed-newstyle option reply
	magicRequest  = 0x25609513         // transmission request
	magicReply    = 0x67446698         // simple reply
)

// Handshake flags (server) and client flags.
const (
	flagFixedNewstyle  = 1 << 0
	flagNoZeroes       = 1 << 1
	flagCFixedNewstyle = 1 << 0
	flagCNoZeroes      = 1 << 1
)

// Options.
const (
	optExportName       = 1
	optAbort            = 2
	optList             = 3
	optStartTLS         = 5
	optInfo             = 6
	optGo               = 7
	optStructuredReply  = 8
	optListMetaContext  = 9
	optSetMetaContext   = 10
	optExtendedHeaders  = 11
	optReplyHeaderLen   = 20
	optRequestHeaderLen = 16
)

// Option reply types.
const (
	repAck             = 1
	repServer          = 2
	repInfo            = 3
	repErrUnsup        = 1<<31 + 1
	repErrPolicy       = 1<<31 + 2
	repErrInvalid      = 1<<31 + 3
	repErrUnknown      = 1<<31 + 6
	repErrShutdown     = 1<<31 + 7
	repErrBlockSizeReq = 1<<31 + 8
	repErrTooBig       = 1<<31 + 9
)

// Information types in NBD_REP_INFO.
const (
	infoExport      = 0
	infoName        = 1
	infoDescription = 2
	infoBlockSize   = 3
)

// Transmission flags.
const (
	tflagHasFlags     = 1 << 0
	tflagReadOnly     = 1 << 1
	tflagSendFlush    = 1 << 2
	tflagSendFUA      = 1 << 3
	tflagRotational   = 1 << 4
	tflagSendTrim     = 1 << 5
	tflagSendZeroes   = 1 << 6
	tflagCanMultiConn = 1 << 8
	tflagSendFastZero = 1 << 11
)

// Commands.
const (
	cmdRead        = 0
	cmdWrite       = 1
	cmdDisc        = 2
	cmdFlush       = 3
	cmdTrim        = 4
	cmdCache       = 5
	cmdWriteZeroes = 6
	cmdBlockStatus = 7
)

// Command flags.
const (
	cmdFlagFUA      = 1 << 0
	cmdFlagNoHole   = 1 << 1
	cmdFlagDF       = 1 << 2
	cmdFlagReqOne   = 1 << 3
	cmdFlagFastZero = 1 << 4
)

// Error values carried in simple replies. They are the Linux errno numbers,
// but the protocol fixes them, so they are spelled out rather than taken from
// the host's syscall package.
const (
	errnoOK        = 0
	errnoPerm      = 1
	errnoIO        = 5
	errnoNoMem     = 12
	errnoInval     = 22
	errnoNoSpc     = 28
	errnoOverflow  = 75
	errnoNotSup    = 95
	errnoShutdown  = 108
	requestHdrLen  = 28
	replyHdrLen    = 16
	maxStringLen   = 4096    // longest export name or description the protocol allows
	defaultMaxBody = 1 << 25 // 32 MiB: what the protocol says a server should accept
)

// request is one decoded transmission-phase request header.
type request struct {
	flags  uint16
	typ    uint16
	cookie uint64
	offset uint64
	length uint32
}

// errBadMagic is returned by decodeRequest for a header that does not start
// with the request magic: the stream is out of step (or not NBD) and nothing
// after it can be trusted, so the connection must be dropped.
type errBadMagic uint32

func (e errBadMagic) Error() string {
	return fmt.Sprintf("bad request magic 0x%08x (want 0x%08x)", uint32(e), uint32(magicRequest))
}

// decodeRequest parses a 28-byte request header. The only thing it rejects is
// a wrong magic; everything else (unknown commands, flags, ranges) is checked
// against the export by the connection, which answers it with an error reply.
func decodeRequest(b []byte) (request, error) {
	if len(b) < requestHdrLen {
		return request{}, fmt.Errorf("request header is %d bytes, want %d", len(b), requestHdrLen)
	}
	if m := binary.BigEndian.Uint32(b); m != magicRequest {
		return request{}, errBadMagic(m)
	}
	return request{
		flags:  binary.BigEndian.Uint16(b[4:]),
		typ:    binary.BigEndian.Uint16(b[6:]),
		cookie: binary.BigEndian.Uint64(b[8:]),
		offset: binary.BigEndian.Uint64(b[16:]),
		length: binary.BigEndian.Uint32(b[24:]),
	}, nil
}

// encodeRequest is decodeRequest's inverse (used by tests and fuzz seeds).
func encodeRequest(b []byte, r request) []byte {
	b = binary.BigEndian.AppendUint32(b, magicRequest)
	b = binary.BigEndian.AppendUint16(b, r.flags)
	b = binary.BigEndian.AppendUint16(b, r.typ)
	b = binary.BigEndian.AppendUint64(b, r.cookie)
	b = binary.BigEndian.AppendUint64(b, r.offset)
	return binary.BigEndian.AppendUint32(b, r.length)
}

// appendReply appends a simple reply header.
func appendReply(b []byte, errno uint32, cookie uint64) []byte {
	b = binary.BigEndian.AppendUint32(b, magicReply)
	b = binary.BigEndian.AppendUint32(b, errno)
	return binary.BigEndian.AppendUint64(b, cookie)
}

// infoRequest is the payload of NBD_OPT_INFO and NBD_OPT_GO.
type infoRequest struct {
	name  string
	infos []uint16
}

// parseInfoRequest parses the payload of NBD_OPT_INFO / NBD_OPT_GO: a
// length-prefixed export name, then a count of information types and that
// many 16-bit types. The lengths must account for the payload exactly; the
// caller has already bounded len(data).
func parseInfoRequest(data []byte) (infoRequest, error) {
	if len(data) < 6 {
		return infoRequest{}, fmt.Errorf("payload is %d bytes, need at least 6", len(data))
	}
	nameLen := binary.BigEndian.Uint32(data)
	if uint64(nameLen) > uint64(len(data)-6) {
		return infoRequest{}, fmt.Errorf("export name length %d does not fit in a %d-byte payload", nameLen, len(data))
	}
	if nameLen > maxStringLen {
		return infoRequest{}, fmt.Errorf("export name is %d bytes, the protocol allows %d", nameLen, maxStringLen)
	}
	rest := data[4+nameLen:]
	n := int(binary.BigEndian.Uint16(rest))
	rest = rest[2:]
	if len(rest) != 2*n {
		return infoRequest{}, fmt.Errorf("%d information requests need %d bytes, payload has %d", n, 2*n, len(rest))
	}
	r := infoRequest{name: string(data[4 : 4+nameLen]), infos: make([]uint16, n)}
	for i := range r.infos {
		r.infos[i] = binary.BigEndian.Uint16(rest[2*i:])
	}
	return r, nil
}

// appendInfoRequest is parseInfoRequest's inverse (tests and fuzz seeds).
func appendInfoRequest(b []byte, r infoRequest) []byte {
	b = binary.BigEndian.AppendUint32(b, uint32(len(r.name)))
	b = append(b, r.name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(r.infos)))
	for _, t := range r.infos {
		b = binary.BigEndian.AppendUint16(b, t)
	}
	return b
}

// cmdName names a command for logs.
func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write-zeroes"
	case cmdBlockStatus:
		return "block-status"
	}
	return fmt.Sprintf("cmd-%d", t)
}
