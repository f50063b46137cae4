// Command kmeshctl shows what Kmesh and the kernel are doing on a node.
package main

import (
	"fmt"
	"net/netip"
	"os"
	"sort"
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
  dump [WHAT]             print the kernel maps of this node: managed, frontends,
                          services, endpoints, backends, stats (default: all)
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
	what := "all"
	if fs.NArg() > 0 {
		what = fs.Arg(0)
	}
	m, closeMaps, err := bpf.OpenPinned(*root)
	if err != nil {
		return err
	}
	defer closeMaps()
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	defer tw.Flush()
	sections := map[string]func() error{
		"managed": func() error {
			ms, err := m.Managed()
			if err != nil {
				return err
			}
			fmt.Fprintln(tw, "NETNS COOKIE\tBACKEND")
			for c, id := range ms {
				fmt.Fprintf(tw, "%d\t%d\n", c, id)
			}
			return nil
		},
		"frontends": func() error {
			fes, err := m.Frontends()
			if err != nil {
				return err
			}
			sort.Slice(fes, func(i, j int) bool { return fes[i].Key.String() < fes[j].Key.String() })
			fmt.Fprintln(tw, "FRONTEND\tKIND\tID\tTARGET PORT\tFLAGS")
			for _, f := range fes {
				kind, flags := "service", ""
				if f.Kind == bpf.FrontendWorkload {
					kind = "workload"
				}
				if f.Passthrough {
					flags = "passthrough"
				}
				fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\n", f.Key, kind, f.ID, f.TargetPort, flags)
			}
			return nil
		},
		"services": func() error {
			ss, err := m.Services()
			if err != nil {
				return err
			}
			sort.Slice(ss, func(i, j int) bool { return ss[i].ID < ss[j].ID })
			fmt.Fprintln(tw, "SERVICE ID\tMODE\tGEN\tEPOCH\tIPV4 SLOTS BY RANK\tIPV6 SLOTS BY RANK")
			for _, s := range ss {
				fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%v\t%v\n", s.ID, s.Mode, s.Gen, s.Epoch, s.Counts[bpf.FamilyV4], s.Counts[bpf.FamilyV6])
			}
			return nil
		},
		"endpoints": func() error {
			es, err := m.Endpoints()
			if err != nil {
				return err
			}
			sort.Slice(es, func(i, j int) bool {
				a, b := es[i].Key, es[j].Key
				if a.Service != b.Service {
					return a.Service < b.Service
				}
				if a.Family != b.Family {
					return a.Family < b.Family
				}
				if a.Rank != b.Rank {
					return a.Rank < b.Rank
				}
				return a.Index < b.Index
			})
			fmt.Fprintln(tw, "SERVICE ID\tGEN\tFAMILY\tRANK\tSLOT\tBACKEND:PORT\tALIAS:PORT\tP(BACKEND)")
			for _, e := range es {
				fmt.Fprintf(tw, "%d\t%d\t%s\t%d\t%d\t%d:%d\t%d:%d\t%.3f\n", e.Key.Service, e.Key.Gen, e.Key.Family, e.Key.Rank, e.Key.Index,
					e.Slot.Backend, e.Slot.Port, e.Slot.Alias, e.Slot.AliasPort, float64(e.Slot.Threshold)/(1<<32))
			}
			return nil
		},
		"backends": func() error {
			bs, err := m.Backends()
			if err != nil {
				return err
			}
			sort.Slice(bs, func(i, j int) bool { return bs[i].ID < bs[j].ID })
			fmt.Fprintln(tw, "BACKEND\tIPV4\tIPV6\tCAPACITY\tHBONE\tLOCAL")
			for _, b := range bs {
				fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%v\t%v\n", b.ID, addrOrDash(b.Addr4), addrOrDash(b.Addr6), b.Capacity, b.HBONE, b.Local)
			}
			return nil
		},
		"stats": func() error {
			st, err := m.Stats()
			if err != nil {
				return err
			}
			names := make([]string, 0, len(st))
			for n := range st {
				names = append(names, n)
			}
			sort.Strings(names)
			fmt.Fprintln(tw, "COUNTER\tVALUE")
			for _, n := range names {
				fmt.Fprintf(tw, "%s\t%d\n", n, st[n])
			}
			return nil
		},
	}
	order := []string{"managed", "frontends", "services", "endpoints", "backends", "stats"}
	if what != "all" {
		if _, ok := sections[what]; !ok {
			return fmt.Errorf("unknown map %q: one of %v or all", what, order)
		}
		order = []string{what}
	}
	for i, name := range order {
		if i > 0 {
			fmt.Fprintln(tw)
		}
		if err := sections[name](); err != nil {
			return err
		}
	}
	return nil
}

func addrOrDash(a netip.Addr) string {
	if !a.IsValid() {
		return "-"
	}
	return a.String()
}
