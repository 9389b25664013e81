// Package fuzzcap bounds how long go's fuzzer spends minimising inputs, for
// packages whose fuzz targets take larger inputs (disk headers).
//
// The fuzzer's default, 60 s per new interesting input, is spent with the
// worker fuzzing nothing: minimisation is quadratic in the input length, and
// an input of a few hundred bytes that cannot be shortened takes 10-20 s on
// a small machine, so with two workers the exec rate sits at 0/sec for long
// stretches. Crashers are minimised the same way; a bounded minimisation
// still cuts the tail and single bytes first.
package fuzzcap

import (
	"flag"
	"os"
	"testing"
)

// Main is a TestMain: it sets -test.fuzzminimizetime to 2s unless the flag
// was given, then runs the tests.
func Main(m *testing.M) {
	flag.Parse()
	given := false
	flag.Visit(func(f *flag.Flag) { given = given || f.Name == "test.fuzzminimizetime" })
	if !given {
		if err := flag.Set("test.fuzzminimizetime", "2s"); err != nil {
			panic(err)
		}
	}
	os.Exit(m.Run())
}
