/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Where a connection goes: the frontend lookup, the load-balancing draw and
 * the path verdict, with no socket in sight. connect4/6 (sock_addr.c) run it
 * for every connect of an enrolled pod; bpf/decidetest runs the very same
 * function through BPF_PROG_RUN with chosen inputs, so its table tests and
 * the differential test against user space's pick check this code, not a
 * copy of it.
 *
 * The verdicts themselves are decided in user space (ambient/path) and read
 * from the records; this only follows them. */
#ifndef KMESH_DECIDE_H
#define KMESH_DECIDE_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include "kmesh_maps.h"
#include "kmesh_lb.h"

enum frontend_hit {
	HIT_NONE,
	HIT_SERVICE,
	HIT_WORKLOAD,
	HIT_CHANGED, /* what we found changed under us twice (element reuse): refuse */
};

/* Looks the destination up as a service VIP:port, then as a workload IP,
 * once. */
static __always_inline enum frontend_hit frontend_lookup_once(struct frontend_key *key,
							      struct frontend_value *out)
{
	struct frontend_value *fe = bpf_map_lookup_elem(&kmesh_frontend, key);

	if (fe) {
		if (frontend_read(fe, key, out))
			return HIT_CHANGED;
		if (out->kind == FRONTEND_SERVICE)
			return HIT_SERVICE;
	}
	/* Workloads are keyed by address alone: port 0, protocol 0. */
	__u16 port = key->port;
	__u8 proto = key->proto;
	enum frontend_hit hit = HIT_NONE;
	key->port = 0;
	key->proto = 0;
	fe = bpf_map_lookup_elem(&kmesh_frontend, key);
	if (fe) {
		if (frontend_read(fe, key, out))
			hit = HIT_CHANGED;
		else if (out->kind == FRONTEND_WORKLOAD)
			hit = HIT_WORKLOAD;
	}
	key->port = port;
	key->proto = proto;
	return hit;
}

/* frontend_lookup is frontend_lookup_once, again once if what it found was
 * reused for another key while it read it. */
static __always_inline enum frontend_hit frontend_lookup(struct frontend_key *key,
							 struct frontend_value *out)
{
	enum frontend_hit hit = frontend_lookup_once(key, out);

	if (hit == HIT_CHANGED)
		hit = frontend_lookup_once(key, out);
	return hit;
}

static __always_inline int family_of(const __u32 addr[4])
{
	return addr_is_v4mapped(addr) ? KMESH_FAMILY_V4 : KMESH_FAMILY_V6;
}

/* vip_refused: the destination matched no frontend, and its address is a
 * VIP that is no address of anything (kmesh_vip): a port its service lacks.
 * Left alone, the connection would leave the node for an address nobody
 * answers, or that routes somewhere else entirely; it is refused and
 * counted instead. */
static __always_inline int vip_refused(const struct frontend_key *key)
{
	if (!bpf_map_lookup_elem(&kmesh_vip, (void *)key->addr))
		return 0;
	stat_inc(STAT_VIP_NO_PORT);
	return 1;
}

/* What decide() concluded. */
struct decision {
	__u32 addr[4];	/* where to connect: the chosen backend, else the destination */
	__u16 port;	/* network order */
	__u8 path;	/* PATH_* */
	__u8 rewritten; /* 1 when addr:port differs from the destination (a service was balanced) */
	__u32 backend_id; /* the workload reached, 0 when none is known (a waypoint balances) */
};

static __always_inline int path_via_proxy(__u8 path)
{
	return path == PATH_TUNNEL || path == PATH_WAYPOINT;
}

/* decide fills *d for a connection to key (addr, port, proto) and returns 0,
 * or a negative errno when the connection must fail (PATH_REFUSE, a service
 * without a usable endpoint). A destination Kmesh does not know is left alone:
 * PATH_PLAIN, not rewritten. rnd feeds the load balancer.
 *
 * UDP never takes the node proxy: the records hold a UDP verdict of its own
 * (path_udp) and service frontends for UDP never say WAYPOINT. TCP to port
 * 15008 of a workload is already HBONE (an application or sidecar speaking it
 * itself) and is left alone. */
static __always_inline int decide(struct frontend_key *key, const struct lb_rand *rnd,
				  struct decision *d)
{
	struct frontend_value fe;
	struct lb_result res = {};
	__u32 epoch;
	int tcp = key->proto == IPPROTO_TCP;

	__builtin_memcpy(d->addr, key->addr, sizeof(d->addr));
	d->port = key->port;
	d->path = PATH_PLAIN;
	d->rewritten = 0;
	d->backend_id = 0;

