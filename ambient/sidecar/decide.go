// Package sidecar opts pods that keep an Istio sidecar into sockmap
// splicing of their in-pod legs (the sidecar's loopback dial to the
// application: docs/sockmap.md), as a platform engineer asks for it: the
// annotation kmesh.dev/splice: "true" on the pod or its namespace.
//
// Such pods are not enrolled over ZDS (they are not in ambient), so the
// daemon learns them from a node-local watch of the Kubernetes API (pods
// with spec.nodeName = this node, and namespaces: watch.go, plain HTTP
// and JSON, no client-go) and finds each one's network namespace the way
// istio-cni's node agent does: a process whose /proc/<pid>/cgroup names
// the pod's UID (netns.go). Everything fails closed: a pod whose
// annotation, sidecar, namespace or network namespace is unknown or
// ambiguous is not spliced.
package sidecar

import "net/netip"

// Annotation opts a pod, or every pod of a namespace, into splicing: "true"
// on, "false" off (a pod's value wins over its namespace's). Any other
// value is off.
const Annotation = "kmesh.dev/splice"

// sidecarStatus is what Istio's sidecar injector writes on every pod it
// injected: the pod keeps an Envoy sidecar and its capture.
const sidecarStatus = "sidecar.istio.io/status"

// ambientRedirection marks a pod istio-cni enrolled in ambient: the
// daemon's ZDS enrolment splices those (KMESH_SPLICE, SPLICE_NS_PEERS).
const ambientRedirection = "ambient.istio.io/redirection"

// Pod is what the decision needs of a pod.
type Pod struct {
	UID, Namespace, Name string
	NodeName             string
	HostNetwork          bool
	// Running: the pod has started (phase Running); before that its
	// network namespace may not exist, after it (Succeeded, Failed) it
	// is going away.
	Running     bool
	Annotations map[string]string
	// IPv4 is the pod's IPv4 address (status.podIPs), invalid while
	// unknown; ProxyUID and ProxyGID the istio-proxy container's
	// runAsUser and runAsGroup (0 when unknown). Capture needs them.
	IPv4               netip.Addr
	ProxyUID, ProxyGID int64
}

// Namespace is what the decision needs of a namespace.
type Namespace struct {
	Name        string
	Annotations map[string]string
}

// Reason says why a pod is or is not spliced (logs, metrics, tests).
type Reason string

const (
	Spliced         Reason = "spliced"
	NotOptedIn      Reason = "not opted in"
	OptedOut        Reason = "opted out"
	BadValue        Reason = "annotation value is neither true nor false"
	NoSidecar       Reason = "no Istio sidecar (sidecar.istio.io/status)"
	Ambient         Reason = "enrolled in ambient (spliced through ZDS enrolment)"
	HostNetwork     Reason = "host network: its namespace is the node's"
	NotRunning      Reason = "not running"
	OtherNode       Reason = "scheduled on another node"
	UnknownNS       Reason = "namespace unknown"
	NetnsUnknown    Reason = "network namespace not found"
	NetnsAmbiguous  Reason = "processes of the pod in different network namespaces"
	TooManyPods     Reason = "too many spliced pods on this node"
	MapWriteFailure Reason = "kmesh_splice_ns write failed"
)

// Decide is whether pod p, on node node, in namespace ns (nil: not known
// yet), has its in-pod legs spliced. Pure: the caller supplies the facts.
func Decide(p Pod, ns *Namespace, node string) Reason {
	switch {
	case p.NodeName != node:
		return OtherNode
	case p.HostNetwork:
		// Its namespace is the node's: splicing "in-pod" loopback
		// would splice every host process's loopback connections.
		return HostNetwork
	case !p.Running:
		return NotRunning
	case p.Annotations[ambientRedirection] == "enabled":
		return Ambient
	case p.Annotations[sidecarStatus] == "":
		return NoSidecar
	}
	if v, ok := p.Annotations[Annotation]; ok {
		return value(v)
	}
	if ns == nil {
		return UnknownNS
	}
	if v, ok := ns.Annotations[Annotation]; ok {
		return value(v)
	}
	return NotOptedIn
}

func value(v string) Reason {
	switch v {
	case "true":
		return Spliced
	case "false":
		return OptedOut
	}
	return BadValue
}
