package main

import (
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"kmesh.dev/kmesh/bpf"
)

func dumpCmd() *cobra.Command {
	var root, output string
	c := &cobra.Command{
		Use:   "dump [MAP...]",
		Short: "Print the kernel maps of this node, every field decoded",
		Long: `Print the kernel maps of this node, every field decoded: managed, frontend,
service, endpoint, backend, tunnel, udp, sock_orig, stats (default: all).`,
		ValidArgsFunction: func(*cobra.Command, []string, string) ([]cobra.Completion, cobra.ShellCompDirective) {
			names, _ := bpf.MapNames()
			out := []cobra.Completion{"all"}
			for _, n := range names {
				out = append(out, strings.TrimPrefix(n, "kmesh_"))
			}
			return out, cobra.ShellCompDirectiveNoFileComp
		},
		RunE: func(c *cobra.Command, args []string) error {
			render, ok := renderers[output]
			if !ok {
				return usageError{fmt.Errorf("--output %q: one of table, json, yaml", output)}
			}
			names, err := bpf.MapNames()
			if err != nil {
				return err
			}
			pick, err := pickMaps(names, args)
			if err != nil {
				return usageError{err}
			}
			m, closeMaps, err := bpf.OpenPinned(root)
			if err != nil {
				return err
			}
			defer closeMaps()
			tables := make([]bpf.Table, 0, len(pick))
			for _, name := range pick {
				t, err := m.Dump(name)
				if err != nil {
					return err
				}
				tables = append(tables, t)
			}
			return render(c.OutOrStdout(), tables)
		},
	}
	c.Flags().StringVar(&root, "pin-root", bpf.DefaultPinRoot, "where the daemon pins its maps")
	c.Flags().StringVarP(&output, "output", "o", "table", "output format: table, json or yaml")
	_ = c.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]cobra.Completion{"table", "json", "yaml"}, cobra.ShellCompDirectiveNoFileComp))
	return c
}

// pickMaps resolves the maps named on the command line. Short names
// (managed, frontend, ...) and the plural forms of earlier versions
// (frontends, ...) name maps too; none, or "all", is every map.
func pickMaps(names, args []string) ([]string, error) {
	if len(args) == 0 || args[0] == "all" {
		return names, nil
	}
	var pick []string
	for _, arg := range args {
		want := "kmesh_" + strings.TrimSuffix(strings.TrimPrefix(arg, "kmesh_"), "s")
		if arg == "stats" || arg == "kmesh_stats" {
			want = "kmesh_stats"
		}
		if !slices.Contains(names, want) {
			return nil, fmt.Errorf("unknown map %q: one of %v or all", arg, names)
		}
		pick = append(pick, want)
	}
	return pick, nil
}

var renderers = map[string]func(io.Writer, []bpf.Table) error{
	"table": renderTable,
	"json":  func(w io.Writer, ts []bpf.Table) error { return renderJSON(w, ts, false) },
	"yaml":  func(w io.Writer, ts []bpf.Table) error { return renderJSON(w, ts, true) },
}

// renderTable is kmeshctl's table: one section per map, a heading when
// there are several.
func renderTable(w io.Writer, tables []bpf.Table) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for i, t := range tables {
		if len(tables) > 1 {
			if i > 0 {
				fmt.Fprintln(tw)
			}
			fmt.Fprintf(tw, "# %s (%d entries)\n", t.Map, len(t.Rows))
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
	return tw.Flush()
}

// mapDump is one map in JSON and YAML: each entry an object keyed by the
// table's column names, so that jq and yq select fields by name.
type mapDump struct {
	Map     string              `json:"map"`
	Note    string              `json:"note,omitempty"`
	Entries []map[string]string `json:"entries"`
}

func renderJSON(w io.Writer, tables []bpf.Table, asYAML bool) error {
	out := make([]mapDump, 0, len(tables))
	for _, t := range tables {
		d := mapDump{Map: t.Map, Note: t.Note, Entries: make([]map[string]string, 0, len(t.Rows))}
		for _, r := range t.Rows {
			e := make(map[string]string, len(t.Header))
			for i, h := range t.Header {
				if i < len(r) {
					e[h] = r[i]
				}
			}
			d.Entries = append(d.Entries, e)
		}
		out = append(out, d)
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return err
	}
	if asYAML {
		if b, err = yaml.JSONToYAML(b); err != nil {
			return err
		}
	} else {
		b = append(b, '\n')
	}
	_, err = w.Write(b)
	return err
}
