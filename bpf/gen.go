// Package bpf owns Kmesh's kernel programs and maps: the C sources in this
// folder, the Go that bpf2go generates from them (committed, so that a
// checkout builds without clang), and the typed API through which the rest
// of Kmesh reads and writes maps. Nothing outside this package touches an
// *ebpf.Map.
package bpf

// One object per attach family. -target bpfel: the programs use no
// architecture-specific context (no pt_regs), so one little-endian object
// serves amd64 and arm64 alike. -mcpu=v3 needs kernel >= 5.1, far below what
// the helpers used here need (see kernel/probe.go). Every map is defined once
// (include/kmesh_maps.h) and created once, by the sock_addr load; the other
// objects are loaded with those maps substituted, so the Go types of the
// shared structs come from the sockAddr generation only.
//go:generate sh -c "go tool bpf2go -tags linux -cc clang -target bpfel -type managed_value -type frontend_key -type frontend_value -type service_value -type endpoint_key -type endpoint_value -type backend_value -type sock_orig -type tunnel_key -type tunnel_value -type udp_slot -type udp_affinity -type inbound_key -type authz_key -type authz_value -type authed_key -type dns_config -type splice_key -type vip_key -type vip_value -type sidecar_key -type sidecar_value -type orig_dst sockAddr sock_addr.c -- -mcpu=v3 -Wall -Werror -I./include -I/usr/include/$(uname -m)-linux-gnu"
//go:generate sh -c "go tool bpf2go -tags linux -cc clang -target bpfel -type conn_event sockOps sockops.c -- -mcpu=v3 -Wall -Werror -I./include -I/usr/include/$(uname -m)-linux-gnu"
//go:generate sh -c "go tool bpf2go -tags linux -cc clang -target bpfel skLookup sk_lookup.c -- -mcpu=v3 -Wall -Werror -I./include -I/usr/include/$(uname -m)-linux-gnu"
//go:generate sh -c "go tool bpf2go -tags linux -cc clang -target bpfel skMsg sk_msg.c -- -mcpu=v3 -Wall -Werror -I./include -I/usr/include/$(uname -m)-linux-gnu"
