/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Load balancing in the kernel: pick a backend of a service for one socket.
 * All policy (locality ranks, STRICT/FAILOVER, health, capacity weights) is
 * decided in user space and encoded into the tables; the kernel only takes
 * the best non-empty rank and draws from its alias table. */
#ifndef KMESH_LB_H
#define KMESH_LB_H

#include <linux/bpf.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "kmesh_maps.h"

static __always_inline void stat_add(__u32 idx, __u64 n)
{
	__u64 *v;

	if (idx < STAT_MAX) {
		v = bpf_map_lookup_elem(&kmesh_stats, &idx);
	} else {
		idx -= STAT_MAX;
		v = bpf_map_lookup_elem(&kmesh_stats_ext, &idx);
	}
	if (v)
		*v += n;
}

static __always_inline void stat_inc(__u32 idx)
{
	stat_add(idx, 1);
}

/* A record read after its element was reused for another key. */
static __always_inline int record_changed(void)
{
	stat_inc(STAT_RECORD_REUSED);
	return -EAGAIN;
}

static __always_inline void addr_set_v4(__u32 addr[4], __u32 ip4)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = bpf_htonl(0x0000ffff);
	addr[3] = ip4;
}

static __always_inline int addr_is_v4mapped(const __u32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int addr_eq(const __u32 a[4], const __u32 b[4])
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* 127.0.0.0/8 (v4-mapped) or ::1. */
static __always_inline int addr_is_loopback(const __u32 a[4])
{
	if (addr_is_v4mapped(a))
		return (bpf_ntohl(a[3]) >> 24) == 127;
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(1);
}

/* Reading records safely against element reuse (kmesh_maps.h). A field is
 * loaded exactly once, where the code says (volatile); the barrier keeps the
 * identity loads after the field loads. */
#define KMESH_READ(x)	 (*(volatile typeof(x) *)&(x))
#define kmesh_barrier()	 asm volatile("" ::: "memory")
#define KMESH_WORD(p, i) (((volatile const __u32 *)(p))[i])

/* Test builds (bpf/decidetest) widen the time between a lookup and the copy
 * of what it found, so that a writer on another CPU reuses elements inside
 * it; nothing in the data path. */
#ifndef KMESH_AFTER_LOOKUP
#define KMESH_AFTER_LOOKUP()
#endif

/* frontend_read copies a kmesh_frontend value found for key into *out.
 * Returns 0, or -EAGAIN when the element holds another key's value. */
static __always_inline int frontend_read(const struct frontend_value *fe,
					 const struct frontend_key *key, struct frontend_value *out)
{
	KMESH_AFTER_LOOKUP();
	out->id = KMESH_READ(fe->id);
	out->target_port = KMESH_READ(fe->target_port);
	out->kind = KMESH_READ(fe->kind);
	out->path = KMESH_READ(fe->path);
	kmesh_barrier();
	/* The key is five words: the address, then port, protocol and a zero pad. */
	if (KMESH_WORD(&fe->key, 0) != KMESH_WORD(key, 0) ||
	    KMESH_WORD(&fe->key, 1) != KMESH_WORD(key, 1) ||
	    KMESH_WORD(&fe->key, 2) != KMESH_WORD(key, 2) ||
	    KMESH_WORD(&fe->key, 3) != KMESH_WORD(key, 3) ||
	    KMESH_WORD(&fe->key, 4) != KMESH_WORD(key, 4))
		return record_changed();
	return 0;
}

/* What the load balancer uses of a kmesh_service value, for one family. */
struct service_copy {
	__u32 count[KMESH_MAX_RANKS];
	__u32 epoch;
	__u8 gen;
};

/* service_read copies kmesh_service[id] (the family's counts, epoch and
 * generation). Returns 0, -ENOENT when there is no such set, or -EAGAIN
 * when the element holds another set's value. */
static __always_inline int service_read(__u32 id, int family, struct service_copy *out)
{
	struct service_value *svc = bpf_map_lookup_elem(&kmesh_service, &id);

	if (!svc)
		return -ENOENT;
	KMESH_AFTER_LOOKUP();
	family &= 1;
#pragma unroll
	for (int r = 0; r < KMESH_MAX_RANKS; r++)
		out->count[r] = KMESH_READ(svc->count[family][r]);
	out->epoch = KMESH_READ(svc->epoch);
	out->gen = KMESH_READ(svc->gen);
	kmesh_barrier();
	if (KMESH_READ(svc->id) != id)
		return record_changed();
	return 0;
}

/* What the load balancer uses of an alias-table slot. */
struct endpoint_copy {
	__u32 backend_id;
	__u32 alias_id;
	__u32 threshold;
	__u16 port;
	__u16 alias_port;
};

/* endpoint_read copies kmesh_endpoint[*ek]. Returns 0, -ENOENT or -EAGAIN
 * (the element holds another slot's value). */
static __always_inline int endpoint_read(const struct endpoint_key *ek, struct endpoint_copy *out)
{
	struct endpoint_value *ep = bpf_map_lookup_elem(&kmesh_endpoint, ek);

	if (!ep)
		return -ENOENT;
	KMESH_AFTER_LOOKUP();
	out->backend_id = KMESH_READ(ep->backend_id);
	out->alias_id = KMESH_READ(ep->alias_id);
	out->threshold = KMESH_READ(ep->threshold);
	out->port = KMESH_READ(ep->port);
	out->alias_port = KMESH_READ(ep->alias_port);
	kmesh_barrier();
	/* The key is three words: service id; gen, family, rank, zero pad; slot. */
	if (KMESH_WORD(&ep->key, 0) != KMESH_WORD(ek, 0) ||
	    KMESH_WORD(&ep->key, 1) != KMESH_WORD(ek, 1) ||
	    KMESH_WORD(&ep->key, 2) != KMESH_WORD(ek, 2))
		return record_changed();
	return 0;
}

/* What the decision uses of a workload. */
struct backend_copy {
	__u32 addr[4]; /* of the family asked for, v4-mapped for IPv4; zero when it has none */
	__u8 path_svc;
	__u8 path_addr;
	__u8 path_udp;
	__u8 path_in;
};

/* backend_read copies kmesh_backend[id]: its address of the family and its
 * verdicts. Returns 0, -ENOENT or -EAGAIN (the element holds another
 * workload's value). */
static __always_inline int backend_read(__u32 id, int family, struct backend_copy *out)
{
	struct backend_value *be = bpf_map_lookup_elem(&kmesh_backend, &id);

	if (!be)
		return -ENOENT;
	KMESH_AFTER_LOOKUP();
	if (family == KMESH_FAMILY_V4) {
		__u32 a4 = KMESH_READ(be->addr4);

		if (a4)
			addr_set_v4(out->addr, a4);
		else
			__builtin_memset(out->addr, 0, sizeof(out->addr));
	} else {
		out->addr[0] = KMESH_READ(be->addr6[0]);
		out->addr[1] = KMESH_READ(be->addr6[1]);
		out->addr[2] = KMESH_READ(be->addr6[2]);
		out->addr[3] = KMESH_READ(be->addr6[3]);
	}
	out->path_svc = KMESH_READ(be->path_svc);
	out->path_addr = KMESH_READ(be->path_addr);
	out->path_udp = KMESH_READ(be->path_udp);
	out->path_in = KMESH_READ(be->path_in);
	kmesh_barrier();
	if (KMESH_READ(be->id) != id)
		return record_changed();
	return 0;
}

static __always_inline int addr_is_zero(const __u32 a[4])
{
	return !(a[0] | a[1] | a[2] | a[3]);
}

static __always_inline int is_managed(void *ctx)
{
	__u64 cookie = bpf_get_netns_cookie(ctx);

	return bpf_map_lookup_elem(&kmesh_managed, &cookie) != NULL;
}

struct lb_result {
	__u32 addr[4]; /* v4-mapped for KMESH_FAMILY_V4 */
	__u32 backend_id;
	__u16 port;
	__u8 path_svc; /* the backend's verdicts */
	__u8 path_udp;
};

/* The two random numbers one draw consumes: which slot, then primary or
 * alias. Passed in rather than drawn inside, so that a test program can run
 * the very same code with chosen values (bpf/decidetest) and compare it with
 * user space's pick (ambient/dataplane Pick). */
struct lb_rand {
	__u32 slot;
	__u32 coin;
};

/* Uniform in [0, n) without a division: Lemire's multiply-shift. */
static __always_inline __u32 rand_below(__u32 r, __u32 n)
{
	return (__u32)(((__u64)r * n) >> 32);
}

/* One draw from the service's best non-empty rank. Returns 0, -ECONNREFUSED
 * when the service has no endpoint for this family, -EHOSTUNREACH when the
 * chosen workload has no address of the family, or -EAGAIN when the table
 * changed under us (a generation retired, or an element reused for another
 * key: the caller reads the service again). */
static __always_inline int lb_draw(__u32 service_id, const struct service_copy *svc,
				   __u16 target_port, int family, const struct lb_rand *rnd,
				   struct lb_result *out)
{
	__u32 rank, n = 0;

	family &= 1;
#pragma unroll
	for (rank = 0; rank < KMESH_MAX_RANKS; rank++) {
		n = svc->count[rank];
		if (n)
			break;
	}
	if (!n)
		return -ECONNREFUSED;

	struct endpoint_key ek = {
	    .service_id = service_id,
	    .gen = svc->gen,
	    .family = family,
	    .rank = rank,
	    .index = rand_below(rnd->slot, n),
	};
	struct endpoint_copy ep;
	if (endpoint_read(&ek, &ep))
		return -EAGAIN;

	__u32 id = ep.backend_id;
	__u16 port = ep.port;
	if (rnd->coin >= ep.threshold) {
		id = ep.alias_id;
		port = ep.alias_port;
	}
	struct backend_copy be;
	if (backend_read(id, family, &be))
		return -EAGAIN;
	if (addr_is_zero(be.addr))
		return -EHOSTUNREACH;

	__builtin_memcpy(out->addr, be.addr, sizeof(out->addr));
	out->backend_id = id;
	out->path_svc = be.path_svc;
	out->path_udp = be.path_udp;
	out->port = port ? port : target_port;
	return 0;
}

/* Picks a backend, reading the service again once if what it read changed
 * under it (user space swapped the endpoint generation between our service
 * lookup and endpoint lookup, or an element was reused for another key). */
static __always_inline int lb_pick(const struct frontend_value *fe, int family,
				   const struct lb_rand *rnd, struct lb_result *out, __u32 *epoch)
{
	int ret = -ECONNREFUSED;

#pragma unroll
	for (int attempt = 0; attempt < 2; attempt++) {
		__u32 id = fe->id;
		struct service_copy svc;

		ret = service_read(id, family, &svc);
		if (ret == -ENOENT)
			return -ECONNREFUSED;
		if (!ret) {
			*epoch = svc.epoch;
			ret = lb_draw(id, &svc, fe->target_port, family, rnd, out);
			if (ret != -EAGAIN)
				return ret;
		}
		stat_inc(STAT_LB_RETRY);
	}
	return -ECONNREFUSED;
}

static __always_inline void count_lb_error(int err)
{
	stat_inc(err == -EHOSTUNREACH ? STAT_LB_NO_FAMILY : STAT_LB_NO_ENDPOINT);
}

#endif
