package sidecar

import (
	"net/netip"
	"testing"
)

func TestCapture(t *testing.T) {
	// What the injector writes with Istio's defaults (status port 15020).
	def := func(mut func(p *Pod)) Pod {
		p := Pod{IPv4: netip.MustParseAddr("10.244.1.5"), ProxyUID: 1337, ProxyGID: 1337, Annotations: map[string]string{
			sidecarStatus: "{}", annInterception: "REDIRECT", annIncludeOutbound: "*",
			annIncludeInbound: "*", annExcludeInbound: "15020",
		}}
		if mut != nil {
			mut(&p)
		}
		return p
	}
	ann := func(k, v string) func(p *Pod) { return func(p *Pod) { p.Annotations[k] = v } }
	for _, c := range []struct {
		name string
		pod  Pod
		want CaptureReason
	}{
		{"injector defaults", def(nil), KernelCapture},
		{"the agent's ports excluded too", def(ann(annExcludeInbound, "15090, 15021,15020")), KernelCapture},
		{"nothing excluded", def(ann(annExcludeInbound, "")), KernelCapture},
		{"empty exclusions written out", def(func(p *Pod) { p.Annotations[annExcludeOutbound] = ""; p.Annotations[annExcludeOutPorts] = " " }), KernelCapture},
		{"no IPv4 (IPv6-only pod)", def(func(p *Pod) { p.IPv4 = netip.Addr{} }), NoIPv4},
		{"TPROXY", def(ann(annInterception, "TPROXY")), NotRedirect},
		{"no interception annotation", def(func(p *Pod) { delete(p.Annotations, annInterception) }), NotRedirect},
		{"OpenShift-style uid", def(func(p *Pod) { p.ProxyUID = 1000650000 }), ProxyIdentity},
		{"gid unknown", def(func(p *Pod) { p.ProxyGID = -1 }), ProxyIdentity},
		{"outbound ranges narrowed", def(ann(annIncludeOutbound, "10.0.0.0/8")), PartialCapture},
		{"outbound ranges missing: nothing captured", def(func(p *Pod) { delete(p.Annotations, annIncludeOutbound) }), PartialCapture},
		{"outbound range excluded", def(ann(annExcludeOutbound, "10.96.0.1/32")), PartialCapture},
		{"outbound port excluded", def(ann(annExcludeOutPorts, "3306")), PartialCapture},
		{"outbound ports included", def(ann(annIncludeOutPorts, "80")), PartialCapture},
		{"inbound ports listed", def(ann(annIncludeInbound, "8080")), PartialCapture},
		{"an application port excluded inbound", def(ann(annExcludeInbound, "15020,9000")), PartialCapture},
		{"excluded interface", def(ann(annExcludeInterface, "eth1")), PartialCapture},
		{"kubevirt interfaces", def(ann(annKubevirt, "k6t-eth0")), PartialCapture},
	} {
		if got := Capture(c.pod); got != c.want {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}
