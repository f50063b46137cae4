/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The Go/C contract: every struct stored in a Kmesh map. bpf2go generates the
 * Go types from these (see bpf/gen.go); TestABILayout checks the committed
 * objects against the generated Go so the two cannot drift. Changing a struct
 * here changes the pin layout: bump KMESH_PIN_LAYOUT in bpf/loader.go.
 *
 * Conventions: addresses are 16 bytes in network order, IPv4 as v4-mapped
 * IPv6 (::ffff:a.b.c.d) so one key type serves both families; ports are in
 * network order, the way the kernel hands them to sock_addr programs.
 *
 * The values the connect decision reads (frontend, service, endpoint,
 * backend) begin with the identity of their own key: since Linux 6.1 an
 * element may be reused for another key while a program still reads it, and
 * the programs check the identity after copying (kmesh_maps.h says why and
 * what that guarantees). User space writes the identity with the value. */
#ifndef KMESH_ABI_H
#define KMESH_ABI_H

#include <linux/types.h>
#include <linux/bpf.h> /* struct bpf_spin_lock */

/* kmesh_managed value: an enrolled pod's network namespace. */
struct managed_value {
	__u32 backend_id; /* the pod's own workload (0 while unknown) */
	__u32 flags;
};

/* kmesh_frontend key: what a client may connect to. */
struct frontend_key {
	__u32 addr[4];
	__u16 port; /* network order; 0 for a workload (any port) */
	__u8 proto; /* IPPROTO_TCP or IPPROTO_UDP; 0 for a workload (any protocol) */
	__u8 pad;
};

struct frontend_value {
	struct frontend_key key; /* the key this value is stored under (element reuse) */
	__u32 id;	   /* service id (FRONTEND_SERVICE) or backend id (FRONTEND_WORKLOAD) */
	__u16 target_port; /* network order; endpoint_value.port overrides it when set */
	__u8 kind;	   /* FRONTEND_* */
	__u8 path;	   /* FRONTEND_SERVICE: PATH_BALANCE, _PASSTHROUGH, _WAYPOINT or _REFUSE;
			    * FRONTEND_WORKLOAD: unused, the backend's verdicts apply */
};

/* kmesh_service value: one load-balancing set. count[f][r] endpoints of family
 * f and locality rank r live in kmesh_endpoint under generation gen. User space
 * writes a new generation completely, then flips gen here (one atomic element
 * replacement), then deletes the old one: a connect sees either table whole. */
struct service_value {
	__u32 id; /* the service id this value is stored under (element reuse) */
	__u32 count[KMESH_FAMILIES][KMESH_MAX_RANKS];
	__u32 epoch; /* bumped on every membership change (UDP affinity check) */
	__u8 gen;    /* live endpoint generation, 0 or 1 */
	__u8 mode;   /* LB_MODE_* (informational) */
	__u8 flags;
	__u8 pad;
};

struct endpoint_key {
	__u32 service_id;
	__u8 gen;
	__u8 family; /* KMESH_FAMILY_* */
	__u8 rank;
	__u8 pad;
	__u32 index;
};

/* One slot of a Walker/Vose alias table: slot i is drawn uniformly, then
 * backend_id with probability threshold/2^32, else alias_id. This makes
 * capacity-weighted choice exact and O(1) in the kernel. */
struct endpoint_value {
	struct endpoint_key key; /* the key this value is stored under (element reuse) */
	__u32 backend_id;
	__u32 alias_id;
	__u32 threshold;
	__u16 port;	  /* network order target port of backend_id, 0 = frontend's */
	__u16 alias_port; /* same for alias_id */
};

/* kmesh_backend value: a workload, and how connections to it travel. */
struct backend_value {
	__u32 id;	/* the backend id this value is stored under (element reuse) */
	__u32 addr4;	/* network order, 0 when the workload has no IPv4 address */
	__u32 addr6[4]; /* all zero when it has no IPv6 address */
	__u32 identity; /* identity id (for policy), 0 = unknown */
	__u32 capacity; /* Istio capacity weight (already folded into alias tables) */
	__u8 path_svc;	/* PATH_*: TCP reaching it through a service's load balancer */
	__u8 path_addr; /* PATH_*: TCP addressed to one of its own IPs */
	__u8 path_udp;	/* PATH_*: UDP, either way (never through the node proxy) */
	__u8 path_in;	/* PATH_DIRECT or PATH_TUNNEL: plaintext TCP arriving at this
			 * workload (on this node) from outside the node proxy: to the
			 * application, or to the proxy's 15006 to be authorized */
	__u32 flags;	/* BACKEND_F_*: the verdicts' inputs, for dumps */
};

