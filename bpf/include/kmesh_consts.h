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

/* VIP:ports one unconnected UDP socket keeps affinity (and reply sources)
 * for at once; the least recently used slot is reused beyond that. */
#define KMESH_UDP_SLOTS 8

/* Address families index the per-family endpoint tables. */
#define KMESH_FAMILY_V4 0
#define KMESH_FAMILY_V6 1
#define KMESH_FAMILIES	2

/* frontend_value.kind */
#define FRONTEND_SERVICE  1 /* a service VIP:port, load-balanced */
#define FRONTEND_WORKLOAD 2 /* a workload IP (any port), addressed directly */

/* Path verdicts. User space decides, once, how a connection to each
 * destination travels (ambient/path.Decide) and writes the verdict into the
 * records the kernel reads: frontend_value.path for a service port,
 * backend_value.path_* for a workload. The programs act on the verdict and
 * never re-derive it. 0 is REFUSE, so a record nobody filled in fails
 * closed. */
#define PATH_REFUSE	 0 /* fail the connect with ECONNREFUSED */
#define PATH_DIRECT	 1 /* kernel path: straight to a mesh workload on this node */
#define PATH_PLAIN	 2 /* straight to a workload outside the mesh, plaintext */
#define PATH_TUNNEL	 3 /* the node proxy carries it over HBONE to the workload */
#define PATH_WAYPOINT	 4 /* the node proxy carries it over HBONE to the waypoint */
#define PATH_BALANCE	 5 /* a service port: choose a backend, follow its verdict */
#define PATH_PASSTHROUGH 6 /* a PASSTHROUGH service: leave the destination alone */
/* PATH_AUTHZ: a mesh workload on this node whose policies the kernel
 * evaluates (kmesh_authz): DIRECT when they allow the connecting pod, REFUSE
 * when they deny it, TUNNEL when the kernel has no verdict for the pair. */
#define PATH_AUTHZ 7
#define PATH_MAX   8
/* sock_orig.path of a connect the sidecar capture sent to a sidecar
 * (SPLICE_NS_SIDECAR): not a verdict, never in a frontend or backend. */
#define PATH_SIDECAR 16

/* backend_value.flags: what the verdicts were decided from, for dumps and
 * logs only; no program reads them. */
#define BACKEND_F_HBONE	   0x1	/* the workload accepts HBONE on 15008 */
#define BACKEND_F_LOCAL	   0x2	/* the workload runs on this node */
#define BACKEND_F_WAYPOINT 0x4	/* the workload has a waypoint of its own */
#define BACKEND_F_POLICY   0x8	/* authorization policies apply to the workload */
#define BACKEND_F_KAUTHZ   0x10 /* ... and the kernel evaluates them (PATH_AUTHZ) */

/* Ports one kmesh_authz entry can single out (authz_value.ports): a
 * destination whose policies name more ports than this takes the tunnel. */
#define KMESH_AUTHZ_PORTS 16

/* The node proxy (kmesh-daemon's tunnel): its sockets carry this mark, as
 * ztunnel's do (istio-cni's rules know it too), and the kernel path leaves
 * them alone. Connections that need HBONE are sent to its outbound listener
 * on the pod's own loopback. */
#define KMESH_PROXY_MARK	0x539
#define KMESH_OUTBOUND_PORT	15001
#define KMESH_INBOUND_PORT	15006
#define KMESH_HBONE_PORT	15008
#define KMESH_DNS_PORT		15053
#define KMESH_DNS_UPSTREAM_PORT 53 /* what the DNS capture takes */

/* Kubelet probes reach pods from this address once istio-cni's host rules
 * have SNATed them; like istio-cni's in-pod rules, inbound enforcement lets
 * it through (169.254.7.127, network order on the wire). */
#define KMESH_PROBE_SNAT_IP4 0xa9fe077f

/* kmesh_splice_sk: what a spliced socket's sends do, decided at its first
 * send and kept for life, so the peer never reads redirected bytes ahead of
 * bytes that went through TCP. */
#define SPLICE_UNDECIDED 0
#define SPLICE_REDIRECT	 1 /* every send goes into the peer's receive queue */
#define SPLICE_TCP	 2 /* the peer was not there at the first send: TCP for life */

/* kmesh_splice_ns value flags: a network namespace's opt-in to splicing,
 * beyond what cfg_splice turns on for every enrolled pod. */
