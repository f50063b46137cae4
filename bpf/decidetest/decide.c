// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//go:build ignore

/* Test-only: runs the data path's connect decision (kmesh_decide.h) through
 * BPF_PROG_RUN with inputs the test chooses, including the load balancer's
 * random numbers, on the product's own maps (loaded with MapReplacements).
 * Never attached; never part of the daemon. */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

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
};

SEC("syscall")
int kmesh_tdecide(struct decide_args *args)
{
	/* Map helpers take keys on the stack, not in the context: copy. */
	struct frontend_key key = args->key;
	struct lb_rand rnd = args->rnd;
	struct decision d = {};

	args->ret = decide(&key, &rnd, &d);
	args->out = d;
	return 0;
}
