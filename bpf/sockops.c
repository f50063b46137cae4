// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* sockops: hands the node proxy the original destination of a tunnelled
 * connection.
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

#ifndef AF_INET
#define AF_INET 2
#endif

char _license[] SEC("license") = "Dual BSD/GPL";

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

SEC("sockops")
int kmesh_sockops(struct bpf_sock_ops *skops)
{
	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		record_tunnel(skops);
	return 1;
}
