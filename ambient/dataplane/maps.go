package dataplane

import (
	"net/netip"

	"kmesh.dev/kmesh/bpf"
)

// Maps is the kernel state the dataplane writes: *bpf.Maps in the daemon,
// bpftest.Maps (in memory, with injectable faults) in tests that need no
// root. Writes replace or delete whole elements; a batch that fails may have
// written the elements before the failure, as the kernel's batch operations
// do, and the dataplane undoes them.
type Maps interface {
	SetManaged(netnsCookie uint64, backendID uint32) error
	DeleteManaged(netnsCookie uint64) error
	Managed() (map[uint64]uint32, error)

	UpsertFrontends([]bpf.Frontend) error
	DeleteFrontends([]bpf.FrontendKey) error
	Frontends() ([]bpf.Frontend, error)

	PutServices([]bpf.Service) error
	DeleteServices([]uint32) error
	Services() ([]bpf.Service, error)

	PutEndpoints([]bpf.Endpoint) error
	DeleteEndpoints([]bpf.EndpointKey) error
	Endpoints() ([]bpf.Endpoint, error)

	PutBackends([]bpf.Backend) error
	DeleteBackends([]uint32) error
	Backends() ([]bpf.Backend, error)

	PutAuthz([]bpf.Authz) error
	DeleteAuthz([]bpf.AuthzKey) error
	Authz() ([]bpf.Authz, error)

	PutVIPs(map[netip.Addr]uint32) error
	DeleteVIPs([]netip.Addr) error
	VIPs() (map[netip.Addr]uint32, error)
}

var _ Maps = (*bpf.Maps)(nil)
