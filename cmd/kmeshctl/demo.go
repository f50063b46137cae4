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
	conns := fs.Int("connections", 3000, "connections sent through the service VIP")
	keep := fs.Bool("keep", false, "keep everything running until Ctrl-C (to inspect with kmeshctl dump)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	return demo.Run(ctx, demo.Options{Out: os.Stdout, Connections: *conns, Keep: *keep})
}
