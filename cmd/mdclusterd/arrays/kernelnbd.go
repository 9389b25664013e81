package arrays

import (
	"fmt"
	"path/filepath"
	"time"

	"github.com/mdcluster/mdcluster/bitmap"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd"
	"github.com/mdcluster/mdcluster/mdcluster/export/nbd/kernel"
)

// kernelNBDTimeout is the kernel client's request timeout for an attached
// export: a request the daemon does not answer within it fails with EIO
// instead of hanging (the kernel's default on one socket is to wait
// forever).
const kernelNBDTimeout = 60 * time.Second

// nbdDeviceFor returns the /dev/nbdN configured for the array
// ([[array]] export.nbd_device), or "".
func (l *Layer) nbdDeviceFor(u [16]byte, md string) string {
	name := shortName(l.nameOf(u), "")
	for _, c := range l.env.Config.Arrays {
		if c.UUID != "" {
			if cu, err := parseUUID(c.UUID); err == nil && cu == u {
				return c.NBDDevice
			}
		} else if c.Name != "" && (c.Name == name || c.Name == filepath.Base(md)) {
			return c.NBDDevice
		}
	}
	return ""
}

// attachKernel attaches the array's export to the kernel's NBD client as
// the configured device, if one is configured.
func (l *Layer) attachKernel(a *arr, srv *nbd.Server, export, md string) (*kernel.Attachment, error) {
	dev := l.nbdDeviceFor(a.uuid, md)
	if dev == "" {
		return nil, nil
	}
	n, err := kernel.ParseDevice(dev)
	if err != nil {
		return nil, err
	}
	at, err := kernel.Attach(srv, export, kernel.Options{Index: n, Timeout: kernelNBDTimeout,
		BackendID: "mdcluster " + bitmap.FormatUUID(a.uuid)})
	if err != nil {
		return nil, fmt.Errorf("export %s as %s: %w", md, dev, err)
	}
	if at.QueueErr != nil {
		l.log.Warn("kernel NBD device attached with the driver's queue settings: it works, but large writes are split", "array", md, "device", at.Device, "err", at.QueueErr)
	}
	l.log.Info("array attached to the kernel NBD client", "array", md, "device", at.Device)
	return at, nil
}
