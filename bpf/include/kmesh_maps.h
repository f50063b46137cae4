/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every Kmesh map, defined once. Sizes here are defaults: the loader sets
 * max_entries from configuration and pins each map under
 * /sys/fs/bpf/kmesh/v<layout>/ so that a restarted daemon reuses it.
 *
 * Element reuse. User space replaces a hash element by writing the key
 * again: htab_map_update_elem() (kernel/bpf/hashtab.c) links a new element
 * and unlinks the old one under the bucket lock, and for a
 * BPF_F_NO_PREALLOC map then hands the old one to free_htab_elem() ->
 * htab_elem_free() -> bpf_mem_cache_free(); htab_map_delete_elem() does the
 * same. Since Linux 6.1 that is the BPF memory allocator (kernel/bpf/
 * memalloc.c): unit_free() pushes the element onto the current CPU's
 * free_llist and unit_alloc() pops from it, so the next element allocated on
 * that CPU (the next insert or replacement of any key of the map) is the one
 * just freed, no grace period in between. The memory goes back to the slab
 * only after an RCU tasks-trace grace period (free_bulk() ->
 * do_call_rcu_ttrace()), so a program's pointer into a value never points
 * outside this map's elements -- but the element may meanwhile hold another
 * key's value. Preallocation would not help: alloc_htab_elem() parks a
 * replaced element in the CPU's extra_elems for the next replacement, and a
 * deleted one goes on pcpu_freelist for the next insert. alloc_htab_elem()
 * fills a reused element with plain stores (memcpy of the key, then
 * copy_map_value() of the value) before linking it.
 *
 * So every value the connect decision reads -- frontend, service, endpoint
 * slot, backend -- begins with the identity of the key it is stored under
 * (kmesh_abi.h), and the programs read such a value in one way only
 * (kmesh_lb.h: frontend_read, service_read, endpoint_read, backend_read):
 * copy the fields they use with volatile loads, then, after a compiler
 * barrier, load the identity and compare it with the key they looked up. A
 * mismatch means "changed under us": the decision is retried once from the
 * start, then refused, as for a generation retired under a lookup.
 *
 * What that guarantees, for each record the decision uses:
 *  - reuse that finished before the copy began is always caught: the
 *    identity is then another key's (a reuse for the same key is a newer
 *    version of that key, which is as good as the one looked up);
 *  - reuse that begins after the identity load changes nothing we read;
 *  - reuse whose stores land during the copy itself (a few instructions,
 *    nanoseconds): the identity is the value's first member, so a forward
 *    copy writes it first; where stores become visible in program order
 *    (x86-64 with plain moves) seeing any field of the new value implies
 *    seeing its identity, and the mismatch is caught. Where they need not
 *    (x86 fast-string `rep movsb` copies, arm64) a value torn between two
 *    keys can pass in that window. This is the residual risk, and the only
 *    one: outside those nanoseconds the check is exact.
 * A record that passes may still be an older version of its key (the
 * element was unlinked, not yet reused): that is RCU's ordinary guarantee,
 * and user space never hands an id to another object while a record points
 * at it (ambient/dataplane).
 *
 * Not covered: kmesh_managed is only tested for presence (no value read);
 * kmesh_tunnel (LRU, preallocated, reused the same way) is written by
 * sockops and taken by the node proxy, which refuses a record whose backend
 * it does not know as a mesh workload. Socket storage (kmesh_sock_orig,
 * kmesh_udp) is reachable only from its own live socket and freed with it. */
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

