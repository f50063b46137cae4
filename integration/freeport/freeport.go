// Package freeport hands out loopback TCP ports for the servers the tests
// start in other processes (daemons, control planes, collectors), which
// bind them themselves.
package freeport

import (
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
)

// lowest is where the ports handed out start; below it are the fixed
// ports servers here use (15001/15006/15008/15020/15021, 10250, 6443, …).
const lowest = 20000

// Port returns a loopback TCP port no socket holds now, chosen at random
// below the kernel's ephemeral range (net.ipv4.ip_local_port_range). A
// port from that range, what "127.0.0.1:0" gives, can be taken between
// this check and the child's bind by any outgoing connection's local port
// or any ":0" bind on the machine: a CI run failed so ("bind: address
// already in use" for a daemon's admin port). Below it only another
// caller picking the same of ~12,000 ports in that moment can.
func Port() (int, error) {
	hi := ephemeralLow()
	for range 64 {
		p := 0
		if hi-lowest >= 1000 {
			p = lowest + rand.IntN(hi-lowest)
		}
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
		if err != nil {
			continue // held: try another
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		return port, nil
	}
	// Everything tried was held: let the kernel choose.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Addr is Port as "127.0.0.1:port".
func Addr() (string, error) {
	p, err := Port()
	if err != nil {
		return "", err
	}
	return net.JoinHostPort("127.0.0.1", strconv.Itoa(p)), nil
}

// ephemeralLow is the first port of the kernel's ephemeral range (32768
// when it cannot be read).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 32768
	}
	lo, err := strconv.Atoi(f[0])
	if err != nil {
		return 32768
	}
	return lo
}
