package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"

	"kmesh.dev/kmesh/integration/demo"
)

func demoCmd(args []string) error {
	fs := pflag.NewFlagSet("demo", pflag.ContinueOnError)
	requests := fs.Int("requests", 600, "requests sent through the service VIP")
	daemon := fs.String("daemon", "", "kmesh-daemon binary (default: next to kmeshctl, then PATH)")
	keep := fs.Bool("keep", false, "keep the cluster running until Ctrl-C (to look around)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return demo.Run(ctx, demo.Options{Out: os.Stdout, Requests: *requests, DaemonBin: *daemon, Keep: *keep})
}