#define SPLICE_NS_INPOD 0x1 /* connections inside the namespace (app <-> sidecar); any pod */
#define SPLICE_NS_PEERS 0x2 /* an enrolled pod's connections with local mesh workloads */
/* SPLICE_NS_SIDECAR: a pod whose Istio sidecar capture is the default one
 * (REDIRECT to 15001 and 15006, proxy uid/gid 1337, every port and range;
 * the pod is in kmesh_sidecar and kmesh_sidecar_ns): connect4 performs that
 * capture itself for IPv4 TCP, so that no NAT
 * rewrites the legs and both ends of each name the same 4-tuple (spliced).
 * The pod's iptables rules stay: what the program leaves alone, or does
 * while the daemon is away, they still capture. With SPLICE_NS_INPOD. */
#define SPLICE_NS_SIDECAR 0x4

/* The default Istio sidecar's identity and the inbound ports its capture
 * exempts (tunnel, Prometheus, health, status). */
#define KMESH_SIDECAR_UID	    1337
#define KMESH_SIDECAR_EXEMPT_TUNNEL 15008
#define KMESH_SIDECAR_EXEMPT_PROM   15090
#define KMESH_SIDECAR_EXEMPT_HEALTH 15021
#define KMESH_SIDECAR_EXEMPT_STATUS 15020

/* conn_event.kind and .direction */
#define CONN_EV_OPEN	  1
#define CONN_EV_CLOSE	  2
#define CONN_EV_DENY	  3 /* a connect the destination's policies refused (PATH_AUTHZ) */
#define CONN_DIR_OUTBOUND 1 /* the pod connected */
#define CONN_DIR_INBOUND  2 /* the pod accepted */

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
	STAT_PATH_REFUSED = 13,	      /* the destination's verdict is REFUSE */
	STAT_NO_BACKEND = 14,	      /* a workload frontend without its backend: refused */
	STAT_INBOUND_PROXY = 15,      /* inbound plaintext steered to the proxy's 15006 */
	STAT_INBOUND_NO_PROXY = 16,   /* ... but the pod's 15006 is not there: dropped */
	STAT_RECORD_REUSED = 17,      /* a record changed key under us (reuse): retried */
	STAT_CONN_EVENT = 18,	      /* a kernel-path connection event queued for the daemon */
	STAT_CONN_EVENT_DROP = 19,    /* ... but kmesh_events was full: dropped, never waited for */
	STAT_DNS_CAPTURED = 20,	      /* a pod's DNS (port 53) sent to its proxy's DNS server */
	STAT_DNS_NO_STORAGE = 21,     /* ... not captured: no storage to restore the reply source */
	STAT_AUTHZ_ALLOW = 22,	      /* same-node connect allowed by the kernel's policy verdict */
	STAT_AUTHZ_DENY = 23,	      /* ... denied by it: refused (ECONNREFUSED) */
	/* kmesh_stats holds indexes below STAT_MAX. Its size is frozen: a
	 * pinned map of another size cannot be taken over by a new daemon, so
	 * growing it would break upgrades. Counters from STAT_MAX on live in
	 * kmesh_stats_ext (index - STAT_MAX), which has room to grow into. */
	STAT_MAX = 24,
	STAT_AUTHZ_NO_ENTRY = 24,   /* ... no verdict for the pair: sent to the tunnel */
	STAT_INBOUND_AUTHED = 25,   /* inbound plaintext authorized at connect: not steered */
	STAT_SPLICE_INSERT = 26,    /* a connection end entered kmesh_splice */
	STAT_SPLICE_FULL = 27,	    /* ... but the map was full (or the key taken): plain TCP */
	STAT_SPLICE_BYTES = 28,	    /* bytes sk_msg moved straight into the peer socket */
	STAT_SPLICE_NO_PEER = 29,   /* first send found no peer: that direction stays TCP */
	STAT_VIP_NO_PORT = 30,	    /* a service VIP on a port its service does not have: refused */
	STAT_SIDECAR_CAPTURED = 31, /* a sidecar pod's connect sent to a sidecar in the kernel */
	STAT_SIDECAR_ORIG = 32,	    /* SO_ORIGINAL_DST answered from the capture's record */
	STAT_SIDECAR_NO_RECORD = 33, /* no storage or record for it: left to iptables */
	STAT_SPLICE_BUDGET = 34,     /* a direction past its splice budget went to TCP */
	STAT_EXT_MAX = 64,	     /* size of kmesh_stats_ext */
};

/* The producer of connection events wakes the reader at each further
 * step of this many bytes queued (otherwise the reader polls every
 * 100 ms): 64 KiB, ~800 events, a sixteenth of the default ring. A power
 * of two. */
#define KMESH_EVENTS_WAKE_BYTES (64 << 10)

#endif