/* Unconnected UDP: per socket, the backend chosen for each VIP it sends to
 * and what replies are reported as coming from; freed with the socket. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct udp_affinity);
} kmesh_udp SEC(".maps");

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

/* The node proxy's own sockets, marked by the daemon (a map update keyed by
 * the socket's fd) before they connect from inside a pod: the connect
 * programs leave them alone. A pod cannot write here, unlike SO_MARK, which
 * any pod with NET_ADMIN can set on its sockets to bypass the tunnel. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} kmesh_proxy_sk SEC(".maps");

/* DNS capture switch and port (struct dns_config, one element). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct dns_config);
} kmesh_dns SEC(".maps");

/* Kernel-path connection events (struct conn_event) for the daemon's
 * telemetry: opened and closed, never per packet. Pinned like every map, so
 * a restarting daemon reads what closed while it was away; when full, the
 * event is dropped and counted (STAT_CONN_EVENT_DROP), the connection never
 * waits. The loader sets the size from configuration. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} kmesh_events SEC(".maps");

/* Same-node authorization in the kernel: (destination, source, family) ->
 * the destination's policies' verdict for that source (struct authz_value).
 * Read by the connect programs for destinations whose verdict is PATH_AUTHZ;
 * a pair without an entry takes the tunnel, which evaluates the policies. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct authz_key);
	__type(value, struct authz_value);
} kmesh_authz SEC(".maps");

/* Service VIPs that are no address of anything (kmesh_abi.h vip_key): a
 * connect or send to one on a port no frontend names is refused. Written by
 * user space; an absent entry leaves such a destination untouched, as before
 * this map existed. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct vip_key);
	__type(value, struct vip_value);
} kmesh_vip SEC(".maps");

/* Connections the connect program authorized (PATH_AUTHZ allowed), by their
 * 4-tuple, written by sockops before the SYN leaves, read by kmesh_inbound
 * at the destination so that they are not steered to 15006 (which has no
 * identity to authorize them with). Only programs write it; LRU: entries age
 * out. The value is the source's backend id (for dumps). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct authed_key);
	__type(value, __u32);
} kmesh_authed SEC(".maps");

/* Spliced connection ends (sockops.c inserts, sk_msg.c redirects to the
 * peer). An entry leaves with its socket. Full: the connection stays on
 * plain TCP, counted (STAT_SPLICE_FULL). The loader sets the size. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct splice_key);
	__type(value, __u64);
} kmesh_splice SEC(".maps");

/* Per spliced socket: SPLICE_* (what its sends do), decided once. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u32);
} kmesh_splice_sk SEC(".maps");

/* Per spliced socket: the bytes sk_msg redirected from it (its budget's
 * count). Linux 6.18 queues a redirected send at the peer without charging
 * it to the peer's receive buffer, so a writer whose reader is slower never
 * blocks: the queue grows until the node's TCP memory limit, then writes
 * fail with ENOMEM (TestPrivilegedSplice, "no backpressure"). What a reader
 * has consumed is invisible to these program types (the read hook would be
 * a tracing program, refused under kernel lockdown), so each direction may
 * redirect cfg_splice_budget bytes in all and then goes to TCP, whose flow
 * control bounds the rest. Created by sockops with the socket's insertion. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} kmesh_splice_sent SEC(".maps");

/* Telemetry of spliced bytes, which TCP never sees (bytes_acked and
 * bytes_received miss them); only for the sockets telemetry reports (the
 * kernel path's). kmesh_splice_tx: per socket, the bytes sk_msg redirected
 * from it, in its own storage (created by sockops when it inserts the
 * socket). kmesh_splice_rx: the bytes redirected into a socket, by the
 * socket's kmesh_splice key (sk_msg knows the receiver only by that key);
 * sockops resets the entry when the socket is inserted and takes it for the
 * close event. LRU: an entry whose close event was never queued ages out.
 * The loader sizes it as kmesh_splice. */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} kmesh_splice_tx SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct splice_key);
	__type(value, __u64);
} kmesh_splice_rx SEC(".maps");

/* Network namespaces opted into splicing one by one (pods that keep an
 * Istio sidecar: their in-pod legs; or enrolled pods while cfg_splice is
 * off): netns cookie -> SPLICE_NS_* flags. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, __u32);
} kmesh_splice_ns SEC(".maps");

/* Pods whose sidecar capture the kernel performs (struct sidecar_key);
 * written by the daemon next to their SPLICE_NS_SIDECAR opt-in. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct sidecar_key);
	__type(value, struct sidecar_value);
} kmesh_sidecar SEC(".maps");

/* Whether any pod is in kmesh_sidecar_ns (one element, nonzero: some are),
 * so that every other node's connects skip the capture for one inlined
 * array read instead of a netns cookie and a hash lookup (~60 ns). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} kmesh_sidecar_on SEC(".maps");

/* The same pods by network namespace: the pod's own address, where the
 * application's captured connects go (its sidecar's 15001 on that address,
 * so the application still sees its pod address as its own). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct sidecar_key);
} kmesh_sidecar_ns SEC(".maps");

/* Original destinations of connections the sidecar capture redirected,
 * for the sidecar's SO_ORIGINAL_DST (kmesh_getsockopt). sockops writes an
 * entry when the connecting end is established (before the listener can
 * accept) and deletes it when that end closes. LRU: inserting never fails
 * (an entry evicted at 64Ki concurrent captured connections belongs to a
 * connection accepted long ago); the loader sizes it as kmesh_splice. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct splice_key);
	__type(value, struct orig_dst);
} kmesh_sidecar_orig SEC(".maps");

/* Per-CPU event counters, indexed by enum kmesh_stat. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} kmesh_stats SEC(".maps");

/* Counters STAT_MAX and above, at index - STAT_MAX (kmesh_stats' size is
 * frozen by the pins of running nodes). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_EXT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} kmesh_stats_ext SEC(".maps");

#endif
