package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
)

// simBinary is the node simulator (integration/cmd/kmesh-sim, built by
// make build). The demo lives there, not in kmeshctl: it links Istio's
// discovery server and CA to play the control plane, which an operator CLI
// has no business carrying.
const simBinary = "kmesh-sim"

// runDemo replaces kmeshctl with `kmesh-sim demo ARGS...`: the flags
// (--requests, --daemon, --keep, --help) are the simulator's, and Ctrl-C,
// output and exit status are its own.
func runDemo(args []string) error {
	dir := ""
	if exe, err := os.Executable(); err == nil {
		dir = filepath.Dir(exe)
	}
	sim, err := findSim(dir, exec.LookPath)
	if err != nil {
		return err
	}
	argv := append([]string{sim, "demo"}, args...)
	if err := syscall.Exec(sim, argv, os.Environ()); err != nil {
		return fmt.Errorf("running %s: %w", sim, err)
	}
	return nil // not reached: Exec only returns on failure
}

// findSim looks for the simulator next to kmeshctl (dir), then in PATH.
func findSim(dir string, lookPath func(string) (string, error)) (string, error) {
	if dir != "" {
		p := filepath.Join(dir, simBinary)
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode().Perm()&0o111 != 0 {
			return p, nil
		}
	}
	if p, err := lookPath(simBinary); err == nil {
		return p, nil
	}
	where := "PATH"
	if dir != "" {
		where = dir + " or PATH"
	}
	return "", fmt.Errorf("the demo runs the node simulator, %s, which is not in %s: "+
		"build it with make build (bin/%s) or put it next to kmeshctl", simBinary, where, simBinary)
}
