package kernel

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// DefaultMaxRequestKiB is the largest request Attach lets the block layer
// send to the server in one piece, unless Options.MaxRequestKiB says
// otherwise. The nbd driver starts every device at 128 KiB
// (max_sectors_kb), so a 1 MiB O_DIRECT write reaches the server as eight
// requests, each a round trip through the socket and the engine, where md
// sends one 1 MiB write to each mirror; 4 MiB keeps the common large
// writes whole while bounding what one request pins in the server (its
// MaxInFlightBytes budget is far larger).
const DefaultMaxRequestKiB = 4096

// sysBlock is where the block devices' sysfs directories are; a variable
// so that tests can point it at a temporary directory.
var sysBlock = "/sys/block"

// tuneQueue applies the queue settings of o to /sys/block/nbdN/queue: the
// largest request (max_sectors_kb, capped by max_hw_sectors_kb) and the
// I/O scheduler "none". The server takes requests in the order they come
// and the engine has nothing to gain from the kernel sorting or merging
// them a second time behind md's back; mq-deadline, the kernel's default
// for a single-queue device, costs CPU per request for no benefit here.
// Every setting is tried; the error joins those that failed.
func tuneQueue(idx int, o Options) error {
	if o.KeepQueue {
		return nil
	}
	q := fmt.Sprintf("%s/nbd%d/queue/", sysBlock, idx)
	var errs []error
	kib := o.MaxRequestKiB
	if kib == 0 {
		kib = DefaultMaxRequestKiB
	}
	if b, err := os.ReadFile(q + "max_hw_sectors_kb"); err == nil {
		if hw, perr := strconv.Atoi(strings.TrimSpace(string(b))); perr == nil && hw > 0 && kib > hw {
			kib = hw
		}
	}
	if err := os.WriteFile(q+"max_sectors_kb", []byte(strconv.Itoa(kib)), 0); err != nil {
		errs = append(errs, fmt.Errorf("nbd%d: max request %d KiB: %w", idx, kib, err))
	}
	if err := os.WriteFile(q+"scheduler", []byte("none"), 0); err != nil {
		errs = append(errs, fmt.Errorf("nbd%d: scheduler none: %w", idx, err))
	}
	return errors.Join(errs...)
}
