package tunnel

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"

	"kmesh.dev/kmesh/ambient/hbone"
	"kmesh.dev/kmesh/ambient/state"
	"kmesh.dev/kmesh/bpf"
)

// serveOutbound carries one connection the kernel (or iptables) sent to
// the pod's 15001.
func (p *Proxy) serveOutbound(pp *podProxy, c *net.TCPConn) {
	client := addrPortOf(c.RemoteAddr())
	orig, fromKernel, err := p.origin(pp, c, client)
	if err != nil {
		p.m.refused.WithLabelValues("outbound", "no_original_destination").Inc()
		p.log.Warn("outbound connection without a known destination: reset", "pod", pp.pod.UID, "client", client.String(), "err", err)
		_ = c.SetLinger(0)
		return
	}
	var route Route
	if fromKernel {
		route, err = Resolve(p.cfg.Dir, p.cfg.Network, orig, p.rand)
	} else {
		route, err = ResolveCaptured(p.cfg.Dir, p.cfg.Picker, p.cfg.Network, orig.Dst, p.rand)
	}
	if err != nil {
		p.m.refused.WithLabelValues("outbound", "no_route").Inc()
		p.log.Info("outbound connection has no route: reset", "pod", pp.pod.UID, "dst", orig.Dst.String(), "err", err)
		_ = c.SetLinger(0)
		return
	}
	src := p.cfg.Dir.Workload(pp.pod.WorkloadUID)
	rep := &connReport{reporter: "source", srcNS: pp.pod.Identity.Namespace, srcPrinc: pp.pod.Identity.String(),
		srcAddr: client.String(), dstAddr: orig.Dst.String(), pod: pp.pod.UID, actualDst: route.Dial.String()}
	if src != nil {
		rep.srcWorkload = src.Meta().WorkloadName
	}
	fillDst(rep, route.Dst)
	if route.Service != nil {
		rep.dstService, rep.dstServiceNS = route.Service.Hostname, route.Service.Namespace
	}
	if route.Plain {
		p.plainOutbound(pp, c, route, rep)
		return
	}
	rep.mtls = true
	if err := p.hboneOutbound(pp, c, route, src, rep); err != nil {
		p.log.Info("outbound HBONE failed: reset", "pod", pp.pod.UID, "dst", orig.Dst.String(), "via", route.Dial.String(), "err", err)
		_ = c.SetLinger(0)
		return
	}
	disarmReset(c) // carried to its end (a failed relay reset and closed it)
}

// origin is where the application meant to go: the kernel's record (with
// its verdict; fromKernel), or the original destination of an iptables
// redirect (Dst only: no verdict yet).
func (p *Proxy) origin(pp *podProxy, c *net.TCPConn, client netip.AddrPort) (orig bpf.TunnelOrig, fromKernel bool, err error) {
	if p.cfg.Tunnels != nil {
		orig, ok, err := p.cfg.Tunnels.TakeTunnel(pp.pod.Cookie, client)
		if err != nil {
			return bpf.TunnelOrig{}, false, err
		}
		if ok {
			return orig, true, nil
		}
	}
	dst, err := originalDst(c)
	if err != nil {
		return bpf.TunnelOrig{}, false, fmt.Errorf("no kernel record and %w", err)
	}
	if dst.Port() == bpf.OutboundPort && dst.Addr().IsLoopback() {
		return bpf.TunnelOrig{}, false, errors.New("connected to 15001 directly: nothing to forward to")
	}
	return bpf.TunnelOrig{Dst: netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())}, false, nil
}

// plainOutbound forwards to a destination outside the mesh, spliced in
// the kernel both ways.
func (p *Proxy) plainOutbound(pp *podProxy, c *net.TCPConn, route Route, rep *connReport) {
	up, err := pp.ns.dial(p.connCtx, route.Dial, p.cfg.DialTimeout)
	if err != nil {
		p.m.refused.WithLabelValues("outbound", reasonUpstream).Inc()
		_ = c.SetLinger(0)
		return
	}
	armReset(up)
	defer up.Close()
	cm := p.m.open(rep, socketSample(c, true))
	received, sent := splicePipe(c, up, p.cfg.Splice)
	disarmReset(c)
	disarmReset(up)
	cm.close(received, sent, nil)
}

