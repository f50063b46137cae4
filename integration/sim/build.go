package sim

import "kmesh.dev/kmesh/integration/daemonproc"

// BuildDaemon builds kmesh-daemon from this module into dir (tests run it
// as a real process on every simulated node).
func BuildDaemon(dir string) (string, error) { return daemonproc.Build(dir) }
