// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* sockops: hands the node proxy the original destination of a tunnelled
 * connection, and reports the kernel path's connections to the daemon.
 *
 * connect4/6 send a connection that needs HBONE to the proxy's outbound
 * listener on the pod's loopback and keep what the application dialled in
 * the socket's storage. The proxy only sees the accepted end, a different
 * socket, so when the client's connect completes (ACTIVE_ESTABLISHED, before
 * the final ACK reaches the listener) this copies the destination into
 * kmesh_tunnel under the client's address and port in that namespace, where
 * the proxy looks it up on accept. The record carries the verdict (TUNNEL
 * or WAYPOINT) the connect followed: the proxy obeys it and never falls back
 * to plaintext.
 *
 * Telemetry. Connections of enrolled pods that do not pass through the node
 * proxy (the kernel path) are invisible to it, so this reports them: for
 * such a socket it turns on the TCP state callback (BPF_SOCK_OPS_STATE_CB)
 * when the pod connects (TCP_CONNECT_CB: a connect that fails is reported
 * too) or accepts (PASSIVE_ESTABLISHED_CB), and queues a conn_event in the
 * kmesh_events ring buffer when it is established and when it reaches
 * TCP_CLOSE, with the bytes the socket sent (acked) and received. Nothing
 * runs per packet: the state callback fires about five times in a
 * connection's life. Long-lived connections' bytes are read between events
 * by the daemon (sock_diag, every few seconds), not here, so no per-ACK
 * callback (RTT_CB) is needed. A full ring buffer drops the event and counts
 * it; the connection never waits.
 *
 * Splicing. When both ends of a connection are on this node, each end is
 * put into kmesh_splice as it becomes established (the connecting end at
 * ACTIVE_ESTABLISHED, the accepted one at PASSIVE_ESTABLISHED), and sk_msg.c
 * moves every send straight into the peer (see there). Which ends: in an
 * enrolled pod's namespace, or one opted in through kmesh_splice_ns,
 * connections inside the namespace (loopback: the application and the node
 * proxy's 15001; the proxy's dial to the application behind 15006; the
 * application and its sidecar); and, from an enrolled pod, connections to
 * and from another mesh workload on this node (the kernel path), inserted
 * only under the pod's own address, so a socket can only be found as the
 * peer of a connection its own pod is an end of. An end that carried bytes
 * before it was established (TCP Fast Open) is not spliced. A full map (or
 * a key taken) leaves the connection on TCP, counted.
 *
 * The maps are the ones sock_addr.c defines and the loader creates: this
 * object is loaded with those very maps substituted (MapReplacements). */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "kmesh_consts.h"
#include "kmesh_abi.h"
#include "kmesh_maps.h"
#include "kmesh_lb.h"
#include "kmesh_splice.h"

#ifndef AF_INET
#define AF_INET 2
#endif

char _license[] SEC("license") = "Dual BSD/GPL";

/* Puts struct conn_event into the object's BTF, for bpf2go's generated Go
 * type (a type only reached through bpf_ringbuf_reserve is not emitted). */
const struct conn_event *conn_event_btf __attribute__((unused));

static __always_inline void record_tunnel(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	struct sock_orig *so = bpf_sk_storage_get(&kmesh_sock_orig, sk, NULL, 0);
	if (!so || (so->path != PATH_TUNNEL && so->path != PATH_WAYPOINT))
		return;

	struct tunnel_key k = {
	    .netns_cookie = bpf_get_netns_cookie(skops),
	    /* local_port is in host order; everything else in the maps is not. */
	    .port = bpf_htons((__u16)skops->local_port),
	};
	/* Read every context field once, up front: the verifier refuses a
	 * context pointer the compiler offset to share one load between the
	 * branches below. */
	__u32 family = skops->family;
	__u32 ip4 = skops->local_ip4;
	__u32 ip6[4] = {skops->local_ip6[0], skops->local_ip6[1], skops->local_ip6[2],
			skops->local_ip6[3]};
	if (family == AF_INET) {
		addr_set_v4(k.addr, ip4);
	} else {
		/* A dual-stack socket dialling IPv4 has a v4-mapped local address
		 * already: the same key the proxy builds from its peer address. */
		__builtin_memcpy(k.addr, ip6, sizeof(k.addr));
	}
	struct tunnel_value v = {
	    .port = so->port,
	    .path = so->path,
	    .backend_port = so->backend_port,
	};
	__builtin_memcpy(v.addr, so->addr, sizeof(v.addr));
	__builtin_memcpy(v.backend_addr, so->backend_addr, sizeof(v.backend_addr));
	if (bpf_map_update_elem(&kmesh_tunnel, &k, &v, BPF_ANY))
		stat_inc(STAT_TUNNEL_RECORD_FAIL);
	else
		stat_inc(STAT_TUNNEL_RECORD);
}

