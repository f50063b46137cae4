/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Constants shared by every Kmesh BPF program. Values that user space also
 * needs are mirrored in bpf/types.go; TestABIConstants keeps the two equal. */
#ifndef KMESH_CONSTS_H
#define KMESH_CONSTS_H

/* Program verdicts for cgroup hooks: the kernel reads 1 as "let the syscall
 * continue" and 0 as "fail it" (with the errno set by bpf_set_retval). */
#define SYS_PROCEED 1
#define SYS_REJECT  0

/* Locality ranks per service. Rank 0 is the best match for this node; user
 * space ranks endpoints by how many routing-preference scopes they share with
 * the node (Istio has six scopes, so seven ranks), STRICT keeps only rank 0. */
#define KMESH_MAX_RANKS 8

/* Address families index the per-family endpoint tables. */
#define KMESH_FAMILY_V4 0
#define KMESH_FAMILY_V6 1
#define KMESH_FAMILIES	2

/* frontend_value.kind */
#define FRONTEND_SERVICE  1 /* a service VIP:port, load-balanced */
#define FRONTEND_WORKLOAD 2 /* a workload IP (any port), addressed directly */

/* frontend_value.flags */
#define FRONTEND_F_PASSTHROUGH 0x1 /* LB mode PASSTHROUGH: keep the original destination */
#define FRONTEND_F_WAYPOINT    0x2 /* the service's traffic goes through its waypoint */

/* backend_value.flags */
#define BACKEND_F_HBONE	   0x1 /* the workload accepts HBONE on 15008 */
#define BACKEND_F_LOCAL	   0x2 /* the workload runs on this node */
#define BACKEND_F_WAYPOINT 0x4 /* traffic addressed to the workload goes through its waypoint */

/* sock_orig.flags and tunnel_value.flags */
#define ORIG_F_TUNNEL	0x1 /* sent to the node proxy's outbound listener */
#define ORIG_F_WAYPOINT 0x2 /* ... to reach a waypoint (no backend chosen here) */

/* The node proxy (kmesh-daemon's tunnel): its sockets carry this mark, as
 * ztunnel's do (istio-cni's rules know it too), and the kernel path leaves
 * them alone. Connections that need HBONE are sent to its outbound listener
 * on the pod's own loopback. */
#define KMESH_PROXY_MARK    0x539
#define KMESH_OUTBOUND_PORT 15001
#define KMESH_HBONE_PORT    15008

/* service_value.mode (for dumps; the kernel acts on ranks, not on the mode) */
#define LB_MODE_STANDARD    0
#define LB_MODE_STRICT	    1
#define LB_MODE_FAILOVER    2
#define LB_MODE_PASSTHROUGH 3

/* Counters in the kmesh_stats per-CPU array. */
enum kmesh_stat {
	STAT_LB_SERVICE = 0,	      /* connect/sendmsg rewritten to a service endpoint */
	STAT_LB_NO_ENDPOINT = 1,      /* service without a usable endpoint: refused */
	STAT_LB_NO_FAMILY = 2,	      /* endpoint lacks an address of the socket's family */
	STAT_LB_RETRY = 3,	      /* endpoint table changed under us, picked again */
	STAT_LB_PASSTHROUGH = 4,      /* PASSTHROUGH service left untouched */
	STAT_WORKLOAD_DIRECT = 5,     /* connect to a known workload IP */
	STAT_PEER_REWRITTEN = 6,      /* getpeername/recvmsg answered with the VIP */
	STAT_STORAGE_FAIL = 7,	      /* no socket storage: peer name cannot be restored */
	STAT_UDP_AFFINITY = 8,	      /* UDP datagram sent to the backend already chosen */
	STAT_TUNNEL = 9,	      /* connect sent to the node proxy for HBONE */
	STAT_TUNNEL_NO_ORIG = 10,     /* no socket storage for a tunnelled connect: refused */
	STAT_TUNNEL_RECORD = 11,      /* sockops recorded a tunnelled connection */
	STAT_TUNNEL_RECORD_FAIL = 12, /* ... but the map update failed */
	STAT_MAX = 16,
};

#endif