/* kmesh_inproxy key: an enrolled pod's address; the value is the node
 * proxy's plaintext inbound listener (15006) in that pod. */
struct inbound_key {
	__u32 addr[4]; /* IPv4 v4-mapped */
};

/* kmesh_splice key: one end of a TCP connection the kernel splices, as that
 * end sees it. The sk_msg program finds a sender's peer by swapping its own
 * local and remote. netns_cookie is the namespace of both ends when they
 * share one (loopback, or a pod dialling its own address: the in-pod legs of
 * the tunnel and of a sidecar, whose addresses repeat in every pod), and 0
 * across pods (pod addresses are unique on the node, and each end is
 * inserted only under its own pod's address). */
struct splice_key {
	__u32 local[4];	  /* IPv4 v4-mapped */
	__u32 remote[4];  /* IPv4 v4-mapped */
	__u16 local_port; /* network order */
	__u16 remote_port;
	__u32 pad;
	__u64 netns_cookie;
};

/* Per-socket storage: where the application meant to connect (addr:port),
 * where the kernel sent it (peer: the backend, or the node proxy's outbound
 * listener), and the backend the load balancer chose. getpeername() and
 * recvmsg() answer with addr when the socket's peer is still peer; the node
 * proxy learns addr and backend of a tunnelled connection (tunnel_value). */
struct sock_orig {
	__u32 addr[4];
	__u16 port;
	__u8 path; /* PATH_* the connect took */
	__u8 pad0;
	__u32 peer_addr[4];
	__u16 peer_port;
	__u16 pad;
	__u32 backend_addr[4]; /* zero when a waypoint decides (PATH_WAYPOINT) */
	__u16 backend_port;
	__u16 pad2;
};

/* kmesh_dns (one element): whether enrolled pods' DNS (any destination,
 * port 53, UDP and TCP) goes to the node proxy's DNS server on the pod's own
 * loopback, and on which port. Written by the daemon; zero (the initial
 * value) leaves DNS alone. */
struct dns_config {
	__u32 enabled;
	__u16 port; /* the proxy's in-pod DNS port (15053), host order */
	__u16 pad;
};

/* kmesh_sidecar: the pods on this node whose sidecar capture the kernel
 * performs (SPLICE_NS_SIDECAR), by pod IPv4 address (v4-mapped). The
 * sidecar's dial to one of them goes to its 15006 at connect; the address
 * is also how a cross-namespace leg proves its ends are those pods. */
struct sidecar_key {
	__u32 addr[4];
};

struct sidecar_value {
	__u64 netns_cookie; /* the pod's network namespace */
};

/* kmesh_sidecar_orig value: where a connection the sidecar capture
 * redirected was going (SO_ORIGINAL_DST), keyed by the connecting end's
 * view of the connection (struct splice_key). */
struct orig_dst {
	__u32 addr[4]; /* IPv4 v4-mapped */
	__u16 port;    /* network order */
	__u16 pad;
};

/* kmesh_tunnel key: a tunnelled connection as the node proxy sees it when it
 * accepts on the pod's loopback: the client's address and port inside the
 * pod's network namespace. */
struct tunnel_key {
	__u64 netns_cookie;
	__u32 addr[4]; /* client address, IPv4 v4-mapped */
	__u16 port;    /* client port, network order */
	__u16 pad;
	__u32 pad2;
};

struct tunnel_value {
	__u32 addr[4]; /* what the application dialled */
	__u16 port;
	__u8 path; /* PATH_TUNNEL or PATH_WAYPOINT: the proxy follows it, never plaintext */
	__u8 pad0;
	__u32 backend_addr[4];
	__u16 backend_port;
	__u16 pad;
};

/* Unconnected UDP, per socket (kmesh_udp, socket storage: it dies with the
 * socket). A slot per VIP:port the socket sends to: the backend chosen for
 * it (affinity, until the service's membership changes) and the one before
 * the last re-pick, each with the send counter of the last datagram that
 * went there, so recvmsg can report a reply as coming from the VIP. */
