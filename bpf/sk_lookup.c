// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* sk_lookup: inbound enforcement in each enrolled pod's network namespace.
 *
 * A TCP connection that reaches an enrolled pod from outside the node
 * proxy (a pod outside the mesh, another node's plaintext, a client that
 * dialled the pod IP without Kmesh) must be seen by the destination's
 * authorization policies (STRICT PeerAuthentication arrives as one). Kmesh
 * enrols pods without iptables, so nothing else would send it to the
 * proxy. This program runs when such a connection's SYN looks for a
 * listening socket; when the destination workload's inbound verdict
 * (backend_value.path_in, decided in ambient/path) says TUNNEL, it hands the
 * connection to the node proxy's 15006 listener in the pod (kmesh_inproxy),
 * which evaluates the policies with the source address and no identity, as
 * ztunnel does. DIRECT leaves the normal lookup alone: pods without
 * policies pay two map lookups per SYN and nothing else.
 *
 * Left alone: the proxy's own ports (HBONE on 15008 carries its own
 * identity), connections from the pod to itself (the proxy's dial to the
 * application behind an inbound tunnel, from the pod's address; anything
 * arriving on the loopback), and kubelet probes SNATed to 169.254.7.127
 * as istio-cni's rules do. Unknown destinations go to the
 * proxy, which refuses what it does not know; with no proxy listener the
 * SYN is dropped (the client retries, and a restarting daemon picks it up).
 * Only TCP: UDP is not authorized at L4 (as with ztunnel). */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "kmesh_consts.h"
#include "kmesh_abi.h"
#include "kmesh_maps.h"
#include "kmesh_lb.h"

char _license[] SEC("license") = "Dual BSD/GPL";

#ifndef AF_INET
#define AF_INET 2
#endif

#define LOOPBACK_IFINDEX 1

/* Inbound verdict of a destination address: the workload's path_in, or
 * PATH_TUNNEL when the address is not a known workload (the proxy decides,
 * and refuses what it does not know). Records are read through the
 * element-reuse checks of kmesh_lb.h; one that changed under us twice is
 * left to the proxy too. */
static __always_inline __u8 inbound_path(const __u32 addr[4])
{
	struct frontend_key fk = {};
	struct frontend_value fe;
	struct backend_copy be;

	__builtin_memcpy(fk.addr, addr, sizeof(fk.addr));
#pragma unroll
	for (int attempt = 0; attempt < 2; attempt++) {
		struct frontend_value *p = bpf_map_lookup_elem(&kmesh_frontend, &fk);
		if (!p)
			return PATH_TUNNEL;
		if (frontend_read(p, &fk, &fe))
			continue;
		if (fe.kind != FRONTEND_WORKLOAD)
			return PATH_TUNNEL;
		int err = backend_read(fe.id, KMESH_FAMILY_V4, &be);
		if (err == -EAGAIN)
			continue;
		if (err)
			return PATH_TUNNEL;
		return be.path_in;
	}
	return PATH_TUNNEL;
}

SEC("sk_lookup")
int kmesh_inbound(struct bpf_sk_lookup *ctx)
{
	struct inbound_key key = {};
	__u32 family = ctx->family;
	__u32 port = ctx->local_port;

	if (ctx->protocol != IPPROTO_TCP || ctx->ingress_ifindex == LOOPBACK_IFINDEX)
		return SK_PASS;
	if (port == KMESH_HBONE_PORT || port == KMESH_INBOUND_PORT || port == KMESH_OUTBOUND_PORT ||
	    port == KMESH_DNS_PORT)
		return SK_PASS;
	/* Read every context field once: the verifier refuses a context
	 * pointer the compiler offsets to share a load between branches. */
	__u32 rip4 = ctx->remote_ip4, lip4 = ctx->local_ip4;
	__u16 rport = ctx->remote_port;
	__u32 rip6[4] = {ctx->remote_ip6[0], ctx->remote_ip6[1], ctx->remote_ip6[2],
			 ctx->remote_ip6[3]};
	__u32 lip6[4] = {ctx->local_ip6[0], ctx->local_ip6[1], ctx->local_ip6[2],
			 ctx->local_ip6[3]};
	if (family == AF_INET) {
		/* The pod to itself (the proxy's dial to the application
		 * behind an inbound tunnel comes from the pod's address) and
		 * kubelet probes SNATed by istio-cni's host rules. */
		if (rip4 == lip4 || rip4 == bpf_htonl(KMESH_PROBE_SNAT_IP4))
			return SK_PASS;
		addr_set_v4(key.addr, lip4);
	} else {
		if (addr_eq(rip6, lip6))
			return SK_PASS;
		__builtin_memcpy(key.addr, lip6, sizeof(key.addr));
	}

	__u8 path = inbound_path(key.addr);
	if (path == PATH_DIRECT)
		return SK_PASS;
	/* A same-node connection the connect program authorized against this
	 * destination's policies (with the identity the kernel attests) is
	 * not authorized again without one at 15006. The tuple was written by
	 * sockops from the client socket's own record; a pod outside the mesh
	 * cannot write it, and a forged SYN with another pod's tuple gets its
	 * SYN-ACK routed to that pod, which resets it. */
	if (path == PATH_TUNNEL) {
		struct authed_key ak = {
		    .src_port = rport, /* already network order in this context */
		    .dst_port = bpf_htons((__u16)port),
		};
		if (family == AF_INET) {
			addr_set_v4(ak.src, rip4);
			addr_set_v4(ak.dst, lip4);
		} else {
			__builtin_memcpy(ak.src, rip6, sizeof(ak.src));
			__builtin_memcpy(ak.dst, lip6, sizeof(ak.dst));
		}
		if (bpf_map_lookup_elem(&kmesh_authed, &ak)) {
			stat_inc(STAT_INBOUND_AUTHED);
			return SK_PASS;
		}
	}
	if (path != PATH_TUNNEL) {
		stat_inc(STAT_PATH_REFUSED);
		return SK_DROP;
	}
	struct bpf_sock *sk = bpf_map_lookup_elem(&kmesh_inproxy, &key);
	if (!sk) {
		stat_inc(STAT_INBOUND_NO_PROXY);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err) {
		stat_inc(STAT_INBOUND_NO_PROXY);
		return SK_DROP;
	}
	stat_inc(STAT_INBOUND_PROXY);
	return SK_PASS;
}