/* A socket's addresses, read from the context once (see record_tunnel). */
struct conn_tuple {
	__u32 local[4];
	__u32 remote[4];
	__u16 local_port; /* network order */
	__u16 remote_port;
};

/* Same-node authorization at connect (PATH_AUTHZ allowed, sock_addr.c): as
 * the SYN is about to leave, the connection's 4-tuple goes into
 * kmesh_authed, where the destination pod's inbound program (sk_lookup.c)
 * finds it and lets it reach the application rather than the proxy's 15006.
 * Only these programs write the map, from a record only the connect program
 * writes (socket storage). At TCP_CLOSE the entry goes (when the state
 * callback is on; otherwise it ages out of the LRU). */
static __always_inline void record_authed(struct bpf_sock_ops *skops, const struct conn_tuple *t,
					  int add)
{
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	struct sock_orig *so = bpf_sk_storage_get(&kmesh_sock_orig, sk, NULL, 0);
	if (!so || so->path != PATH_AUTHZ)
		return;
	struct authed_key k = {
	    .src_port = t->local_port,
	    .dst_port = t->remote_port,
	};
	__builtin_memcpy(k.src, t->local, sizeof(k.src));
	__builtin_memcpy(k.dst, t->remote, sizeof(k.dst));
	if (add) {
		__u32 one = 1;
		bpf_map_update_elem(&kmesh_authed, &k, &one, BPF_ANY);
	} else {
		bpf_map_delete_elem(&kmesh_authed, &k);
	}
}

/* Context fields are loaded through volatile pointers, each exactly once
 * and up front: otherwise the compiler sinks them into the branches below
 * and offsets the context pointer to share one load, which the verifier
 * refuses. */
#define CTX_U32(f) (*(volatile __u32 *)&skops->f)

static __always_inline void read_tuple(struct bpf_sock_ops *skops, struct conn_tuple *t)
{
	__u32 family = CTX_U32(family);
	__u32 l4 = CTX_U32(local_ip4);
	__u32 r4 = CTX_U32(remote_ip4);
	__u32 l6[4] = {CTX_U32(local_ip6[0]), CTX_U32(local_ip6[1]), CTX_U32(local_ip6[2]),
		       CTX_U32(local_ip6[3])};
	__u32 r6[4] = {CTX_U32(remote_ip6[0]), CTX_U32(remote_ip6[1]), CTX_U32(remote_ip6[2]),
		       CTX_U32(remote_ip6[3])};
	__u32 lport = CTX_U32(local_port);
	__u32 rport = CTX_U32(remote_port);

	/* local_port is host order; remote_port is the network-order port
	 * shifted into the upper half (bpf_ntohl gives it in host order). */
	t->local_port = bpf_htons((__u16)lport);
	t->remote_port = bpf_htons((__u16)bpf_ntohl(rport));
	if (family == AF_INET) {
		addr_set_v4(t->local, l4);
		addr_set_v4(t->remote, r4);
	} else {
		__builtin_memcpy(t->local, l6, sizeof(t->local));
		__builtin_memcpy(t->remote, r6, sizeof(t->remote));
	}
}

/* Sidecar capture (sock_addr.c: sidecar_capture4): when a connect it
 * redirected is established (before its ACK lets the sidecar accept), the
 * original destination goes into kmesh_sidecar_orig under the connecting
 * end's view of the connection, where the sidecar's SO_ORIGINAL_DST finds
 * it; the socket gets the state callback so that the entry goes when it
 * closes. Returns whether the socket is such a connect. */