// hboneOutbound opens a CONNECT stream on a pooled HBONE connection and
// copies both ways: the application's socket is the request body (read
// straight into DATA frames), the response body is written back to it.
func (p *Proxy) hboneOutbound(pp *podProxy, c *net.TCPConn, route Route, src *state.Workload, rep *connReport) (err error) {
	ctx := p.connCtx
	// The span lasts as long as the connection; a connection that never
	// got through ends it with the error (nil span: tracing is off).
	span := p.clientSpan(ctx, route.Dial, route.Target, rep)
	var received, sent int64
	var copyErr error
	defer func() {
		if err != nil {
			span.end(0, 0, err)
		} else {
			span.end(received, sent, copyErr)
		}
	}()
	cert, err := p.cfg.Certs.Certificate(ctx, pp.pod.Identity)
	if err != nil {
		p.m.refused.WithLabelValues("outbound", "no_certificate").Inc()
		return fmt.Errorf("no certificate for %s: %w", pp.pod.Identity, err)
	}
	key := poolKey{pod: pp.pod.UID, src: pp.pod.Identity, dst: route.Identity, addr: route.Dial}
	dial := func(ctx context.Context) (net.Conn, error) {
		raw, err := pp.ns.dial(ctx, route.Dial, p.cfg.DialTimeout)
		if err != nil {
			return nil, fmt.Errorf("connecting to %s (a NetworkPolicy blocking HBONE port 15008?): %w", route.Dial, err)
		}
		tc, nc := tlsOver(raw, clientTLS(cert, p.cfg.Certs.Roots, route.Identity), false)
		hctx, cancel := context.WithTimeout(ctx, handshakeTimeout)
		defer cancel()
		if err := tc.HandshakeContext(hctx); err != nil {
			raw.Close()
			return nil, fmt.Errorf("TLS with %s (%s): %w", route.Dial, route.Identity, err)
		}
		p.m.handshakes.WithLabelValues("outbound").Inc()
		return nc, nil
	}
	var srcAddr netip.Addr
	if src != nil {
		srcAddr, _ = sameFamily(src.Addresses, route.Target.Addr())
	}
	header := connectHeaders(source{addr: srcAddr, w: src}, span.spanContext())
	var st *hbone.Stream
	var status int
	// A connection that turned out unable to take the stream (GOAWAY
	// meanwhile, stream limit) is safe to retry on another: the peer never
	// saw the request.
	for attempt := 0; ; attempt++ {
		pc, release, err := p.pool.get(ctx, key, dial)
		if err != nil {
			p.m.refused.WithLabelValues("outbound", reasonUpstream).Inc()
			return err
		}
		cctx, cancel := context.WithTimeout(ctx, connectTimeout)
		st, status, err = pc.cc.Connect(cctx, route.Target.String(), header)
		cancel()
		if err == nil {
			defer release()
			break
		}
		release()
		if attempt == 0 && (errors.Is(err, hbone.ErrGoAway) || errors.Is(err, hbone.ErrRefused)) {
			continue
		}
		p.m.refused.WithLabelValues("outbound", reasonUpstream).Inc()
		return fmt.Errorf("CONNECT %s via %s: %w", route.Target, route.Dial, err)
	}
	defer st.Close()
	span.status(status)
	if status != http.StatusOK {
		p.m.refused.WithLabelValues("outbound", fmt.Sprintf("peer_%d", status)).Inc()
		return fmt.Errorf("%w: CONNECT %s via %s: HTTP %d", errStreamRefused, route.Target, route.Dial, status)
	}
	cm := p.m.open(rep, socketSample(c, true))
	received, sent, copyErr = pipe(c, st) // pipe resets the application on failure
	cm.close(received, sent, copyErr)
	return nil
}
