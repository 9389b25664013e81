// Command vm3guest runs inside each VM of the three-VM cluster test
// (docs/vmtest.md, vmtest/vm3_test.go), built static:
//
//	vm3guest agent TTY
//
// is the control agent: it puts the serial port TTY in raw mode and
// answers one request per line. "ID T" answers "@@T ID NANOS" with the
// guest's clock at once (the host measures clock offsets with it);
// "ID S NANOS" sets the clock; "ID C BASE64" runs the decoded shell
// command (sh -c, stdin /dev/null) and answers
// "@@R ID EXIT START_NANOS END_NANOS BASE64(stdout+stderr)".
//
//	vm3guest write DEV NODE EPOCH START LEN BLOCK ACKTTY STOPFILE
//
// writes the verifiable pattern (vmtest/vm3pattern) over DEV's region
// [START, START+LEN) with O_DIRECT, BLOCK bytes per write, pass after pass,
// until STOPFILE exists; after every acknowledged write it writes
// "A NODE EPOCH K" (K acknowledged writes so far) to ACKTTY, so that the
// host knows what was acknowledged even when the VM's power is cut. At
// the end it prints "acked K".
//
//	vm3guest verify DEV NODE EPOCH START LEN BLOCK ACKED
//
// reads the region back with O_DIRECT and checks every sector
// (vm3pattern.Region.Check); prints "verified N sectors" or the first
// problems and exits 1.
package main

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/mdcluster/mdcluster/vmtest/vm3pattern"
)

func main() {
	var err error
	switch {
	case len(os.Args) == 3 && os.Args[1] == "agent":
		err = agent(os.Args[2])
	case len(os.Args) == 10 && os.Args[1] == "write":
		err = write(os.Args[2:])
	case len(os.Args) == 9 && os.Args[1] == "verify":
		err = verify(os.Args[2:])
	default:
		err = errors.New("usage: vm3guest agent TTY | write DEV NODE EPOCH START LEN BLOCK ACKTTY STOPFILE | verify DEV NODE EPOCH START LEN BLOCK ACKED")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "vm3guest:", err)
		os.Exit(1)
	}
}

// raw puts the terminal fd in raw mode: no echo, no line editing, no
// newline translation, so that the host reads exactly what was written.
func raw(fd int) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return err
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB | unix.CBAUD
	t.Cflag |= unix.CS8 | unix.B115200
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
	return unix.IoctlSetTermios(fd, unix.TCSETS, t)
}

func agent(tty string) error {
	f, err := os.OpenFile(tty, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	if err := raw(int(f.Fd())); err != nil {
		return fmt.Errorf("%s: raw mode: %w", tty, err)
	}
	fmt.Fprintf(f, "\n@@READY\n")
	r := bufio.NewReaderSize(f, 1<<16)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		id := fields[0]
		switch {
		case fields[1] == "T":
			fmt.Fprintf(f, "@@T %s %d\n", id, time.Now().UnixNano())
		case fields[1] == "S" && len(fields) == 3:
			ns, err := strconv.ParseInt(fields[2], 10, 64)
			if err == nil {
				tv := unix.NsecToTimeval(ns)
				err = unix.Settimeofday(&tv)
			}
			fmt.Fprintf(f, "@@S %s %v\n", id, err)
		case fields[1] == "C" && len(fields) == 3:
			cmd, err := base64.StdEncoding.DecodeString(fields[2])
			if err != nil {
				fmt.Fprintf(f, "@@R %s 255 0 0 %s\n", id, base64.StdEncoding.EncodeToString([]byte(err.Error())))
				continue
			}
			var out bytes.Buffer
			c := exec.Command("/bin/sh", "-c", string(cmd))
			c.Stdout, c.Stderr = &out, &out
			start := time.Now()
			err = c.Run()
			end := time.Now()
			code := 0
			if err != nil {
				code = 255
				var ee *exec.ExitError
				if errors.As(err, &ee) && ee.ExitCode() >= 0 {
					code = ee.ExitCode()
				} else {
					fmt.Fprintf(&out, "\nagent: %v", err)
				}
			}
			fmt.Fprintf(f, "@@R %s %d %d %d %s\n", id, code, start.UnixNano(), end.UnixNano(), base64.StdEncoding.EncodeToString(out.Bytes()))
		}
	}
}