struct udp_slot {
	__u32 vip[4]; /* what the application sent to */
	__u32 backend[4];
	__u32 prev[4];	  /* the backend before the last re-pick; zero when none */
	__u64 seq;	  /* send counter of the last datagram to backend; 0 = free slot */
	__u64 prev_seq;	  /* ... and of the last one to prev */
	__u32 service_id; /* the set backend was drawn from, at epoch */
	__u32 epoch;
	__u16 vip_port;
	__u16 backend_port;
	__u16 prev_port;
	__u16 pad;
};

struct udp_affinity {
	struct bpf_spin_lock lock; /* sendmsg and recvmsg on one socket may run on two CPUs */
	__u32 pad;
	__u64 seq; /* datagrams this socket sent to VIPs */
	struct udp_slot slot[KMESH_UDP_SLOTS];
};

/* kmesh_events record: one TCP connection of an enrolled pod on the kernel
 * path (not through the node proxy), as sockops sees it when it is
 * established (CONN_EV_OPEN) and when it reaches TCP_CLOSE (CONN_EV_CLOSE:
 * after a clean close, a reset, or a connect that never completed). The
 * daemon turns these into Istio's TCP metrics and access logs. Every record
 * is self-contained: a daemon that restarted between open and close still
 * knows the connection from its close record alone. */
struct conn_event {
	__u64 sock_cookie;
	__u64 netns_cookie;
	__u64 ts_ns;	      /* bpf_ktime_get_ns() when the event happened */
	__u64 bytes_acked;    /* this socket's bytes sent and acknowledged by the peer */
	__u64 bytes_received; /* this socket's bytes received */
	__u32 local_addr[4];  /* IPv4 v4-mapped */
	__u32 remote_addr[4];
	__u32 orig_addr[4]; /* what the application dialled (a VIP), when the connect
			     * program rewrote it; zero otherwise */
	__u16 local_port;   /* network order */
	__u16 remote_port;
	__u16 orig_port;
	__u8 kind;	/* CONN_EV_* */
	__u8 direction; /* CONN_DIR_*: this socket connected (outbound) or was accepted */
	__u8 old_state; /* CONN_EV_CLOSE: the TCP state left (BPF_TCP_*): SYN_SENT is a
			 * failed connect, ESTABLISHED or CLOSE_WAIT a reset */
	__u8 pad0;
	__u16 pad1;
	__u32 backend_id; /* the pod's own workload (kmesh_managed) in an accepted
			   * socket's open event; 0 elsewhere (the daemon knows the pod
			   * by netns_cookie) */
};

/* kmesh_authz key: a (destination workload, source workload) pair of this
 * node, per address family. The source is the connecting pod's workload as
 * its enrolment recorded it (kmesh_managed), which the pod cannot change. */
struct authz_key {
	__u32 dst_id; /* backend id of the destination */
	__u32 src_id; /* backend id of the connecting pod's workload */
	__u8 family;  /* KMESH_FAMILY_* of the connection */
	__u8 pad[3];
};

/* The destination's policies evaluated for the pair (user space runs the
 * very evaluator the node proxy runs, ambient/authz, over every port the
 * policies name): allow for every destination port except those in ports,
 * which get the other verdict. */
struct authz_value {
	struct authz_key key; /* the key this value is stored under (element reuse) */
	__u8 allow;	      /* 1 allow, 0 deny: the verdict for ports not listed */
	__u8 nports;	      /* ports[0..nports) are the exceptions */
	__u16 pad;
	__u16 ports[KMESH_AUTHZ_PORTS]; /* network order */
};

/* kmesh_vip key: a service VIP that is not an address of anything (a
 * Kubernetes ClusterIP). Connections to a port its service does not have
 * are refused instead of leaving the node for an address nothing answers. */
struct vip_key {
	__u32 addr[4]; /* IPv4 as v4-mapped IPv6 */
};

struct vip_value {
	__u32 services; /* services claiming the VIP (for dumps) */
};

/* kmesh_authed key: a connection the connect program authorized, as its SYN
 * reaches the destination pod: the client's address and port (remote at the
 * destination), the server's (local). sockops writes it when the client
 * sends the SYN; kmesh_inbound lets such a connection reach the application
 * instead of steering it to the proxy's 15006. */
struct authed_key {
	__u32 src[4]; /* IPv4 v4-mapped */
	__u32 dst[4];
	__u16 src_port; /* network order */
	__u16 dst_port;
	__u32 pad;
};

#endif
