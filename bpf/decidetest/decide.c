// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Test-only: runs the data path's connect decision (kmesh_decide.h) through
 * BPF_PROG_RUN with inputs the test chooses, including the load balancer's
 * random numbers, on the product's own maps (loaded with MapReplacements).
 * Never attached; never part of the daemon. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* How long (bpf_loop iterations) each read of a record waits between its
 * lookup and its copy: kmesh_thammer sets it for its run, so that a writer
 * on another CPU frees and reuses elements inside the window. 0 otherwise. */
__u32 reuse_window;

static long spin(__u32 i, void *ctx)
{
	return 0;
}

#define KMESH_AFTER_LOOKUP() bpf_loop(reuse_window, spin, NULL, 0)

#include "kmesh_consts.h"
#include "kmesh_abi.h"
#include "kmesh_maps.h"
#include "kmesh_lb.h"
#include "kmesh_decide.h"

char _license[] SEC("license") = "Dual BSD/GPL";

/* The program's context: inputs, then what decide() answered. */
struct decide_args {
	struct frontend_key key;
	struct lb_rand rnd;
	struct decision out;
	__s32 ret;
	__u32 src_id; /* nonzero: finish a PATH_AUTHZ verdict as the connect
		       * program does for a pod whose workload is src_id */
};

SEC("syscall")
int kmesh_tdecide(struct decide_args *args)
{
	/* Map helpers take keys on the stack, not in the context: copy. */
	struct frontend_key key = args->key;
	struct lb_rand rnd = args->rnd;
	struct decision d = {};

	__u32 src_id = args->src_id;

	int ret = decide(&key, &rnd, &d);
	if (!ret && src_id)
		ret = authz_decide(&d, src_id);
	args->ret = ret;
	args->out = d;
	return 0;
}

/* kmesh_thammer's context: decide key `runs` times with random numbers,
 * `window` iterations between each lookup and its copy, and count what came
 * out. A decision is foreign when it rewrote the destination to anything but
 * an IPv4 address in [lo, hi] (host order) and port `port`: a backend the
 * service being decided never had. */
struct hammer_args {
	struct frontend_key key;
	__u32 lo, hi;
	__u16 port; /* host order */
	__u16 pad;
	__u32 runs;
	__u32 window;
	__u32 ok, refused, foreign;
	__u32 foreign_addr; /* the last foreign decision (network order) and its port */
	__u16 foreign_port;
	__u16 pad2;
};

struct hammer_state {
	struct frontend_key key;
	__u32 lo, hi, port;
	__u32 ok, refused, foreign;
	__u32 foreign_addr, foreign_port;
};

static long hammer_one(__u32 i, void *ctx)
{
	struct hammer_state *st = ctx;
	struct frontend_key key = st->key;
	struct lb_rand rnd = {.slot = bpf_get_prandom_u32(), .coin = bpf_get_prandom_u32()};
	struct decision d = {};

	if (decide(&key, &rnd, &d)) {
		st->refused++;
		return 0;
	}
	__u32 a = bpf_ntohl(d.addr[3]);
	if (d.rewritten && addr_is_v4mapped(d.addr) && a >= st->lo && a <= st->hi &&
	    bpf_ntohs(d.port) == st->port) {
		st->ok++;
		return 0;
	}
	st->foreign++;
	st->foreign_addr = d.addr[3];
	st->foreign_port = d.port;
	return 0;
}

SEC("syscall")
int kmesh_thammer(struct hammer_args *args)
{
	struct hammer_state st = {
	    .key = args->key,
	    .lo = args->lo,
	    .hi = args->hi,
	    .port = args->port,
	};

	reuse_window = args->window;
	bpf_loop(args->runs, hammer_one, &st, 0);
	reuse_window = 0;
	args->ok = st.ok;
	args->refused = st.refused;
	args->foreign = st.foreign;
	args->foreign_addr = st.foreign_addr;
	args->foreign_port = (__u16)st.foreign_port;
	return 0;
}
