// Command nbdmem attaches a memory export of our NBD server to the kernel
// NBD client and keeps it attached until SIGTERM. The side-by-side
// benchmark (docs/vmtest.md) runs the same fio jobs on it as on the
// array's /dev/nbdN: the difference is what the RAID engine and the disks
// cost, the rest is the NBD path (kernel client, socket, server).
//
// Usage: nbdmem /dev/nbdN SIZE_MIB
package main

import (
	"fmt"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd/kernel"
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: nbdmem /dev/nbdN SIZE_MIB")
		os.Exit(2)
	}
	idx, err := kernel.ParseDevice(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, "nbdmem:", err)
		os.Exit(2)
	}
	mib, err := strconv.Atoi(os.Args[2])
	if err != nil || mib < 1 || mib > 4096 {
		fmt.Fprintf(os.Stderr, "nbdmem: size %q: want 1 to 4096 MiB\n", os.Args[2])
		os.Exit(2)
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	srv, err := nbd.NewServer(nbd.Config{Exports: []nbd.Export{{Name: "mem", Backend: nbd.NewMemBackend(int64(mib) << 20)}}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "nbdmem:", err)
		os.Exit(1)
	}
	// The daemon's timeout, and its defaults for the rest.
	at, err := kernel.Attach(srv, "mem", kernel.Options{Index: idx, Timeout: 60 * time.Second, BackendID: "nbdmem"})
	if err != nil {
		fmt.Fprintln(os.Stderr, "nbdmem:", err)
		os.Exit(1)
	}
	if at.QueueErr != nil {
		fmt.Fprintln(os.Stderr, "nbdmem: queue settings:", at.QueueErr)
	}
	fmt.Printf("nbdmem: %s attached (%d MiB)\n", at.Device, mib)
	<-sigs
	if err := at.Detach(); err != nil {
		fmt.Fprintln(os.Stderr, "nbdmem: detach:", err)
	}
	srv.Close()
}
