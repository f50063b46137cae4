package kernel

import (
	"fmt"
	"runtime"

	"golang.org/x/sys/unix"
)

// InNetns runs fn on an OS thread that has entered the network namespace
// open at nsFd. Sockets fn creates belong to that namespace for their whole
// life, whichever thread later uses them. The thread goes back to its own
// namespace afterwards; if it cannot, it is retired rather than returned to
// Go's pool with the wrong namespace.
func InNetns(nsFd int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", unix.Gettid()), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening this thread's network namespace: %w", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(nsFd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering network namespace: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: Go ends it when this goroutine returns.
			errc <- fmt.Errorf("returning from network namespace: %w", err)
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
