package xds

import "strconv"

// versionMap holds the versions of the resources of one type the client
// applied, for initial_resource_versions on reconnect. It is as large as
// the mesh, so versions are kept as istiod writes them, when they are: the
// lowercase hex of a 64-bit hash (8 bytes in the map instead of a string).
type versionMap struct {
	hashed map[string]uint64
	other  map[string]string
}

// version is one resource's version: the hash, or other when not one.
type version struct {
	hash   uint64
	other  string
	hashed bool
}

// parseHash reads a version written as strconv.FormatUint(h, 16): lowercase
// hex digits, no leading zero, at most 16 of them.
func parseHash(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 16 || (b[0] == '0' && len(b) > 1) {
		return 0, false
	}
	var h uint64
	for _, c := range b {
		switch {
		case c >= '0' && c <= '9':
			h = h<<4 | uint64(c-'0')
		case c >= 'a' && c <= 'f':
			h = h<<4 | uint64(c-'a'+10)
		default:
			return 0, false
		}
	}
	return h, true
}

func (m *versionMap) get(name string) (version, bool) {
	if h, ok := m.hashed[name]; ok {
		return version{hash: h, hashed: true}, true
	}
	if s, ok := m.other[name]; ok {
		return version{other: s}, true
	}
	return version{}, false
}

// set records a resource's version and returns the one it replaces.
func (m *versionMap) set(name string, v []byte) (prev version, existed bool) {
	prev, existed = m.get(name)
	if h, ok := parseHash(v); ok {
		m.restore(name, version{hash: h, hashed: true})
	} else {
		m.restore(name, version{other: string(v)})
	}
	return prev, existed
}

// restore records a version as it was.
func (m *versionMap) restore(name string, v version) {
	if v.hashed {
		delete(m.other, name)
		if m.hashed == nil {
			m.hashed = map[string]uint64{}
		}
		m.hashed[name] = v.hash
		return
	}
	delete(m.hashed, name)
	if m.other == nil {
		m.other = map[string]string{}
	}
	m.other[name] = v.other
}

func (m *versionMap) delete(name string) {
	delete(m.hashed, name)
	delete(m.other, name)
}

func (m *versionMap) len() int { return len(m.hashed) + len(m.other) }

// all returns every version as istiod wrote it.
func (m *versionMap) all() map[string]string {
	out := make(map[string]string, m.len())
	for n, h := range m.hashed {
		out[n] = strconv.FormatUint(h, 16)
	}
	for n, s := range m.other {
		out[n] = s
	}
	return out
}
