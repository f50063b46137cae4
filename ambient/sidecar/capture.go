package sidecar

import (
	"net/netip"
	"strings"
)

// Capture says whether the kernel performs a spliced pod's sidecar capture
// (bpf.SpliceSidecar: connect4 sends the application to 15001 and other
// such pods' sidecars to its 15006 itself, so that no leg is NAT'd and every
// leg splices), or why only its in-pod loopback leg is spliced. The kernel
// implements exactly one capture, istio-iptables' default in REDIRECT mode
// (bpf/sock_addr.c: sidecar_capture4); a pod whose capture differs in any
// way the injector records keeps iptables for every leg it captures, so the
// kernel never sends a connection somewhere iptables would not.
type CaptureReason string

const (
	KernelCapture   CaptureReason = "kernel capture"
	NoIPv4          CaptureReason = "no IPv4 pod address (the kernel's capture is IPv4 only)"
	NotRedirect     CaptureReason = "interception mode is not REDIRECT"
	PartialCapture  CaptureReason = "capture narrowed by a traffic.sidecar.istio.io annotation"
	ProxyIdentity   CaptureReason = "sidecar does not run as uid and gid 1337"
	MapWriteCapture CaptureReason = "kmesh_sidecar write failed"
	AddrInUse       CaptureReason = "another spliced pod has the same address"
)

// Annotations the sidecar injector writes on every pod it injects,
// recording the capture istio-iptables (or istio-cni) installs.
const (
	annInterception     = "sidecar.istio.io/interceptionMode"
	annIncludeOutbound  = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	annExcludeOutbound  = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	annIncludeInbound   = "traffic.sidecar.istio.io/includeInboundPorts"
	annExcludeInbound   = "traffic.sidecar.istio.io/excludeInboundPorts"
	annIncludeOutPorts  = "traffic.sidecar.istio.io/includeOutboundPorts"
	annExcludeOutPorts  = "traffic.sidecar.istio.io/excludeOutboundPorts"
	annKubevirt         = "traffic.sidecar.istio.io/kubevirtInterfaces"
	annExcludeInterface = "traffic.sidecar.istio.io/excludeInterfaces"
)

// kernelExemptInbound: the inbound ports the kernel's capture leaves alone
// besides the tunnel's 15008 (KMESH_SIDECAR_EXEMPT_*): Istio's defaults.
var kernelExemptInbound = map[string]bool{"15090": true, "15021": true, "15020": true}

// Capture decides for pod p (already Spliced by Decide). Pure.
func Capture(p Pod) CaptureReason {
	a := p.Annotations
	switch {
	case !p.IPv4.IsValid():
		return NoIPv4
	case a[annInterception] != "REDIRECT":
		return NotRedirect
	case p.ProxyUID != 1337 || p.ProxyGID != 1337:
		return ProxyIdentity
	case strings.TrimSpace(a[annIncludeOutbound]) != "*", strings.TrimSpace(a[annIncludeInbound]) != "*":
		return PartialCapture
	}
	for _, k := range []string{annExcludeOutbound, annIncludeOutPorts, annExcludeOutPorts, annKubevirt, annExcludeInterface} {
		if strings.TrimSpace(a[k]) != "" {
			return PartialCapture
		}
	}
	for _, port := range strings.Split(a[annExcludeInbound], ",") {
		if port = strings.TrimSpace(port); port != "" && !kernelExemptInbound[port] {
			return PartialCapture
		}
	}
	return KernelCapture
}

// firstIPv4 is the first IPv4 address of a pod's status addresses.
func firstIPv4(addrs ...string) netip.Addr {
	for _, s := range addrs {
		if a, err := netip.ParseAddr(s); err == nil && a.Unmap().Is4() {
			return a.Unmap()
		}
	}
	return netip.Addr{}
}
