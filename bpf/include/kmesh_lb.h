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

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&kmesh_stats, &idx);

	if (v)
		*v += 1;
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
 * changed under us (the caller reads the service again). */
static __always_inline int lb_draw(__u32 service_id, const struct service_value *svc,
				   __u16 target_port, int family, const struct lb_rand *rnd,
				   struct lb_result *out)
{
	__u32 rank, n = 0;

	family &= 1;
#pragma unroll
	for (rank = 0; rank < KMESH_MAX_RANKS; rank++) {
		n = svc->count[family][rank];
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
	struct endpoint_value *ep = bpf_map_lookup_elem(&kmesh_endpoint, &ek);
	if (!ep)
		return -EAGAIN;

	__u32 id = ep->backend_id;
	__u16 port = ep->port;
	if (rnd->coin >= ep->threshold) {
		id = ep->alias_id;
		port = ep->alias_port;
	}
	struct backend_value *be = bpf_map_lookup_elem(&kmesh_backend, &id);
	if (!be)
		return -EAGAIN;

	if (family == KMESH_FAMILY_V4) {
		if (!be->addr4)
			return -EHOSTUNREACH;
		addr_set_v4(out->addr, be->addr4);
	} else {
		if (!(be->addr6[0] | be->addr6[1] | be->addr6[2] | be->addr6[3]))
			return -EHOSTUNREACH;
		out->addr[0] = be->addr6[0];
		out->addr[1] = be->addr6[1];
		out->addr[2] = be->addr6[2];
		out->addr[3] = be->addr6[3];
	}
	out->backend_id = id;
	out->path_svc = be->path_svc;
	out->path_udp = be->path_udp;
	out->port = port ? port : target_port;
	return 0;
}

/* Picks a backend, reading the service again once if user space swapped the
 * endpoint generation between our service lookup and endpoint lookup. */
static __always_inline int lb_pick(const struct frontend_value *fe, int family,
				   const struct lb_rand *rnd, struct lb_result *out, __u32 *epoch)
{
	int ret = -ECONNREFUSED;

#pragma unroll
	for (int attempt = 0; attempt < 2; attempt++) {
		__u32 id = fe->id;
		struct service_value *svc = bpf_map_lookup_elem(&kmesh_service, &id);

		if (!svc)
			return -ECONNREFUSED;
		*epoch = svc->epoch;
		ret = lb_draw(id, svc, fe->target_port, family, rnd, out);
		if (ret != -EAGAIN)
			return ret;
		stat_inc(STAT_LB_RETRY);
	}
	return -ECONNREFUSED;
}

static __always_inline void count_lb_error(int err)
{
	stat_inc(err == -EHOSTUNREACH ? STAT_LB_NO_FAMILY : STAT_LB_NO_ENDPOINT);
}

#endif
