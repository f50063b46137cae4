/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Splicing: which connection ends go into kmesh_splice and under which key.
 * Shared by sockops.c (insert) and sk_msg.c (find the peer). */
#ifndef KMESH_SPLICE_H
#define KMESH_SPLICE_H

#include <linux/bpf.h>
#include <bpf/bpf_endian.h>
#include "kmesh_abi.h"
#include "kmesh_lb.h"

static __always_inline int splice_addr_loopback(const __u32 a[4])
{
	if (addr_is_v4mapped(a))
		return (bpf_ntohl(a[3]) >> 24) == 127;
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(1);
}

/* Both ends live in one network namespace: loopback, or a pod dialling its
 * own address (the node proxy's dial to the application behind 15006). */
static __always_inline int splice_same_netns(const __u32 local[4], const __u32 remote[4])
{
	return splice_addr_loopback(remote) || addr_eq(local, remote);
}

/* splice_key_set fills k for one end with its own view of the connection;
 * ports in network order. */
static __always_inline void splice_key_set(struct splice_key *k, const __u32 local[4],
					   const __u32 remote[4], __u16 lport, __u16 rport,
					   __u64 netns_cookie)
{
	__builtin_memcpy(k->local, local, sizeof(k->local));
	__builtin_memcpy(k->remote, remote, sizeof(k->remote));
	k->local_port = lport;
	k->remote_port = rport;
	k->pad = 0;
	k->netns_cookie = splice_same_netns(local, remote) ? netns_cookie : 0;
}

#endif