static __always_inline int record_sidecar(struct bpf_sock_ops *skops, const struct conn_tuple *t,
					  int add)
{
	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return 0;
	struct sock_orig *so = bpf_sk_storage_get(&kmesh_sock_orig, sk, NULL, 0);
	if (!so || so->path != PATH_SIDECAR)
		return 0;
	struct splice_key k;
	splice_key_set(&k, t->local, t->remote, t->local_port, t->remote_port,
		       bpf_get_netns_cookie(skops));
	if (!add) {
		bpf_map_delete_elem(&kmesh_sidecar_orig, &k);
		return 1;
	}
	struct orig_dst v = {.port = so->port};
	__builtin_memcpy(v.addr, so->addr, sizeof(v.addr));
	/* LRU: never full (kmesh_maps.h). A failure would leave the sidecar
	 * with the kernel's answer (its own listener): counted. */
	if (bpf_map_update_elem(&kmesh_sidecar_orig, &k, &v, BPF_ANY))
		stat_inc(STAT_SIDECAR_NO_RECORD);
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

/* The node proxy's ports in a pod: connections to them are the tunnel
 * path's, which the proxy reports itself. */
static __always_inline int is_proxy_port(__u16 port)
{
	return port == bpf_htons(KMESH_OUTBOUND_PORT) || port == bpf_htons(KMESH_INBOUND_PORT) ||
	       port == bpf_htons(KMESH_HBONE_PORT) || port == bpf_htons(KMESH_DNS_PORT);
}

/* Telemetry's per-socket state is the callback flags themselves (no socket
 * storage to allocate): STATE_CB on a tracked socket, and on an accepted
 * one also RTO_CB, which marks it inbound for its close event (that
 * callback fires only on a retransmission timeout, where it returns at
 * once). */
#define CONN_TRACKED BPF_SOCK_OPS_STATE_CB_FLAG
#define CONN_INBOUND BPF_SOCK_OPS_RTO_CB_FLAG

/* Whether a pod's socket is on the kernel path and worth reporting: the
 * pod is enrolled, the socket is not the node proxy's (its connections are
 * reported by the proxy), and the peer is not on the pod's loopback (the
 * tunnel's redirect to 15001 lands there; loopback never crosses the
 * mesh). Accepted sockets are also not the proxy's listeners, and not
 * connections from the pod's own address (the proxy's dial to the
 * application behind an inbound tunnel). */
static __always_inline int conn_tracked(struct bpf_sock_ops *skops, const struct conn_tuple *t,
					int inbound, __u32 *backend_id)
{
	__u64 cookie = bpf_get_netns_cookie(skops);
	struct managed_value *mv = bpf_map_lookup_elem(&kmesh_managed, &cookie);

	if (!mv)
		return 0;
	if (addr_is_loopback(t->remote))
		return 0;
	if (inbound) {
		if (is_proxy_port(t->local_port) || addr_eq(t->local, t->remote))
			return 0;
	} else if (skops->sk && bpf_sk_storage_get(&kmesh_proxy_sk, skops->sk, NULL, 0)) {
		return 0;
	}
	*backend_id = mv->backend_id;
	return 1;
}

static __always_inline void conn_emit(struct bpf_sock_ops *skops, const struct conn_tuple *t,
				      __u8 kind, __u8 old_state, __u32 backend_id)
{
	__u32 flags = skops->bpf_sock_ops_cb_flags;
	struct conn_event *e = bpf_ringbuf_reserve(&kmesh_events, sizeof(*e), 0);

	if (!e) {
		stat_inc(STAT_CONN_EVENT_DROP);
		return;
	}
	e->sock_cookie = bpf_get_socket_cookie(skops);
	e->netns_cookie = bpf_get_netns_cookie(skops);
	e->ts_ns = bpf_ktime_get_ns();
	e->bytes_acked = skops->bytes_acked;
	e->bytes_received = skops->bytes_received;
	/* Spliced bytes bypassed TCP: a spliced socket's counters are TCP's
	 * (the handshake, the FIN, anything sent before splicing) plus what
	 * sk_msg redirected from and into it (kmesh_maps.h). */
	struct bpf_sock *sk = skops->sk;
	if (sk) {
		__u64 *tx = bpf_sk_storage_get(&kmesh_splice_tx, sk, NULL, 0);
		if (tx) {
			e->bytes_acked += *tx;
			struct splice_key k;
			splice_key_set(&k, t->local, t->remote, t->local_port, t->remote_port,
				       e->netns_cookie);
			__u64 *rx = bpf_map_lookup_elem(&kmesh_splice_rx, &k);
			if (rx) {
				e->bytes_received += *rx;
				if (kind == CONN_EV_CLOSE)
					bpf_map_delete_elem(&kmesh_splice_rx, &k);
			}
		}
	}
	__builtin_memcpy(e->local_addr, t->local, sizeof(e->local_addr));
	__builtin_memcpy(e->remote_addr, t->remote, sizeof(e->remote_addr));
	e->local_port = t->local_port;
	e->remote_port = t->remote_port;
	__builtin_memset(e->orig_addr, 0, sizeof(e->orig_addr));
	e->orig_port = 0;
	e->kind = kind;
	e->direction = (flags & CONN_INBOUND) ? CONN_DIR_INBOUND : CONN_DIR_OUTBOUND;
	e->old_state = old_state;
	e->pad0 = 0;
	e->pad1 = 0;
	e->backend_id = backend_id;
	if (e->direction == CONN_DIR_OUTBOUND && skops->sk) {
		struct sock_orig *so = bpf_sk_storage_get(&kmesh_sock_orig, skops->sk, NULL, 0);
		if (so) {
			__builtin_memcpy(e->orig_addr, so->addr, sizeof(e->orig_addr));
			e->orig_port = so->port;
		}
	}
	/* No wakeup per event: a wakeup (irq_work, then the reader's epoll)
	 * costs more than the rest of this program, and the reader drains
	 * the ring on its own every 100 ms. Only each further 64 KiB queued
	 * (a burst of short connections) wakes it early: once per step, not
	 * per event, so a ring nobody drains (the daemon down) costs no
	 * wakeups either. The step test is approximate under concurrent
	 * producers; the 100 ms poll covers a missed one. */
	__u64 avail = bpf_ringbuf_query(&kmesh_events, BPF_RB_AVAIL_DATA);
	__u64 wake = avail >= KMESH_EVENTS_WAKE_BYTES &&
			     (avail & (KMESH_EVENTS_WAKE_BYTES - 1)) < sizeof(*e) + 8
			 ? BPF_RB_FORCE_WAKEUP
			 : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, wake);
	stat_inc(STAT_CONN_EVENT);
}