// alignedBuf returns n bytes aligned for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+vm3pattern.Sector)
	off := int(uintptr(unsafe.Pointer(&b[0])) & (vm3pattern.Sector - 1))
	if off != 0 {
		off = vm3pattern.Sector - off
	}
	return b[off : off+n]
}

func region(a []string) (dev string, r vm3pattern.Region, err error) {
	var v [5]uint64
	for i := range v {
		if v[i], err = strconv.ParseUint(a[i+1], 0, 64); err != nil {
			return "", r, fmt.Errorf("argument %d: %w", i+2, err)
		}
	}
	r = vm3pattern.Region{Node: uint32(v[0]), Epoch: uint32(v[1]), Start: v[2], Len: v[3], Block: v[4]}
	if r.Block == 0 || r.Block%vm3pattern.Sector != 0 || r.Len%r.Block != 0 || r.Start%vm3pattern.Sector != 0 {
		return "", r, fmt.Errorf("region %+v: block must be a multiple of %d dividing the length", r, vm3pattern.Sector)
	}
	return a[0], r, nil
}

func write(a []string) error {
	dev, r, err := region(a[:6])
	if err != nil {
		return err
	}
	ackPath, stop := a[6], a[7]
	f, err := os.OpenFile(dev, os.O_WRONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	ack, err := os.OpenFile(ackPath, os.O_WRONLY|unix.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	if err := raw(int(ack.Fd())); err != nil {
		// Not a terminal (a file): fine.
		_ = err
	}
	buf := alignedBuf(int(r.Block))
	n := r.Blocks()
	var k uint64
	for ; ; k++ {
		if k%16 == 0 {
			if _, err := os.Stat(stop); err == nil {
				break
			}
		}
		blk, pass := k%n, k/n
		off := r.Start + blk*r.Block
		for s := uint64(0); s < r.Block; s += vm3pattern.Sector {
			vm3pattern.Fill(buf[s:s+vm3pattern.Sector], vm3pattern.Stamp{Node: r.Node, Epoch: r.Epoch, Offset: off + s, Pass: pass})
		}
		if _, err := f.WriteAt(buf, int64(off)); err != nil {
			fmt.Printf("acked %d\n", k)
			return fmt.Errorf("write %d at %d: %w", k, off, err)
		}
		fmt.Fprintf(ack, "A %d %d %d\n", r.Node, r.Epoch, k+1)
	}
	fmt.Printf("acked %d\n", k)
	return nil
}

func verify(a []string) error {
	dev, r, err := region(a[:6])
	if err != nil {
		return err
	}
	acked, err := strconv.ParseUint(a[6], 10, 64)
	if err != nil {
		return err
	}
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	const chunk = 1 << 20
	buf := alignedBuf(chunk)
	var bad []error
	sectors := 0
	for off := r.Start; off < r.Start+r.Len; off += chunk {
		b := buf[:min(chunk, r.Start+r.Len-off)]
		if _, err := f.ReadAt(b, int64(off)); err != nil {
			return fmt.Errorf("read at %d: %w", off, err)
		}
		for s := 0; s < len(b); s += vm3pattern.Sector {
			sectors++
			if err := r.Check(b[s:s+vm3pattern.Sector], off+uint64(s), acked); err != nil {
				bad = append(bad, err)
			}
		}
	}
	if len(bad) > 0 {
		for _, e := range bad[:min(len(bad), 10)] {
			fmt.Println("BAD", e)
		}
		return fmt.Errorf("%d of %d sectors wrong", len(bad), sectors)
	}
	fmt.Printf("verified %d sectors\n", sectors)
	return nil
}
