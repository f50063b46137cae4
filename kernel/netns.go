package kernel

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"
)

// homeNetns is the daemon's own network namespace, opened once: InNetns
// returns threads to it without opening /proc on every call.
var homeNetns = sync.OnceValues(func() (int, error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	fd, err := unix.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("opening the daemon's network namespace: %w", err)
	}
	return fd, nil
})

// InNetns runs fn on an OS thread that has entered the network namespace
// open at nsFd. Sockets fn creates belong to that namespace for their whole
// life, whichever thread later uses them. fn runs on a goroutine of its own,
// locked to its thread, costing two setns calls; Go spawns new threads from
// a clean template thread meanwhile, so none inherits the pod's namespace.
// If the thread cannot return home it is retired (its goroutine ends while
// locked) rather than handed back to Go's pool in the wrong namespace.
func InNetns(nsFd int, fn func() error) error {
	home, err := homeNetns()
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(nsFd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(home, unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("returning from network namespace: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// NetnsCookie returns the cookie the kernel gives the network namespace open
// at nsFd: the key BPF programs see from bpf_get_netns_cookie().
func NetnsCookie(nsFd int) (uint64, error) {
	var cookie uint64
	err := InNetns(nsFd, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			// An IPv6-only namespace still has AF_INET sockets; this only fails
			// without the privilege to create sockets at all.
			return err
		}
		defer unix.Close(fd)
		v, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		if err != nil {
			return fmt.Errorf("SO_NETNS_COOKIE (needs Linux >= 5.14): %w", err)
		}
		cookie = v
		return nil
	})
	return cookie, err
}
