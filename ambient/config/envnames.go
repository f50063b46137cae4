package config

// EnvNames returns the environment variable of every setting, in the order
// of the settings table: the names the daemon reads (ztunnel's where
// ztunnel has one, KMESH_* otherwise). Install tests use it to check that a
// manifest sets no variable the daemon would ignore.
func EnvNames() []string {
	names := make([]string, len(settings))
	for i, s := range settings {
		names[i] = s.env
	}
	return names
}
