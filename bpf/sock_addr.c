// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* cgroup sock_addr programs: connect-time service load balancing.
 *
 * connect4/6   TCP and connected UDP: a VIP becomes one backend before the
 *              first packet exists; the VIP is kept in socket storage.
 * sendmsg4/6   unconnected UDP, per datagram, with per-socket affinity.
 * recvmsg4/6   unconnected UDP replies are reported as coming from the VIP.
 * getpeername4/6  the application sees the VIP it dialled as its peer.
 *
 * DNS: when the daemon turned capture on (kmesh_dns), an enrolled pod's
 * queries to any resolver on port 53 (connect4/6 for TCP and connected UDP,
 * sendmsg4/6 for unconnected UDP) go to the node proxy's DNS server on the
 * pod's own loopback; recvmsg and getpeername show the resolver the
 * application asked. The proxy's own sockets and loopback resolvers are
 * left alone.
 *
 * How each destination is reached (kernel path, plaintext, the node proxy's
 * HBONE tunnel, a waypoint, or refused) is a verdict user space wrote into
 * its records; kmesh_decide.h follows it. A TCP connect whose verdict is
 * TUNNEL or WAYPOINT goes to the node proxy's outbound listener in the pod
 * (127.0.0.1:15001); sockops.c hands the proxy the original destination,
 * the verdict and the backend chosen here.
 *
 * Only sockets of enrolled pods (netns cookie in kmesh_managed) are acted on;
 * destinations not in kmesh_frontend pass untouched. A VIP with no usable
 * endpoint fails the syscall (ECONNREFUSED / EHOSTUNREACH) instead of letting
 * the VIP leak onto the network. */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/errno.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "kmesh_consts.h"
#include "kmesh_abi.h"
#include "kmesh_maps.h"
#include "kmesh_lb.h"
#include "kmesh_decide.h"
#include "kmesh_splice.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#endif

char _license[] SEC("license") = "Dual BSD/GPL";

/* Restore the VIP as the peer name (getpeername, recvmsg on connected UDP).
 * Costs one socket-storage allocation per redirected connect (~0.6 us
 * measured, see BenchmarkPrivilegedConnectProgram); applications that never
 * look at their peer can turn it off. Set at load time. */
const volatile __u32 cfg_peer_vip = 1;

/* The connecting pod's workload (backend id) from its enrolment, 0 while
 * unknown. Read twice through two lookups: an element reused for another
 * namespace between the lookup and the read (kmesh_maps.h) would name
 * another pod's workload, and the second lookup of our cookie does not find
 * that element any more. */
static __always_inline __u32 source_workload(__u64 cookie)
{
	struct managed_value *mv = bpf_map_lookup_elem(&kmesh_managed, &cookie);

	if (!mv)
		return 0;
	__u32 id = KMESH_READ(mv->backend_id);
	kmesh_barrier();
	mv = bpf_map_lookup_elem(&kmesh_managed, &cookie);
	if (!mv || KMESH_READ(mv->backend_id) != id)
		return 0; /* changing under us: no identity, the tunnel decides */
	return id;
}

/* A connect the destination's policies refused in the kernel: counted
 * (STAT_AUTHZ_DENY, in authz_decide) and reported to the daemon's telemetry
 * as a CONN_EV_DENY record (an access-log line), never waited for. */
