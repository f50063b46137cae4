/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every Kmesh map, defined once. Sizes here are defaults: the loader sets
 * max_entries from configuration and pins each map under
 * /sys/fs/bpf/kmesh/v<layout>/ so that a restarted daemon reuses it.
 * Configuration maps are BPF_F_NO_PREALLOC: an update replaces an element
 * under RCU, but since Linux 6.1 freed memory can be reused at once, so a
 * value copied during a concurrent update may belong to another key. The
 * programs copy right after each lookup; a scheme correct on 6.1+ is open
 * work (see ARCHITECTURE.md, Maps). */
#ifndef KMESH_MAPS_H
#define KMESH_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "kmesh_abi.h"
#include "kmesh_consts.h"

/* Network namespaces (by cookie) of pods enrolled on this node; nothing else is touched. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct managed_value);
} kmesh_managed SEC(".maps");

/* Service VIP:port/proto and workload IP/proto -> what they are. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct frontend_key);
	__type(value, struct frontend_value);
} kmesh_frontend SEC(".maps");

/* Service id -> endpoint counts per family and rank, live generation. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct service_value);
} kmesh_service SEC(".maps");

/* (service, generation, family, rank, slot) -> alias-table slot. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_value);
} kmesh_endpoint SEC(".maps");

/* Backend (workload) id -> addresses, identity and flags. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u32);
	__type(value, struct backend_value);
} kmesh_backend SEC(".maps");

/* Original destination of each redirected socket; freed with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_orig);
} kmesh_sock_orig SEC(".maps");

/* Tunnelled connections by client address, written by sockops when the
 * client's connect completes, read (and deleted) by the node proxy when it
 * accepts. LRU: an entry the proxy never collects ages out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tunnel_key);
	__type(value, struct tunnel_value);
} kmesh_tunnel SEC(".maps");

/* Unconnected UDP: backend chosen per (socket cookie, VIP:port). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_key);
	__type(value, struct udp_fwd_value);
} kmesh_udp_fwd SEC(".maps");

/* Unconnected UDP: (socket cookie, backend:port) -> VIP:port for recvmsg. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_key);
	__type(value, struct udp_rev_value);
} kmesh_udp_rev SEC(".maps");

/* Each enrolled pod's plaintext inbound listener (the node proxy's 15006),
 * by the pod's addresses: where kmesh_inbound (sk_lookup.c) steers
 * connections that policies must see (kmesh_inproxy). A socket leaves the map when it is
 * closed, so a pod whose proxy is gone has no entry. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 8192);
	__type(key, struct inbound_key);
	__type(value, __u64);
} kmesh_inproxy SEC(".maps");

/* Per-CPU event counters, indexed by enum kmesh_stat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} kmesh_stats SEC(".maps");

#endif
