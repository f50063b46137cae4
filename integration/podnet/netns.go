// Package podnet builds pods out of kernel primitives for tests, the node
// simulator and the demo: a pod is a network namespace (held by a file
// descriptor only, so nothing outlives the process that made it) with a veth
// to its node's bridge, plus a cgroup its processes run in.
//
// Safety: pods get addresses and routes for the simulated cluster's prefixes
// only. They have no default route, so a VIP that a bug fails to redirect
// ends in ENETUNREACH inside the namespace instead of leaving the machine.
package podnet

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"runtime"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"kmesh.dev/kmesh/kernel"
)

// RandomSuffix returns a short random name component, so that concurrent
// runs never share a cgroup or pin directory.
func RandomSuffix() string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Netns is an anonymous network namespace.
type Netns struct {
	Name string
	h    netns.NsHandle
}

// NewNetns creates a network namespace with its loopback up.
func NewNetns(name string) (*Netns, error) {
	h, err := newNetnsHandle()
	if err != nil {
		return nil, fmt.Errorf("creating network namespace %s: %w", name, err)
	}
	n := &Netns{Name: name, h: h}
	if err := n.Do(func() error {
		// No duplicate address detection on the links made later (link-local
		// addresses included): a tentative link-local address cannot speak
		// NDP, which would stall the first second of IPv6 traffic.
		for _, k := range []string{"default", "all"} {
			for _, v := range []string{"accept_dad", "dad_transmits"} {
				if err := os.WriteFile("/proc/sys/net/ipv6/conf/"+k+"/"+v, []byte("0"), 0); err != nil {
					return err
				}
			}
		}
		return setLinkUp("lo")
	}); err != nil {
		n.Close()
		return nil, err
	}
	return n, nil
}

func newNetnsHandle() (netns.NsHandle, error) {
	type result struct {
		h   netns.NsHandle
		err error
	}
	rc := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			rc <- result{err: err}
			return
		}
		defer orig.Close()
		h, err := netns.New() // unshare(CLONE_NEWNET): this thread is now inside
		if err != nil {
			rc <- result{err: err} // thread left locked: retired on return
			return
		}
		if err := netns.Set(orig); err != nil {
			rc <- result{h: h, err: fmt.Errorf("returning to the original namespace: %w", err)}
			return
		}
		runtime.UnlockOSThread()
		rc <- result{h: h}
	}()
	r := <-rc
	if r.err != nil && r.h.IsOpen() {
		r.h.Close()
	}
	return r.h, r.err
}

// Fd returns the namespace's file descriptor (for setns and ZDS).
func (n *Netns) Fd() int { return int(n.h) }

// File returns a duplicate of the namespace descriptor as an *os.File.
func (n *Netns) File() (*os.File, error) {
	fd, err := unix.FcntlInt(uintptr(n.h), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), "netns:"+n.Name), nil
}

// Do runs fn inside the namespace (see kernel.InNetns).
func (n *Netns) Do(fn func() error) error { return kernel.InNetns(n.Fd(), fn) }

// Cookie returns the namespace's cookie, the key of kmesh_managed.
func (n *Netns) Cookie() (uint64, error) { return kernel.NetnsCookie(n.Fd()) }

// Close drops our reference; the kernel frees the namespace once no process
// and no descriptor uses it any more.
func (n *Netns) Close() error {
	if !n.h.IsOpen() {
		return nil
	}
	return n.h.Close()
}
