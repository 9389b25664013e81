// Package raid is the RAID engine of mdcluster: raid1 and raid10 (md's
// near, far and offset layouts) over member devices, keeping Linux md's
// on-disk placement so the kernel's md driver can read the arrays we
// write.
//
// Geometry maps array byte ranges to the copies md keeps on the members;
// it is a pure value, tested against layouts worked by hand from md's
// documentation and, in vmtest, against arrays the real kernel wrote.
package raid
