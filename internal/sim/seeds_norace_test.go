//go:build !race

package sim

// defaultSeeds is how many random seeds TestRandom runs by default.
const defaultSeeds = 2000
