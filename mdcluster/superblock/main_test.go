package superblock_test

import (
	"flag"
	"os"
	"testing"
)

// TestMain bounds the time go's fuzzer spends minimising each new
// interesting input to 2s unless -test.fuzzminimizetime is given. The
// default, 60s, is spent with the worker fuzzing nothing: the minimiser is
// quadratic in the input length and an input of a few hundred bytes that
// cannot be shortened takes 10-20s here, so with two workers the exec
// rate sat at 0/sec for long stretches. Crashers are minimised the same
// way; a bounded minimisation still cuts the tail and single bytes first.
func TestMain(m *testing.M) {
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
