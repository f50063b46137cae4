//go:build race

package tunnel

// raceEnabled: the race detector allocates on its own and makes
// sync.Pool drop items at random, so allocation counts mean nothing.
const raceEnabled = true