/* Splicing of enrolled pods' connections (set to 1 at load by the daemon's
 * KMESH_SPLICE=true). Off by default: an application that reads a spliced
 * socket with splice(2) gets the FIN without the bytes on Linux 6.18
 * (tcp_splice_read reads only the TCP receive queue, not the psock's), so
 * the operator opts in; or namespaces opt in one by one (kmesh_splice_ns). */
const volatile __u32 cfg_splice = 0;

/* A leg between two sidecar-captured pods of this node (SPLICE_NS_SIDECAR):
 * one sidecar's dial to the other's 15006, which the capture made at connect
 * so that no NAT rewrote it. Spliced under the pod's own address (the end
 * is the pod kmesh_sidecar names at that address) and only to another such
 * pod, on 15006: the key's 4-tuple is then the connection's on both ends. */
static __always_inline int sidecar_pair(const struct conn_tuple *t, __u64 cookie)
{
	if (t->local_port != bpf_htons(KMESH_INBOUND_PORT) &&
	    t->remote_port != bpf_htons(KMESH_INBOUND_PORT))
		return 0;
	struct sidecar_key k;
	__builtin_memcpy(k.addr, t->local, sizeof(k.addr));
	struct sidecar_value *v = bpf_map_lookup_elem(&kmesh_sidecar, &k);
	if (!v || v->netns_cookie != cookie)
		return 0;
	__builtin_memcpy(k.addr, t->remote, sizeof(k.addr));
	v = bpf_map_lookup_elem(&kmesh_sidecar, &k);
	return v && v->netns_cookie != cookie;
}

/* Whether the connection with tuple t is spliced from this end: see the
 * file comment. */
static __always_inline int splice_wanted(struct bpf_sock_ops *skops, const struct conn_tuple *t,
					 __u64 cookie)
{
	__u32 *nsp = bpf_map_lookup_elem(&kmesh_splice_ns, &cookie);
	__u32 ns = nsp ? *nsp : 0;

	/* The default (splicing off, no namespace opted in) costs every
	 * connection of the node this one lookup. */
	if (!cfg_splice && !ns)
		return 0;
	struct managed_value *mv = bpf_map_lookup_elem(&kmesh_managed, &cookie);
	if (splice_same_netns(t->local, t->remote))
		return (cfg_splice && mv) || (ns & SPLICE_NS_INPOD);
	if (ns & SPLICE_NS_SIDECAR)
		return sidecar_pair(t, cookie);
	if (!mv || !(cfg_splice || (ns & SPLICE_NS_PEERS)))
		return 0;
	int family = addr_is_v4mapped(t->local) ? KMESH_FAMILY_V4 : KMESH_FAMILY_V6;
	struct backend_copy own;
	if (backend_read(mv->backend_id, family, &own) || !addr_eq(own.addr, t->local))
		return 0;
	/* The remote end must be a mesh workload on this node, else the
	 * socket would only pay for a redirect that never finds its peer. */
	struct frontend_key fk = {};
	__builtin_memcpy(fk.addr, t->remote, sizeof(fk.addr));
	struct frontend_value *fe = bpf_map_lookup_elem(&kmesh_frontend, &fk);
	if (!fe)
		return 0;
	__u32 id = KMESH_READ(fe->id);
	__u8 kind = KMESH_READ(fe->kind);
	if (kind != FRONTEND_WORKLOAD)
		return 0;
	struct backend_value *be = bpf_map_lookup_elem(&kmesh_backend, &id);
	if (!be)
		return 0;
	__u32 flags = KMESH_READ(be->flags);
	kmesh_barrier();
	if (KMESH_READ(be->id) != id)
		return 0;
	return (flags & (BACKEND_F_LOCAL | BACKEND_F_HBONE)) == (BACKEND_F_LOCAL | BACKEND_F_HBONE);
}

