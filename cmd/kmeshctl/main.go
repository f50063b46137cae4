// Command kmeshctl shows what Kmesh and the kernel are doing on a node.
package main

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/pflag"

	"kmesh.dev/kmesh/bpf"
	"kmesh.dev/kmesh/kernel"
)

// version is stamped by the Makefile (-ldflags -X main.version=...).
var version = "dev"

const usage = `kmeshctl <command> [flags]

Commands:
  version [--kernel]      print the version; --kernel adds what this kernel supports
  dump [MAP...]           print the kernel maps of this node, every field decoded:
                          managed, frontend, service, endpoint, backend, tunnel,
                          udp, sock_orig, stats (default: all)
  demo [FLAGS]            run the node simulator demo (see README): executes
                          kmesh-sim (next to kmeshctl, else PATH) with FLAGS
`

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "version":
		err = versionCmd(os.Args[2:])
	case "dump":
		err = dumpCmd(os.Args[2:])
	case "demo":
		err = demoCmd(os.Args[2:])
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "kmeshctl:", err)
		os.Exit(1)
	}
}

func versionCmd(args []string) error {
	fs := pflag.NewFlagSet("version", pflag.ContinueOnError)
	withKernel := fs.Bool("kernel", false, "probe and print kernel features")
	if err := fs.Parse(args); err != nil {
		return err
	}
	fmt.Printf("kmeshctl %s (pin layout v%d)\n", version, bpf.PinLayout)
	if !*withKernel {
		return nil
	}
	feats := kernel.Probe()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
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
	fmt.Println("\nthis kernel runs every required Kmesh program")
	return nil
}

func dumpCmd(args []string) error {
	fs := pflag.NewFlagSet("dump", pflag.ContinueOnError)
	root := fs.String("pin-root", bpf.DefaultPinRoot, "where the daemon pins its maps")
	if err := fs.Parse(args); err != nil {
		return err
	}
	names, err := bpf.MapNames()
	if err != nil {
		return err
	}
	// Short names (managed, frontend, ...) and the plural forms of earlier
	// versions (frontends, ...) name maps too.
	pick := names
	if fs.NArg() > 0 && fs.Arg(0) != "all" {
		pick = nil
		for _, arg := range fs.Args() {
			want := "kmesh_" + strings.TrimSuffix(strings.TrimPrefix(arg, "kmesh_"), "s")
			if arg == "stats" || arg == "kmesh_stats" {
				want = "kmesh_stats"
			}
			if !slices.Contains(names, want) {
				return fmt.Errorf("unknown map %q: one of %v or all", arg, names)
			}
			pick = append(pick, want)
		}
	}
	m, closeMaps, err := bpf.OpenPinned(*root)
	if err != nil {
		return err
	}
	defer closeMaps()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	defer tw.Flush()
	for i, name := range pick {
		t, err := m.Dump(name)
		if err != nil {
			return err
		}
		if i > 0 || len(pick) > 1 {
			if i > 0 {
				fmt.Fprintln(tw)
			}
			fmt.Fprintf(tw, "# %s (%d entries)\n", name, len(t.Rows))
		}
		if t.Note != "" {
			fmt.Fprintln(tw, t.Note)
			continue
		}
		fmt.Fprintln(tw, strings.Join(t.Header, "\t"))
		for _, r := range t.Rows {
			fmt.Fprintln(tw, strings.Join(r, "\t"))
		}
	}
	return nil
}
