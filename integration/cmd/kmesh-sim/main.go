// Command kmesh-sim runs the node simulator (integration/sim) on this
// machine: today its one command is the demo that `make demo` and
// `kmeshctl demo` run. It is test harness, not product: it links Istio's
// discovery server and CA to play the control plane, so it is a binary of
// its own and kmeshctl only executes it.
//
//	sudo kmesh-sim demo [--requests N] [--daemon PATH] [--keep]
//
// The pods' processes (the demo's clients, the echo servers) are this same
// binary re-executed inside the pods' namespaces; podnet.MaybeRunHelper
// runs them.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"

	"kmesh.dev/kmesh/integration/demo"
	"kmesh.dev/kmesh/integration/podnet"
)

const usage = `kmesh-sim <command> [flags]

Commands:
  demo    a simulated 2-node ambient cluster with Istio's control plane and a
          kmesh-daemon per node; traffic through a service VIP, and what Kmesh
          did with it (needs root)
`

func main() {
	// A pod's process started by the simulator runs its helper and exits here.
	podnet.MaybeRunHelper()
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "demo":
		err = demoCmd(os.Args[2:])
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if errors.Is(err, pflag.ErrHelp) {
		return
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kmesh-sim:", err)
		os.Exit(1)
	}
}

func demoCmd(args []string) error {
	fs := pflag.NewFlagSet("demo", pflag.ContinueOnError)
	requests := fs.Int("requests", 600, "requests sent through the service VIP")
	daemon := fs.String("daemon", "", "kmesh-daemon binary (default: next to this binary, then PATH)")
	keep := fs.Bool("keep", false, "keep the cluster running until Ctrl-C (to look around)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("demo takes no arguments, got %q", fs.Args())
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return demo.Run(ctx, demo.Options{Out: os.Stdout, Requests: *requests, DaemonBin: *daemon, Keep: *keep})
}