static __always_inline void splice_insert(struct bpf_sock_ops *skops, const struct conn_tuple *tp,
					  int tracked)
{
	__u64 cookie = bpf_get_netns_cookie(skops);

	/* Bytes already through TCP (Fast Open data in the SYN) would be
	 * overtaken by redirected ones. bytes_acked counts the SYN itself
	 * (snd_una moved past it). */
	if (skops->bytes_received || skops->bytes_acked > 1)
		return;
	if (!splice_wanted(skops, tp, cookie))
		return;
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return;
	__u32 *st = bpf_sk_storage_get(&kmesh_splice_sk, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		stat_inc(STAT_SPLICE_FULL);
		return;
	}
	struct splice_key k;
	splice_key_set(&k, tp->local, tp->remote, tp->local_port, tp->remote_port, cookie);
	/* A reported socket counts its redirected bytes (sk_msg.c), which its
	 * events add to TCP's. Created before the socket enters the map, so
	 * its first redirected byte is counted; without it (no memory) the
	 * socket is not spliced: its bytes would go unreported. */
	if (tracked) {
		__u64 *tx =
		    bpf_sk_storage_get(&kmesh_splice_tx, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE);
		__u64 zero = 0;
		/* An entry a previous connection of this tuple left (a late
		 * count after its close) must not be added to this one. */
		if (!tx || bpf_map_update_elem(&kmesh_splice_rx, &k, &zero, BPF_ANY)) {
			*st = SPLICE_TCP;
			stat_inc(STAT_SPLICE_FULL);
			return;
		}
	}
	/* The budget's count (kmesh_maps.h): without it the socket's sends
	 * could not be bounded, so it is not spliced. */
	if (!bpf_sk_storage_get(&kmesh_splice_sent, sk, NULL, BPF_SK_STORAGE_GET_F_CREATE)) {
		*st = SPLICE_TCP;
		stat_inc(STAT_SPLICE_FULL);
		return;
	}
	if (bpf_sock_hash_update(skops, &kmesh_splice, &k, BPF_NOEXIST)) {
		*st = SPLICE_TCP;
		stat_inc(STAT_SPLICE_FULL);
		return;
	}
	stat_inc(STAT_SPLICE_INSERT);
}

/* Kernel-path connection reporting (set to 0 at load by the daemon's
 * KMESH_CONN_EVENTS=false): off, no socket gets STATE_CB and nothing goes
 * into kmesh_events. */
const volatile __u32 cfg_conn_events = 1;

SEC("sockops")
int kmesh_sockops(struct bpf_sock_ops *skops)
{
	struct conn_tuple t;
	__u32 backend_id = 0;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		read_tuple(skops, &t);
		record_authed(skops, &t, 1);
		if (cfg_conn_events && conn_tracked(skops, &t, 0, &backend_id))
			bpf_sock_ops_cb_flags_set(skops,
						  skops->bpf_sock_ops_cb_flags | CONN_TRACKED);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: {
		int tracked = skops->bpf_sock_ops_cb_flags & CONN_TRACKED;
		record_tunnel(skops);
		read_tuple(skops, &t);
		record_sidecar(skops, &t, 1);
		splice_insert(skops, &t, tracked);
		if (tracked)
			conn_emit(skops, &t, CONN_EV_OPEN, 0, 0);
		break;
	}
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: {
		read_tuple(skops, &t);
		int tracked = cfg_conn_events && conn_tracked(skops, &t, 1, &backend_id);
		splice_insert(skops, &t, tracked);
		if (tracked) {
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							     CONN_TRACKED | CONN_INBOUND);
			conn_emit(skops, &t, CONN_EV_OPEN, 0, backend_id);
		}
		break;
	}
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE) {
			read_tuple(skops, &t);
			/* A sidecar pod's socket is never a tracked one (not
			 * enrolled): its callback was for the record alone. */
			if (record_sidecar(skops, &t, 0))
				break;
			record_authed(skops, &t, 0);
			conn_emit(skops, &t, CONN_EV_CLOSE, (__u8)skops->args[0], 0);
		}
		break;
	}
	return 1;
}
