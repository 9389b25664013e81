// Package vmtest runs mdcluster against real Linux md inside a QEMU virtual
// machine: Debian's own kernel, booted under TCG with a small initramfs that
// holds busybox, Debian's mdadm, the project's binaries and the kernel
// modules they need (md, raid1, raid10, loop, virtio block).
//
// The package holds the pieces every VM test needs:
//
//   - Kernel fetches Debian's current linux-image-amd64 kernel with apt-get,
//     once, into a cache directory, keeping only the kernel image and the
//     modules asked for (and the modules they depend on).
//   - Initramfs builds an uncompressed newc cpio archive from files,
//     host binaries (with the shared libraries ldd lists for them) and an
//     /init script.
//   - Boot starts the machine with github.com/anatol/vmtest, waits for the
//     guest's result line and hands back what the guest wrote to its output
//     disk, a tar archive on /dev/vda.
//
// The tests themselves (examine_test.go) have real mdadm create arrays and
// compare `mdadm-go -E` / `-X` with real mdadm's output for every member.
// See docs/vmtest.md.
package vmtest
