//go:build !race

package sim

// defaultSeeds is how many random seeds TestRandom runs by default.
const defaultSeeds = 2000

// raceBuild reports whether the race detector is on: coverage tests that
// only repeat what TestRandom runs skip themselves under it.
const raceBuild = false
