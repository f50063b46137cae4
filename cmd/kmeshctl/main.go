// Command kmeshctl shows what Kmesh and the kernel are doing on a node.
package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/kernel"
)

// version is stamped by the Makefile (-ldflags -X main.version=...).
var version = "dev"

// usageError is a mistake on the command line: exit status 2, as before
// kmeshctl used cobra and as most CLIs do.
type usageError struct{ error }

func main() {
	root := newRoot()
	if err := root.Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "kmeshctl:", err)
		var ue usageError
		if errors.As(err, &ue) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

// newRoot builds the command tree; tests run it with SetArgs and SetOut.
func newRoot() *cobra.Command {
	root := &cobra.Command{
		Use:   "kmeshctl",
		Short: "Show what Kmesh and the kernel are doing on this node",
		// Errors are printed once, by main, with the program's name.
		SilenceErrors: true,
		SilenceUsage:  true,
		Args: func(c *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usageError{fmt.Errorf("unknown command %q for %q", args[0], c.CommandPath())}
			}
			return nil
		},
		RunE: func(c *cobra.Command, _ []string) error {
			_ = c.Usage()
			return usageError{errors.New("a command is required")}
		},
	}
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return usageError{fmt.Errorf("%w\n\n%s", err, c.UsageString())}
	})
	root.AddCommand(versionCmd(), dumpCmd(), demoCmd(), logCmd())
	// cobra adds `completion bash|zsh|fish|powershell` by itself.
	return root
}

func versionCmd() *cobra.Command {
	var withKernel bool
	c := &cobra.Command{
		Use:   "version [--kernel]",
		Short: "Print the version; --kernel adds what this kernel supports",
		Args:  cobra.NoArgs,
		RunE: func(c *cobra.Command, _ []string) error {
			out := c.OutOrStdout()
			fmt.Fprintf(out, "kmeshctl %s (pin layout v%d)\n", version, bpf.PinLayout)
			if !withKernel {
				return nil
			}
			return printKernel(out, kernel.Probe())
		},
	}
	c.Flags().BoolVar(&withKernel, "kernel", false, "probe and print kernel features")
	return c
}

func printKernel(out io.Writer, feats []kernel.Feature) error {
	tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "\nFEATURE\tREQUIRED\tSTATUS\tUSED FOR")
	for _, f := range feats {
		status := "ok"
		if !f.Available() {
			status = "missing: " + f.Err.Error()
		}
		req := "optional"
		if f.Required {
			req = "required"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", f.Name, req, status, f.Need)
	}
	tw.Flush()
	if err := kernel.Check(feats); err != nil {
		return err
	}
	fmt.Fprintln(out, "\nthis kernel runs every required Kmesh program")
	return nil
}

// demoRun is runDemo; tests replace it (runDemo replaces the process).
var demoRun = runDemo

func demoCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "demo [FLAGS]",
		Short: "Run the node simulator demo (see README): executes kmesh-sim (next to kmeshctl, else PATH) with FLAGS",
		// The flags (--requests, --daemon, --keep, --help) are the
		// simulator's: pass everything through untouched.
		DisableFlagParsing: true,
		RunE: func(_ *cobra.Command, args []string) error {
			return demoRun(args)
		},
	}
}
