// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* sk_msg: moves each send of a spliced socket straight into its peer's
 * receive queue, skipping TCP, IP and the (veth or loopback) device.
 *
 * sockops.c inserts both ends of a connection whose two ends are on this
 * node into kmesh_splice, each under its own view of the 4-tuple; the map
 * runs this program on every sendmsg (and sendfile/splice: MSG_SPLICE_PAGES)
 * of a socket in it. The peer's key is the sender's with local and remote
 * swapped. bpf_msg_redirect_hash(BPF_F_INGRESS) queues the bytes on the
 * peer's psock (the peer's recvmsg and poll read that queue first), so the
 * transfer is synchronous: bytes sent before a shutdown(SHUT_WR) are queued
 * before the FIN leaves, and the peer reads them, then EOF.
 *
 * Ordering. A direction is either all redirected or all TCP: the peer reads
 * its psock queue before its TCP receive queue, so bytes redirected after
 * bytes sent through TCP could overtake them. The choice is made at the
 * socket's first send (its peer is in the map, or not: the accepting end
 * enters when the final ACK is processed, which can come after the client's
 * first send) and kept in kmesh_splice_sk for the socket's life. A
 * redirected socket whose peer has left the map (closed) sends through TCP,
 * which then answers with a reset as it would without splicing.
 *
 * Budget. The kernel does not bound what waits at the peer (kmesh_maps.h:
 * kmesh_splice_sent), so each direction redirects at most
 * cfg_splice_budget bytes and then goes to TCP for the rest of the
 * connection, whose flow control blocks a writer that outruns its reader.
 * That switch keeps the order: the peer reads its psock queue (the older,
 * redirected bytes) before its TCP queue. At most the budget plus TCP's own
 * buffers wait at a reader, as without splicing. */
#include <linux/bpf.h>
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

#define MSG_U32(f) (*(volatile __u32 *)&msg->f)

/* Bytes one direction may redirect (set at load from Config.SpliceBudget). */
const volatile __u64 cfg_splice_budget = 16 << 20;

/* Telemetry of spliced bytes (kmesh_maps.h): a reported socket (sockops
 * created its kmesh_splice_tx) counts what it sends, and what its peer
 * receives under the peer's key: the peer's close event comes from the
 * peer's own sockops callback, possibly after this socket is gone, and
 * this program cannot hold the peer socket (no bpf_sk_release here).
 * Sockets nobody reports (in-pod legs, sidecars) pay one lookup. */
static __always_inline void count_bytes(struct bpf_sock *sk, const struct splice_key *peer,
					__u32 size)
{
	__u64 *tx = bpf_sk_storage_get(&kmesh_splice_tx, sk, NULL, 0);

	if (!tx)
		return;
	__sync_fetch_and_add(tx, size);
	__u64 *rx = bpf_map_lookup_elem(&kmesh_splice_rx, peer);
	if (!rx) {
		__u64 zero = 0;
		bpf_map_update_elem(&kmesh_splice_rx, peer, &zero, BPF_NOEXIST);
		rx = bpf_map_lookup_elem(&kmesh_splice_rx, peer);
		if (!rx)
			return;
	}
	__sync_fetch_and_add(rx, size);
}

SEC("sk_msg")
int kmesh_sk_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;

	if (!sk)
		return SK_PASS;
	/* Created by sockops when it inserted the socket: without it, no
	 * redirect (the direction's choice could not be kept). */
	__u32 *st = bpf_sk_storage_get(&kmesh_splice_sk, sk, NULL, 0);
	if (!st || *st == SPLICE_TCP)
		return SK_PASS;

	__u32 family = MSG_U32(family);
	__u32 l4 = MSG_U32(local_ip4);
	__u32 r4 = MSG_U32(remote_ip4);
	__u32 l6[4] = {MSG_U32(local_ip6[0]), MSG_U32(local_ip6[1]), MSG_U32(local_ip6[2]),
		       MSG_U32(local_ip6[3])};
	__u32 r6[4] = {MSG_U32(remote_ip6[0]), MSG_U32(remote_ip6[1]), MSG_U32(remote_ip6[2]),
		       MSG_U32(remote_ip6[3])};
	__u32 lport = MSG_U32(local_port);
	__u32 rport = MSG_U32(remote_port);
	__u32 size = MSG_U32(size);
	__u32 local[4], remote[4];

	if (family == AF_INET) {
		addr_set_v4(local, l4);
		addr_set_v4(remote, r4);
	} else {
		__builtin_memcpy(local, l6, sizeof(local));
		__builtin_memcpy(remote, r6, sizeof(remote));
	}
	/* The peer's key: its local is our remote. */
	struct splice_key peer;
	splice_key_set(&peer, remote, local, bpf_htons((__u16)bpf_ntohl(rport)),
		       bpf_htons((__u16)lport), bpf_get_netns_cookie(msg));

	__u64 *sent = bpf_sk_storage_get(&kmesh_splice_sent, sk, NULL, 0);
	if (!sent)
		goto tcp;
	if (*sent + size > cfg_splice_budget) {
		*st = SPLICE_TCP;
		stat_inc(STAT_SPLICE_BUDGET);
		return SK_PASS;
	}
	if (bpf_msg_redirect_hash(msg, &kmesh_splice, &peer, BPF_F_INGRESS) == SK_PASS) {
		/* Sends of one socket run under its lock: no race here. */
		*sent += size;
		if (*st == SPLICE_UNDECIDED)
			*st = SPLICE_REDIRECT;
		stat_add(STAT_SPLICE_BYTES, size);
		count_bytes(sk, &peer, size);
		return SK_PASS;
	}
tcp:
	if (*st == SPLICE_UNDECIDED) {
		*st = SPLICE_TCP;
		stat_inc(STAT_SPLICE_NO_PEER);
	}
	return SK_PASS;
}
