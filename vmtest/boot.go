package vmtest

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	qemu "github.com/anatol/vmtest"
)

// ResultMarker starts the line the guest prints when it has written its
// output disk and is about to power off; the word after it is its verdict.
const ResultMarker = "VMTEST-RESULT:"

// resultRE needs the line's newline, so that a line still arriving is
// never matched half-way.
var resultRE = regexp.MustCompile(regexp.QuoteMeta(ResultMarker) + ` (\w+)\r?\n`)

// BootOptions describes one VM run.
type BootOptions struct {
	Kernel    *Kernel
	Initramfs string        // path of the cpio archive
	WorkDir   string        // where the output disk image is created
	OutSize   int64         // size of the output disk, bytes (default 16 MiB)
	MemoryMiB int           // guest memory (default 512)
	CPUs      int           // virtual CPUs (default 1); more than one runs TCG multi-threaded
	Timeout   time.Duration // the VM's whole lifetime; QEMU is killed after it
	Append    []string      // extra kernel command line
	Verbose   bool          // copy the console to stdout
	// ConsoleLog, if set, is a file that receives the guest's second
	// serial port (ttyS1), where a Guest with ConsoleCopy copies its log
	// as it goes: the console of a guest that hangs before saving /out.
	ConsoleLog string
	// Disks are raw image files attached after the output disk, in order,
	// as virtio-blk devices with the host's page cache bypassed
	// (cache=none, aio=threads): the guest sees /dev/vdb, /dev/vdc, …
	// behaving like real disks rather than like host memory. The files
	// must live on a file system that allows O_DIRECT (not tmpfs).
	Disks []string
}

// Boot starts the VM under TCG with an empty raw output disk as the first
// virtio block device (/dev/vda in the guest), waits for the guest's
// result line and for QEMU to exit, and returns the verdict word and the
// files of the tar archive the guest wrote to /dev/vda. When the result
// line never came, the error comes with whatever archive the disk holds.
func Boot(o BootOptions) (verdict string, files map[string][]byte, err error) {
	if o.OutSize == 0 {
		o.OutSize = 16 << 20
	}
	if o.MemoryMiB == 0 {
		o.MemoryMiB = 512
	}
	if o.CPUs == 0 {
		o.CPUs = 1
	}
	out := filepath.Join(o.WorkDir, "out.img")
	f, err := os.Create(out)
	if err != nil {
		return "", nil, fmt.Errorf("output disk: %w", err)
	}
	if err := f.Truncate(o.OutSize); err != nil {
		f.Close()
		return "", nil, fmt.Errorf("output disk: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", nil, fmt.Errorf("output disk: %w", err)
	}
	params := []string{
		"-accel", "tcg", // KVM is not usable on the machines this runs on
		"-m", fmt.Sprint(o.MemoryMiB),
		"-smp", fmt.Sprint(o.CPUs),
		"-drive", "file=" + strings.ReplaceAll(out, ",", ",,") + ",if=virtio,format=raw",
	}
	for i, d := range o.Disks {
		id := fmt.Sprintf("disk%d", i)
		params = append(params,
			"-drive", "file="+strings.ReplaceAll(d, ",", ",,")+",if=none,id="+id+",format=raw,cache=none,aio=threads",
			// Slots far above the ones QEMU gives out on its own, so
			// that the output disk is probed first and stays /dev/vda.
			"-device", fmt.Sprintf("virtio-blk-pci,drive=%s,addr=0x%x", id, 0x10+i))
	}
	if o.ConsoleLog != "" {
		params = append(params, "-serial", "file:"+o.ConsoleLog)
	}
	vm, err := qemu.NewQemu(&qemu.QemuOptions{
		OperatingSystem: qemu.OS_LINUX,
		Kernel:          o.Kernel.Image,
		InitRamFs:       o.Initramfs,
		// panic=-1: a guest that panics reboots at once, and -no-reboot
		// (always set by vmtest) turns that into QEMU exiting.
		Append:  append([]string{"panic=-1", "quiet"}, o.Append...),
		Params:  params,
		Timeout: o.Timeout,
		Verbose: o.Verbose,
	})
	if err != nil {
		return "", nil, fmt.Errorf("starting QEMU: %w", err)
	}
	m, err := vm.ConsoleExpectRE(resultRE)
	// The guest powers itself off after the result line; Shutdown only
	// waits for that (or asks ACPI when the guest died another way).
	vm.Shutdown()
	if err != nil {
		// Whatever the guest managed to save is still worth having
		// (files is nil when it wrote nothing).
		files, _ = readTar(out)
		if errors.Is(err, io.EOF) {
			return "", files, fmt.Errorf("the VM stopped (or hit its %v timeout) before printing %s; run with -v to see its console", o.Timeout, ResultMarker)
		}
		return "", files, fmt.Errorf("waiting for %s: %w", ResultMarker, err)
	}
	files, err = readTar(out)
	if err != nil {
		return m[0], nil, fmt.Errorf("reading the guest's output disk: %w", err)
	}
	return m[0], files, nil
}

// readTar reads every regular file of the tar archive at the start of the
// image at path.
func readTar(path string) (map[string][]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	files := map[string][]byte{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		if h.Typeflag != tar.TypeReg {
			continue
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", h.Name, err)
		}
		files[strings.TrimPrefix(h.Name, "./")] = b
	}
	if len(files) == 0 {
		return nil, errors.New("no files (did the guest write its tar archive?)")
	}
	return files, nil
}
