package nbd_test

import (
	"errors"
	"log"
	"os"
	"os/signal"

	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
)

// Serve a disk image on a unix socket until interrupted; then, for example,
// nbdinfo 'nbd+unix:///disk?socket=/tmp/nbd.sock'.
func ExampleServer() {
	disk, err := nbd.OpenFile("/var/tmp/disk.img", false)
	if err != nil {
		log.Fatal(err)
	}
	defer disk.Close()
	srv, err := nbd.NewServer(nbd.Config{Exports: []nbd.Export{
		{Name: "disk", Description: "a disk image", Backend: disk},
	}})
	if err != nil {
		log.Fatal(err)
	}
	l, err := nbd.ListenUnix("/tmp/nbd.sock")
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, os.Interrupt)
		<-stop
		srv.Close() // drains requests in flight, flushes, disconnects
	}()
	if err := srv.Serve(l); !errors.Is(err, nbd.ErrServerClosed) {
		log.Fatal(err)
	}
}
