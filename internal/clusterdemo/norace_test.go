//go:build !race

package clusterdemo

const raceEnabled = false
