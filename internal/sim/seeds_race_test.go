//go:build race

package sim

// defaultSeeds is how many random seeds TestRandom runs by default under the
// race detector, which slows the simulation about tenfold (the simulation
// is single-threaded; the race run is there for the code it calls).
const defaultSeeds = 200

// raceBuild reports whether the race detector is on: coverage tests that
// only repeat what TestRandom runs skip themselves under it.
const raceBuild = true