	switch (frontend_lookup(key, &fe)) {
	case HIT_WORKLOAD: {
		stat_inc(STAT_WORKLOAD_DIRECT);
		if (tcp && key->port == bpf_htons(KMESH_HBONE_PORT))
			return 0;
		__u32 id = fe.id;
		struct backend_copy be;
		int err = backend_read(id, family_of(key->addr), &be);
		if (err == -EAGAIN)
			err = backend_read(id, family_of(key->addr), &be);
		if (err) {
			/* User space deletes a workload's frontends before its
			 * backend: a frontend without one is a bug. Fail closed,
			 * as when it changed under us twice. */
			if (err == -ENOENT)
				stat_inc(STAT_NO_BACKEND);
			d->path = PATH_REFUSE;
			return -ECONNREFUSED;
		}
		d->backend_id = id;
		d->path = tcp ? be.path_addr : be.path_udp;
		break;
	}
	case HIT_SERVICE:
		d->path = fe.path;
		if (fe.path == PATH_PASSTHROUGH) {
			stat_inc(STAT_LB_PASSTHROUGH);
			return 0;
		}
		if (fe.path != PATH_BALANCE)
			break; /* WAYPOINT (the waypoint balances) or REFUSE */
		int err = lb_pick(&fe, family_of(key->addr), rnd, &res, &epoch);
		if (err) {
			count_lb_error(err);
			d->path = PATH_REFUSE;
			return err;
		}
		stat_inc(STAT_LB_SERVICE);
		__builtin_memcpy(d->addr, res.addr, sizeof(d->addr));
		d->port = res.port;
		d->rewritten = 1;
		d->backend_id = res.backend_id;
		d->path = tcp ? res.path_svc : res.path_udp;
		break;
	case HIT_CHANGED:
		d->path = PATH_REFUSE;
		return -ECONNREFUSED;
	default:
		if (vip_refused(key)) {
			d->path = PATH_REFUSE;
			return -ECONNREFUSED;
		}
		return 0;
	}
	if (tcp && d->path == PATH_AUTHZ)
		return 0; /* authz_decide() finishes it, with the source's identity */
	if (d->path < PATH_DIRECT || d->path > PATH_WAYPOINT || (!tcp && path_via_proxy(d->path))) {
		/* REFUSE, and anything that is not a final verdict here
		 * (BALANCE in a backend, a verdict a newer daemon wrote than
		 * these programs know), fails closed. */
		stat_inc(STAT_PATH_REFUSED);
		d->path = PATH_REFUSE;
		return -ECONNREFUSED;
	}
	return 0;
}

/* authz_read evaluates kmesh_authz[key] for a destination port (network
 * order) in place: 1 allow, 0 deny, -ENOENT without an entry, -EAGAIN when
 * the element holds another pair's value (element reuse, kmesh_maps.h). */
static __always_inline int authz_read(const struct authz_key *key, __u16 port)
{
	struct authz_value *v = bpf_map_lookup_elem(&kmesh_authz, key);

	if (!v)
		return -ENOENT;
	KMESH_AFTER_LOOKUP();
	int allow = KMESH_READ(v->allow) ? 1 : 0;
	__u8 n = KMESH_READ(v->nports);
	int hit = 0;
#pragma unroll
	for (int i = 0; i < KMESH_AUTHZ_PORTS; i++)
		if (i < n && KMESH_READ(v->ports[i]) == port)
			hit = 1;
	kmesh_barrier();
	/* The key is three words: destination, source, family and zero pad. */
	if (KMESH_WORD(&v->key, 0) != KMESH_WORD(key, 0) ||
	    KMESH_WORD(&v->key, 1) != KMESH_WORD(key, 1) ||
	    KMESH_WORD(&v->key, 2) != KMESH_WORD(key, 2))
		return record_changed();
	return hit ? !allow : allow;
}

/* authz_decide finishes a PATH_AUTHZ decision: the destination (a mesh
 * workload on this node) has authorization policies that user space compiled
 * into kmesh_authz for every enrolled source workload of this node. src_id is
 * the connecting pod's workload, from its enrolment (kmesh_managed[its netns
 * cookie]): the kernel, not the pod, says who connects, which is why a
 * same-node connection is held to the policies as mTLS would be (STRICT's
 * "a peer identity is present" holds). Allowed: PATH_DIRECT, to the chosen
 * backend. Denied: PATH_REFUSE and -ECONNREFUSED. No entry (a source whose
 * workload is not known yet, a pair user space could not fit): PATH_TUNNEL,
 * so the node proxy evaluates the same policies over HBONE. Anything but
 * PATH_AUTHZ is left as it is. Context-free, for BPF_PROG_RUN. */
static __always_inline int authz_decide(struct decision *d, __u32 src_id)
{
	if (d->path != PATH_AUTHZ)
		return 0;
	struct authz_key k = {
	    .dst_id = d->backend_id,
	    .src_id = src_id,
	    .family = (__u8)family_of(d->addr),
	};
	int v = -ENOENT;
	if (src_id && d->backend_id) {
		v = authz_read(&k, d->port);
		if (v == -EAGAIN)
			v = authz_read(&k, d->port);
	}
	switch (v) {
	case 1:
		stat_inc(STAT_AUTHZ_ALLOW);
		d->path = PATH_DIRECT;
		return 0;
	case 0:
		stat_inc(STAT_AUTHZ_DENY);
		d->path = PATH_REFUSE;
		return -ECONNREFUSED;
	case -EAGAIN:
		/* Changed under us twice: the tunnel decides rather than us. */
	default:
		stat_inc(STAT_AUTHZ_NO_ENTRY);
		d->path = PATH_TUNNEL;
		return 0;
	}
}

#endif