static __always_inline void deny_event(struct bpf_sock_addr *ctx, const struct frontend_key *key,
				       const struct decision *d, __u64 cookie)
{
	struct conn_event *e = bpf_ringbuf_reserve(&kmesh_events, sizeof(*e), 0);

	if (!e) {
		stat_inc(STAT_CONN_EVENT_DROP);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->sock_cookie = bpf_get_socket_cookie(ctx);
	e->netns_cookie = cookie;
	e->ts_ns = bpf_ktime_get_ns();
	__builtin_memcpy(e->remote_addr, d->addr, sizeof(e->remote_addr));
	e->remote_port = d->port;
	if (d->rewritten) {
		__builtin_memcpy(e->orig_addr, key->addr, sizeof(e->orig_addr));
		e->orig_port = key->port;
	}
	e->kind = CONN_EV_DENY;
	e->direction = CONN_DIR_OUTBOUND;
	e->backend_id = d->backend_id;
	bpf_ringbuf_submit(e, 0);
	stat_inc(STAT_CONN_EVENT);
}

/* Decides where an enrolled pod's connect() goes (kmesh_decide.h). Returns
 * 0 with *d filled, or a negative errno to refuse. *authed is set when the
 * destination's policies allowed the connection in the kernel (PATH_AUTHZ
 * became PATH_DIRECT). */
static __always_inline int connect_decide(struct bpf_sock_addr *ctx, struct frontend_key *key,
					  struct decision *d, int *authed)
{
	struct lb_rand rnd;

	__builtin_memcpy(d->addr, key->addr, sizeof(d->addr));
	d->port = key->port;
	d->path = PATH_PLAIN;
	d->rewritten = 0;
	*authed = 0;
	if (!is_managed(ctx))
		return 0;
	/* The node proxy's own sockets (HBONE to a peer, the app behind an
	 * inbound tunnel) inside the pod's namespace go where they asked. They
	 * are known by what the daemon wrote into their storage, never by
	 * their mark: a pod with NET_ADMIN can set 0x539 on its own sockets. */
	if (bpf_sk_storage_get(&kmesh_proxy_sk, ctx->sk, NULL, 0))
		return 0;
	rnd.slot = bpf_get_prandom_u32();
	rnd.coin = bpf_get_prandom_u32();
	int err = decide(key, &rnd, d);
	if (err || d->path != PATH_AUTHZ)
		return err;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	err = authz_decide(d, source_workload(cookie));
	if (err)
		deny_event(ctx, key, d, cookie);
	*authed = d->path == PATH_DIRECT;
	return err;
}

/* Remembers, in the socket's storage, what the application dialled, where
 * the socket now goes (peer), the verdict and the backend chosen.
 * getpeername() answers from it; for a socket sent to the node proxy sockops
 * copies it for the proxy, so it is kept even with cfg_peer_vip off. Returns
 * 0, or -ENOMEM when such a socket has no storage (the proxy could not know
 * where to go). */
static __always_inline int remember_orig(struct bpf_sock_addr *ctx, const struct frontend_key *key,
					 const struct decision *d, const __u32 peer[4],
					 __u16 peer_port, int authed)
{
	struct sock_orig *so;
	int proxied = path_via_proxy(d->path);

	/* An authorized connection is always remembered: sockops tells the
	 * destination's inbound program about it from this record. */
	if (!cfg_peer_vip && !proxied && !authed)
		return 0;
	so = bpf_sk_storage_get(&kmesh_sock_orig, ctx->sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!so) {
		if (proxied) {
			stat_inc(STAT_TUNNEL_NO_ORIG);
			return -ENOMEM;
		}
		stat_inc(STAT_STORAGE_FAIL);
		return 0;
	}
	__builtin_memcpy(so->addr, key->addr, sizeof(so->addr));
	so->port = key->port;
	so->path = authed ? PATH_AUTHZ : d->path;
	__builtin_memcpy(so->peer_addr, peer, sizeof(so->peer_addr));
	so->peer_port = peer_port;
	if (d->path == PATH_WAYPOINT) {
		__builtin_memset(so->backend_addr, 0, sizeof(so->backend_addr));
		so->backend_port = 0;
	} else {
		__builtin_memcpy(so->backend_addr, d->addr, sizeof(so->backend_addr));
		so->backend_port = d->port;
	}
	return 0;
}

static __always_inline int reject(int err)
{
	bpf_set_retval(err);
	return SYS_REJECT;
}

/* Where a tunnelled socket goes: the node proxy's outbound listener on the
 * pod's own loopback (v4-mapped for an IPv6 socket dialling IPv4). */
static __always_inline void outbound_listener(const __u32 dst[4], __u32 out[4])
{
	if (addr_is_v4mapped(dst)) {
		addr_set_v4(out, bpf_htonl(0x7f000001));
	} else {
		out[0] = 0;
		out[1] = 0;
		out[2] = 0;
		out[3] = bpf_htonl(1);
	}
}

/* DNS capture. Returns 1 when the socket's query to key (a resolver on
 * port 53) goes to the proxy's DNS server instead: peer and peer_port are
 * filled and the resolver is kept in the socket's storage, so that replies
 * (recvmsg) and getpeername show the resolver the application asked.
 * Without storage the query is left alone: a reply from an address the
 * application did not ask would be thrown away by its resolver. */
static __always_inline int dns_capture(struct bpf_sock_addr *ctx, const struct frontend_key *key,
				       __u32 peer[4], __u16 *peer_port)
{
	__u32 zero = 0;
	struct dns_config *cfg;
	struct sock_orig *so;

	if (key->port != bpf_htons(KMESH_DNS_UPSTREAM_PORT))
		return 0;
	if (key->proto != IPPROTO_UDP && key->proto != IPPROTO_TCP)
		return 0;
	cfg = bpf_map_lookup_elem(&kmesh_dns, &zero);
	if (!cfg || !cfg->enabled || !cfg->port)
		return 0;
	if (addr_is_loopback(key->addr)) /* a resolver in the pod itself */
		return 0;
	if (!is_managed(ctx))
		return 0;
	/* The proxy's own sockets (its upstream queries, when made from the
	 * pod) go where they asked; known by what only the daemon can write. */
	if (bpf_sk_storage_get(&kmesh_proxy_sk, ctx->sk, NULL, 0))
		return 0;
	so = bpf_sk_storage_get(&kmesh_sock_orig, ctx->sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!so) {
		stat_inc(STAT_DNS_NO_STORAGE);
		return 0;
	}
	outbound_listener(key->addr, peer);
	*peer_port = bpf_htons(cfg->port);
	__builtin_memcpy(so->addr, key->addr, sizeof(so->addr));
	so->port = key->port;
	so->path = PATH_PLAIN;
	__builtin_memcpy(so->peer_addr, peer, sizeof(so->peer_addr));
	so->peer_port = *peer_port;
	__builtin_memset(so->backend_addr, 0, sizeof(so->backend_addr));
	so->backend_port = 0;
	stat_inc(STAT_DNS_CAPTURED);
	return 1;
}

/* connect_common's answers. */
enum connect_action {
	CONNECT_PASS,	 /* leave the destination alone */
	CONNECT_REWRITE, /* connect to peer:peer_port instead */
};

/* Shared tail of connect4/6: decide, remember, and fill the new peer in.
 * Returns a connect_action or a negative errno. */
static __always_inline int connect_common(struct bpf_sock_addr *ctx, struct frontend_key *key,
					  __u32 peer[4], __u16 *peer_port)
{
	struct decision d;
	int authed;

	if (dns_capture(ctx, key, peer, peer_port))
		return CONNECT_REWRITE;
	int err = connect_decide(ctx, key, &d, &authed);
	if (err)
		return err;
	if (path_via_proxy(d.path)) {
		outbound_listener(key->addr, peer);
		*peer_port = bpf_htons(KMESH_OUTBOUND_PORT);
		stat_inc(STAT_TUNNEL);
	} else if (d.rewritten || authed) {
		/* A workload dialled by its own address is its own peer. */
		__builtin_memcpy(peer, d.addr, sizeof(d.addr));
		*peer_port = d.port;
	} else {
		return CONNECT_PASS;
	}
	err = remember_orig(ctx, key, &d, peer, *peer_port, authed);
	if (err)
		return err;
	return CONNECT_REWRITE;
}

/* Ports a default Istio sidecar's inbound capture exempts: a sidecar's dial
 * to them goes where it asked. */
static __always_inline int sidecar_inbound_exempt(__u16 port)
{
	return port == bpf_htons(KMESH_SIDECAR_EXEMPT_TUNNEL) ||
	       port == bpf_htons(KMESH_SIDECAR_EXEMPT_PROM) ||
	       port == bpf_htons(KMESH_SIDECAR_EXEMPT_HEALTH) ||
	       port == bpf_htons(KMESH_SIDECAR_EXEMPT_STATUS) ||
	       port == bpf_htons(KMESH_INBOUND_PORT);
}

/* The sidecar capture (SPLICE_NS_SIDECAR, kmesh_consts.h), IPv4 TCP, for
 * the pods of kmesh_sidecar_ns. It does at connect what the pod's
 * istio-iptables rules would do to the first packet, and only where they
 * would:
 *
 *   application (not uid/gid 1337) -> anything but loopback, the pod's own
 *     address or port 53: to its sidecar's outbound listener, 15001 on the
 *     pod's own address (ISTIO_OUTPUT -> ISTIO_REDIRECT; the source stays
 *     the pod address, as under REDIRECT; TCP DNS is left to the rules,
 *     which may send it to the agent's 15053);
 *   the sidecar (uid or gid 1337) -> another pod of kmesh_sidecar, on a port
 *     its inbound capture does not exempt: to that pod's 15006
 *     (its ISTIO_INBOUND -> ISTIO_IN_REDIRECT, done at the source).
 *
 * Everything else (the sidecar's dials elsewhere, to its own pod, loopback)
 * passes, and the rules still see it. The original destination goes into
 * the socket's storage: getpeername() shows it, and sockops publishes it for
 * the sidecar's SO_ORIGINAL_DST (kmesh_getsockopt). No storage: the connect
 * is left to iptables, counted. Returns 1 when it rewrote ctx. */
static __always_inline int sidecar_capture4(struct bpf_sock_addr *ctx)
{
	__u32 ip4 = ctx->user_ip4;
	__u16 port = (__u16)ctx->user_port;

	if (ctx->type != SOCK_STREAM || ctx->protocol != IPPROTO_TCP)
		return 0;
	__u32 zero = 0;
	__u32 *on = bpf_map_lookup_elem(&kmesh_sidecar_on, &zero);
	if (!on || !*on)
		return 0;
	__u64 cookie = bpf_get_netns_cookie(ctx);
	struct sidecar_key *self = bpf_map_lookup_elem(&kmesh_sidecar_ns, &cookie);
	if (!self)
		return 0;
	__u32 own4 = self->addr[3];
	/* An enrolled pod is ambient's, never a sidecar's (the daemon opts in
	 * only pods that are not); checked so that a stale opt-in cannot
	 * take its connects from the node proxy. */
	if (bpf_map_lookup_elem(&kmesh_managed, &cookie))
		return 0;
	struct sidecar_key k;
	addr_set_v4(k.addr, ip4);
	if (splice_addr_loopback(k.addr) || ip4 == own4)
		return 0; /* over lo: the rules decide */
	__u64 ug = bpf_get_current_uid_gid();
	int proxy = (__u32)ug == KMESH_SIDECAR_UID || (__u32)(ug >> 32) == KMESH_SIDECAR_UID;
	__u32 peer[4];
	__u16 peer_port;
	if (proxy) {
		struct sidecar_value *dst = bpf_map_lookup_elem(&kmesh_sidecar, &k);
		if (!dst || dst->netns_cookie == cookie || sidecar_inbound_exempt(port))
			return 0;
		__builtin_memcpy(peer, k.addr, sizeof(peer));
		peer_port = bpf_htons(KMESH_INBOUND_PORT);
	} else {
		if (port == bpf_htons(KMESH_DNS_UPSTREAM_PORT))
			return 0;
		addr_set_v4(peer, own4);
		peer_port = bpf_htons(KMESH_OUTBOUND_PORT);
	}
	struct sock_orig *so =
	    bpf_sk_storage_get(&kmesh_sock_orig, ctx->sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!so) {
		stat_inc(STAT_SIDECAR_NO_RECORD);
		return 0;
	}
	__builtin_memcpy(so->addr, k.addr, sizeof(so->addr));
	so->port = port;
	so->path = PATH_SIDECAR;
	__builtin_memcpy(so->peer_addr, peer, sizeof(so->peer_addr));
	so->peer_port = peer_port;
	__builtin_memset(so->backend_addr, 0, sizeof(so->backend_addr));
	so->backend_port = 0;
	ctx->user_ip4 = peer[3];
	ctx->user_port = (__u32)peer_port;
	stat_inc(STAT_SIDECAR_CAPTURED);
	return 1;
}

SEC("cgroup/connect4")
int kmesh_connect4(struct bpf_sock_addr *ctx)
{
	if (sidecar_capture4(ctx))
		return SYS_PROCEED;

	struct frontend_key key = {
	    .port = (__u16)ctx->user_port,
	    .proto = (__u8)ctx->protocol,
	};
	__u32 peer[4];
	__u16 port;

	addr_set_v4(key.addr, ctx->user_ip4);
	int ret = connect_common(ctx, &key, peer, &port);
	if (ret < 0)
		return reject(ret);
	if (ret != CONNECT_PASS) {
		ctx->user_ip4 = peer[3];
		ctx->user_port = (__u32)port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect6")
int kmesh_connect6(struct bpf_sock_addr *ctx)
{
	struct frontend_key key = {
	    .port = (__u16)ctx->user_port,
	    .proto = (__u8)ctx->protocol,
	};
	__u32 peer[4];
	__u16 port;

	key.addr[0] = ctx->user_ip6[0];
	key.addr[1] = ctx->user_ip6[1];
	key.addr[2] = ctx->user_ip6[2];
	key.addr[3] = ctx->user_ip6[3];
	int ret = connect_common(ctx, &key, peer, &port);
	if (ret < 0)
		return reject(ret);
	if (ret != CONNECT_PASS) {
		/* A v4-mapped destination gets a v4-mapped peer: the socket stays dual-stack. */
		ctx->user_ip6[0] = peer[0];
		ctx->user_ip6[1] = peer[1];
		ctx->user_ip6[2] = peer[2];
		ctx->user_ip6[3] = peer[3];
		ctx->user_port = (__u32)port;
	}
	return SYS_PROCEED;
}

/* Unconnected UDP. Every datagram passes here, so one socket talking to a VIP
 * keeps its backend (QUIC and other stateful UDP would break otherwise) until
 * the service's membership changes. The choice lives in the socket's own
 * storage (kmesh_udp): nothing outlives the socket, and no socket's traffic
 * evicts another's.
 *
 * Replies. A datagram from a backend carries no trace of the VIP it answers,
 * and one socket may send to two VIPs whose datagrams reach the same
 * backend:port (two services selecting one pod). recvmsg reports a datagram
 * from backend:port as coming from the VIP whose datagram this socket most
 * recently sent there: every send through a slot stamps it with the socket's
 * send counter, and the slot whose backend (or previous backend, for replies
 * still in flight across a re-pick) matches with the highest stamp wins. A
 * client that waits for each answer before asking another VIP always sees the
 * VIP it asked; replies from a backend the socket never reached through a
 * VIP are left alone. */

/* Finds the slot for vip:port (or -1), under the lock. */
static __always_inline int udp_slot_of(struct udp_affinity *aff, const struct frontend_key *key)
{
	int found = -1;

#pragma unroll
	for (int i = 0; i < KMESH_UDP_SLOTS; i++) {
		struct udp_slot *s = &aff->slot[i];

		if (found < 0 && s->seq && s->vip_port == key->port && addr_eq(s->vip, key->addr))
			found = i;
	}
	return found;
}

/* Where a new choice for key goes: its own slot, else a free one, else the
 * least recently used. Under the lock. */
static __always_inline int udp_slot_for(struct udp_affinity *aff, const struct frontend_key *key)
{
	int own = udp_slot_of(aff, key);
	int victim = 0;
	__u64 oldest = ~0ULL;

	if (own >= 0)
		return own;
#pragma unroll
	for (int i = 0; i < KMESH_UDP_SLOTS; i++) {
		if (aff->slot[i].seq < oldest) {
			oldest = aff->slot[i].seq;
			victim = i;
		}
	}
	return victim;
}

/* Sends through vip's slot to the backend it holds if it was drawn from the
 * set fe points at now, at its current epoch. Returns 1 (res filled) or 0. */
static __always_inline int udp_affine(struct udp_affinity *aff, const struct frontend_key *key,
				      __u32 service_id, __u32 epoch, struct lb_result *res)
{
	int hit = 0;

	bpf_spin_lock(&aff->lock);
	int i = udp_slot_of(aff, key);
	if (i >= 0) {
		struct udp_slot *s = &aff->slot[i & (KMESH_UDP_SLOTS - 1)];

		if (s->service_id == service_id && s->epoch == epoch) {
			__builtin_memcpy(res->addr, s->backend, sizeof(res->addr));
			res->port = s->backend_port;
			s->seq = ++aff->seq;
			hit = 1;
		}
	}
	bpf_spin_unlock(&aff->lock);
	return hit;
}

/* Records a new choice for vip; the backend it replaces stays matchable
 * for replies (prev). */
static __always_inline void udp_remember(struct udp_affinity *aff, const struct frontend_key *key,
					 __u32 service_id, __u32 epoch, const struct lb_result *res)
{
	bpf_spin_lock(&aff->lock);
	int i = udp_slot_for(aff, key) & (KMESH_UDP_SLOTS - 1);
	struct udp_slot *s = &aff->slot[i];

	if (s->seq && s->vip_port == key->port && addr_eq(s->vip, key->addr) &&
	    !(s->backend_port == res->port && addr_eq(s->backend, res->addr))) {
		__builtin_memcpy(s->prev, s->backend, sizeof(s->prev));
		s->prev_port = s->backend_port;
		s->prev_seq = s->seq;
	} else if (!(s->seq && s->vip_port == key->port && addr_eq(s->vip, key->addr))) {
		/* A slot taken over from another VIP keeps nothing of it. */
		__builtin_memset(s->prev, 0, sizeof(s->prev));
		s->prev_port = 0;
		s->prev_seq = 0;
	}
	__builtin_memcpy(s->vip, key->addr, sizeof(s->vip));
	s->vip_port = key->port;
	__builtin_memcpy(s->backend, res->addr, sizeof(s->backend));
	s->backend_port = res->port;
	s->service_id = service_id;
	s->epoch = epoch;
	s->seq = ++aff->seq;
	bpf_spin_unlock(&aff->lock);
}

static __always_inline int sendmsg_decide(struct bpf_sock_addr *ctx, struct frontend_key *key,
					  struct lb_result *res)
{
	struct frontend_value fe;
	struct service_copy svc;
	struct lb_rand rnd;
	__u32 epoch;

	if (!is_managed(ctx))
		return 0;
	/* Datagrams to a workload's own address are left alone: UDP never
	 * takes the node proxy, so nothing but a refusal could apply. */
	switch (frontend_lookup(key, &fe)) {
	case HIT_SERVICE:
		break;
	case HIT_CHANGED:
		return -ECONNREFUSED;
	case HIT_WORKLOAD:
		return 0;
	default:
		return vip_refused(key) ? -ECONNREFUSED : 0;
	}
	if (fe.path == PATH_PASSTHROUGH) {
		stat_inc(STAT_LB_PASSTHROUGH);
		return 0;
	}
	if (fe.path != PATH_BALANCE) {
		stat_inc(STAT_PATH_REFUSED);
		return -ECONNREFUSED;
	}

	int family = family_of(key->addr);
	struct udp_affinity *aff =
	    bpf_sk_storage_get(&kmesh_udp, ctx->sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (aff && !service_read(fe.id, family, &svc) &&
	    udp_affine(aff, key, fe.id, svc.epoch, res)) {
		stat_inc(STAT_UDP_AFFINITY);
		return 1;
	}

	rnd.slot = bpf_get_prandom_u32();
	rnd.coin = bpf_get_prandom_u32();
	int err = lb_pick(&fe, family, &rnd, res, &epoch);
	if (err) {
		count_lb_error(err);
		return err;
	}
	if (res->path_udp != PATH_DIRECT && res->path_udp != PATH_PLAIN) {
		stat_inc(STAT_PATH_REFUSED);
		return -ECONNREFUSED;
	}
	stat_inc(STAT_LB_SERVICE);
	if (aff)
		udp_remember(aff, key, fe.id, epoch, res);
	else
		stat_inc(STAT_STORAGE_FAIL); /* no affinity, replies show the backend */
	return 1;
}

SEC("cgroup/sendmsg4")
int kmesh_sendmsg4(struct bpf_sock_addr *ctx)
{
	struct frontend_key key = {
	    .port = (__u16)ctx->user_port,
	    .proto = IPPROTO_UDP,
	};
	struct lb_result res = {};

	addr_set_v4(key.addr, ctx->user_ip4);
	if (dns_capture(ctx, &key, res.addr, &res.port)) {
		ctx->user_ip4 = res.addr[3];
		ctx->user_port = (__u32)res.port;
		return SYS_PROCEED;
	}
	int ret = sendmsg_decide(ctx, &key, &res);
	if (ret < 0)
		return reject(ret);
	if (ret > 0) {
		ctx->user_ip4 = res.addr[3];
		ctx->user_port = (__u32)res.port;
	}
	return SYS_PROCEED;
}

SEC("cgroup/sendmsg6")
int kmesh_sendmsg6(struct bpf_sock_addr *ctx)
{
	struct frontend_key key = {
	    .port = (__u16)ctx->user_port,
	    .proto = IPPROTO_UDP,
	};
	struct lb_result res = {};

	key.addr[0] = ctx->user_ip6[0];
	key.addr[1] = ctx->user_ip6[1];
	key.addr[2] = ctx->user_ip6[2];
	key.addr[3] = ctx->user_ip6[3];
	if (dns_capture(ctx, &key, res.addr, &res.port)) {
		ctx->user_ip6[0] = res.addr[0];
		ctx->user_ip6[1] = res.addr[1];
		ctx->user_ip6[2] = res.addr[2];
		ctx->user_ip6[3] = res.addr[3];
		ctx->user_port = (__u32)res.port;
		return SYS_PROCEED;
	}
	int ret = sendmsg_decide(ctx, &key, &res);
	if (ret < 0)
		return reject(ret);
	if (ret > 0) {
		ctx->user_ip6[0] = res.addr[0];
		ctx->user_ip6[1] = res.addr[1];
		ctx->user_ip6[2] = res.addr[2];
		ctx->user_ip6[3] = res.addr[3];
		ctx->user_port = (__u32)res.port;
	}
	return SYS_PROCEED;
}

/* The VIP a reply from addr:port on an unconnected UDP socket answers (see
 * sendmsg_decide). Returns 1 with addr:port rewritten, or 0. */
static __always_inline int udp_reply_vip(struct bpf_sock_addr *ctx, __u32 addr[4], __u16 *port)
{
	struct udp_affinity *aff = bpf_sk_storage_get(&kmesh_udp, ctx->sk, NULL, 0);
	__u32 vip[4] = {};
	__u16 vip_port = 0;
	__u64 best = 0;

	if (!aff)
		return 0;
	bpf_spin_lock(&aff->lock);
#pragma unroll
	for (int i = 0; i < KMESH_UDP_SLOTS; i++) {
		struct udp_slot *s = &aff->slot[i];
		__u64 seq = 0;

		if (s->seq && s->backend_port == *port && addr_eq(s->backend, addr))
			seq = s->seq;
		else if (s->prev_seq && s->prev_port == *port && addr_eq(s->prev, addr))
			seq = s->prev_seq;
		if (seq > best) {
			best = seq;
			__builtin_memcpy(vip, s->vip, sizeof(vip));
			vip_port = s->vip_port;
		}
	}
	bpf_spin_unlock(&aff->lock);
	if (!best)
		return 0;
	__builtin_memcpy(addr, vip, sizeof(vip));
	*port = vip_port;
	return 1;
}

/* Finds the VIP a peer address stands for on this socket: for unconnected
 * UDP the socket's affinity slots, else (connected sockets) the socket's
 * original destination. No managed check: only sockets we redirected have
 * storage. */
static __always_inline int peer_to_vip(struct bpf_sock_addr *ctx, __u32 addr[4], __u16 *port,
				       int udp)
{
	if (udp && udp_reply_vip(ctx, addr, port))
		return 1;
	struct sock_orig *so = bpf_sk_storage_get(&kmesh_sock_orig, ctx->sk, NULL, 0);
	if (so && so->peer_port == *port && addr_eq(so->peer_addr, addr)) {
		__builtin_memcpy(addr, so->addr, sizeof(so->addr));
		*port = so->port;
		return 1;
	}
	return 0;
}

static __always_inline void peer4(struct bpf_sock_addr *ctx, int udp)
{
	__u32 addr[4];
	__u16 port = (__u16)ctx->user_port;

	addr_set_v4(addr, ctx->user_ip4);
	if (peer_to_vip(ctx, addr, &port, udp)) {
		ctx->user_ip4 = addr[3];
		ctx->user_port = (__u32)port;
		stat_inc(STAT_PEER_REWRITTEN);
	}
}

static __always_inline void peer6(struct bpf_sock_addr *ctx, int udp)
{
	__u32 addr[4] = {
	    ctx->user_ip6[0],
	    ctx->user_ip6[1],
	    ctx->user_ip6[2],
	    ctx->user_ip6[3],
	};
	__u16 port = (__u16)ctx->user_port;

	if (peer_to_vip(ctx, addr, &port, udp)) {
		ctx->user_ip6[0] = addr[0];
		ctx->user_ip6[1] = addr[1];
		ctx->user_ip6[2] = addr[2];
		ctx->user_ip6[3] = addr[3];
		ctx->user_port = (__u32)port;
		stat_inc(STAT_PEER_REWRITTEN);
	}
}

SEC("cgroup/recvmsg4")
int kmesh_recvmsg4(struct bpf_sock_addr *ctx)
{
	peer4(ctx, 1);
	return SYS_PROCEED;
}

SEC("cgroup/recvmsg6")
int kmesh_recvmsg6(struct bpf_sock_addr *ctx)
{
	peer6(ctx, 1);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername4")
int kmesh_getpeer4(struct bpf_sock_addr *ctx)
{
	peer4(ctx, 0);
	return SYS_PROCEED;
}

SEC("cgroup/getpeername6")
int kmesh_getpeer6(struct bpf_sock_addr *ctx)
{
	peer6(ctx, 0);
	return SYS_PROCEED;
}

#define KMESH_SOL_IP	      0
#define KMESH_SO_ORIGINAL_DST 80

struct kmesh_sockaddr_in {
	__u16 family;
	__u16 port; /* network order */
	__u32 addr; /* network order */
	__u8 zero[8];
};

/* getsockopt(SOL_IP, SO_ORIGINAL_DST) on a socket a sidecar accepted: for a
 * connection the sidecar capture redirected (sidecar_capture4), the answer
 * is the destination its client dialled, from kmesh_sidecar_orig, keyed by
 * the client's view of the connection (the accepted socket's, mirrored).
 * The kernel's own answer (conntrack) is kept when it shows a real NAT (an
 * original destination other than the socket's local address): the rules
 * captured that connection, not this program. Every other getsockopt on the
 * node returns at the first test. */
SEC("cgroup/getsockopt")
int kmesh_getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->level != KMESH_SOL_IP || ctx->optname != KMESH_SO_ORIGINAL_DST)
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || sk->family != AF_INET || sk->protocol != IPPROTO_TCP)
		return 1;
	struct kmesh_sockaddr_in *sa = ctx->optval;
	if ((void *)(sa + 1) > ctx->optval_end)
		return 1;
	__u32 local4 = sk->src_ip4;
	__u16 lport = bpf_htons((__u16)sk->src_port);
	__u32 remote4 = sk->dst_ip4;
	__u16 rport = (__u16)sk->dst_port;
	if (ctx->retval == 0 && ctx->optlen >= (int)sizeof(*sa) &&
	    (sa->addr != local4 || sa->port != lport))
		return 1;
	__u32 local[4], remote[4];
	addr_set_v4(local, local4);
	addr_set_v4(remote, remote4);
	struct splice_key k;
	splice_key_set(&k, remote, local, rport, lport, bpf_get_netns_cookie(ctx));
	struct orig_dst *o = bpf_map_lookup_elem(&kmesh_sidecar_orig, &k);
	if (!o)
		return 1;
	__u32 addr = o->addr[3];
	__u16 port = o->port;
	kmesh_barrier();
	/* An LRU element evicted and reused for another connection while we
	 * read it is no longer found under our key. */
	if (bpf_map_lookup_elem(&kmesh_sidecar_orig, &k) != o) {
		stat_inc(STAT_SIDECAR_NO_RECORD);
		return 1;
	}
	sa->family = AF_INET;
	sa->port = port;
	sa->addr = addr;
	__builtin_memset(sa->zero, 0, sizeof(sa->zero));
	/* Two 4-byte stores: the context refuses the 8-byte store the
	 * compiler would merge them into. */
	*(volatile __s32 *)&ctx->optlen = sizeof(*sa);
	*(volatile __s32 *)&ctx->retval = 0;
	stat_inc(STAT_SIDECAR_ORIG);
	return 1;
}
