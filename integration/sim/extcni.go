package sim

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"
)

// The external mode's CNI: the kubelet is its node's container runtime. The
// node's CNI configuration is <host>/etc/cni/net.d; the kubelet writes an
// initial conflist whose first plugin is its own (primaryPlugin: the
// namespace, veth, addresses and routes podnet makes), which install-cni
// then patches to chain istio-cni. For each pod the kubelet runs its own
// plugin, then every chained plugin's binary from <host>/opt/cni/bin with
// the CNI protocol (CNI_COMMAND, CNI_NETNS, CNI_ARGS, the plugin's config
// and prevResult on stdin), as a process of the node (its network and PID
// namespaces) that sees the node's /etc/cni/net.d, /opt/cni/bin and /run.

const (
	primaryPlugin  = "kmesh-sim-bridge"
	primaryConfig  = "10-kmesh-sim.conflist"
	cniVersion     = "1.0.0"
	cniPluginLimit = 30 * time.Second
)

func (n *Node) writePrimaryCNIConfig() error {
	dir := filepath.Join(n.ext.hostDir, "etc/cni/net.d")
	for _, d := range []string{dir, filepath.Join(n.ext.hostDir, "opt/cni/bin")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	conf := map[string]any{"cniVersion": cniVersion, "name": "kmesh-sim", "plugins": []any{map[string]any{"type": primaryPlugin}}}
	b, _ := json.MarshalIndent(conf, "", "  ")
	return os.WriteFile(filepath.Join(dir, primaryConfig), b, 0o644)
}

// cniAdded is a chained plugin that ADD succeeded for.
type cniAdded struct {
	conf map[string]any
}

// nodeCNIConfig reads the node's network configuration as libcni picks it:
// the first file by name among *.conflist, *.conf and *.json.
func (n *Node) nodeCNIConfig() (string, []map[string]any, error) {
	dir := filepath.Join(n.ext.hostDir, "etc/cni/net.d")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", nil, err
	}
	var names []string
	for _, e := range ents {
		if ext := filepath.Ext(e.Name()); !e.IsDir() && (ext == ".conflist" || ext == ".conf" || ext == ".json") {
			names = append(names, e.Name())
		}
	}
	slices.Sort(names)
	if len(names) == 0 {
		return "", nil, errors.New("no CNI configuration")
	}
	b, err := os.ReadFile(filepath.Join(dir, names[0]))
	if err != nil {
		return "", nil, err
	}
	var conf map[string]any
	if err := json.Unmarshal(b, &conf); err != nil {
		return "", nil, fmt.Errorf("%s: %w", names[0], err)
	}
	var plugins []map[string]any
	if ps, ok := conf["plugins"].([]any); ok {
		for _, p := range ps {
			if m, ok := p.(map[string]any); ok {
				plugins = append(plugins, m)
			}
		}
	} else {
		plugins = []map[string]any{conf}
	}
	if len(plugins) == 0 || plugins[0]["type"] != primaryPlugin {
		return "", nil, fmt.Errorf("%s: the first plugin must be %s (the simulator's own)", names[0], primaryPlugin)
	}
	name, _ := conf["name"].(string)
	return name, plugins, nil
}

func (p *extPod) primaryResult() json.RawMessage {
	type ip struct {
		Interface int    `json:"interface"`
		Address   string `json:"address"`
		Gateway   string `json:"gateway,omitempty"`
	}
	res := map[string]any{"cniVersion": cniVersion,
		"interfaces": []any{map[string]any{"name": "eth0", "sandbox": p.cniNetns()}}}
	var ips []ip
	for _, a := range []struct {
		addr netip.Addr
		pfx  netip.Prefix
	}{{p.net.IPv4, p.n.v4}, {p.net.IPv6, p.n.v6}} {
		if a.addr.IsValid() {
			gw := a.pfx.Masked().Addr().Next()
			ips = append(ips, ip{Interface: 0, Address: netip.PrefixFrom(a.addr, a.pfx.Bits()).String(), Gateway: gw.String()})
		}
	}
	res["ips"] = ips
	b, _ := json.Marshal(res)
	return b
}

// cniNetns is the pod's netns path as the node sees it.
func (p *extPod) cniNetns() string { return "/var/run/netns/" + p.pinName }

func (p *extPod) cniArgs() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return fmt.Sprintf("IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_INFRA_CONTAINER_ID=%s;K8S_POD_UID=%s",
		p.pod.Namespace, p.pod.Name, p.sandboxID(), p.uid)
}

func (p *extPod) sandboxID() string { return strings.ReplaceAll(string(p.uid), "-", "") }

// cniAdd runs the chained plugins' ADD (each only once per pod).
func (p *extPod) cniAdd() error {
	netName, plugins, err := p.n.nodeCNIConfig()
	if err != nil {
		return err
	}
	prev := p.cniRes
	if prev == nil {
		prev = p.primaryResult()
	}
	for _, pc := range plugins[1+len(p.cni):] {
		out, err := p.runPlugin("ADD", netName, pc, prev)
		if err != nil {
			return err
		}
		if len(bytes.TrimSpace(out)) > 0 {
			prev = out
		}
		p.cni = append(p.cni, cniAdded{conf: pc})
		p.cniRes = prev
	}
	p.cniRes = prev
	return nil
}

// cniDel runs DEL for the chained plugins that were added, last first.
func (p *extPod) cniDel() error {
	var errs []error
	for i := len(p.cni) - 1; i >= 0; i-- {
		if _, err := p.runPlugin("DEL", "kmesh-sim", p.cni[i].conf, p.cniRes); err != nil {
			errs = append(errs, err)
		}
	}
	p.cni = nil
	return errors.Join(errs...)
}

// runPlugin runs one plugin binary with the CNI protocol.
func (p *extPod) runPlugin(command, netName string, pc map[string]any, prev json.RawMessage) ([]byte, error) {
	n := p.n
	typ, _ := pc["type"].(string)
	if typ == "" || strings.ContainsAny(typ, "/.") {
		return nil, fmt.Errorf("CNI plugin type %q", typ)
	}
	bin := filepath.Join(n.ext.hostDir, "opt/cni/bin", typ)
	if _, err := os.Stat(bin); err != nil {
		return nil, fmt.Errorf("CNI plugin %s: %w", typ, err)
	}
	conf := map[string]any{}
	for k, v := range pc {
		conf[k] = v
	}
	conf["name"] = netName
	conf["cniVersion"] = cniVersion
	if v, ok := pc["cniVersion"]; ok {
		conf["cniVersion"] = v
	}
	if prev != nil {
		conf["prevResult"] = json.RawMessage(prev)
	}
	stdin, _ := json.Marshal(conf)
	env := []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
		"CNI_COMMAND=" + command, "CNI_CONTAINERID=" + p.sandboxID(), "CNI_NETNS=" + p.cniNetns(), "CNI_IFNAME=eth0",
		"CNI_ARGS=" + p.cniArgs(), "CNI_PATH=/opt/cni/bin"}
	scratch := filepath.Join(p.dir, fmt.Sprintf("cni-%s-%d", strings.ToLower(command), time.Now().UnixNano()))
	if err := os.MkdirAll(scratch, 0o700); err != nil {
		return nil, err
	}
	defer os.RemoveAll(scratch)
	defer os.Remove(scratch + ".json")
	h := n.ext.hostDir
	spec := containerSpec{Scratch: scratch, Program: bin, Argv: []string{typ}, Env: env, Hostname: n.Name,
		Mounts: []containerMount{
			{Kind: mountBind, Source: filepath.Join(h, "etc/cni/net.d"), Target: "/etc/cni/net.d"},
			{Kind: mountBind, Source: filepath.Join(h, "opt/cni/bin"), Target: "/opt/cni/bin"},
			{Kind: mountBind, Source: filepath.Join(h, "run"), Target: "/run"},
		}}
	if err := os.WriteFile(scratch+".json", []byte(mustJSON(spec)), 0o600); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), cniPluginLimit)
	defer cancel()
	cmd := execHelper(n.cluster.opts.AppBin, containerHelper)
	cmd.Env = append(cmd.Env, containerSpecEnv+"="+scratch+".json")
	var stdout, stderr bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(stdin), &stdout, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNS | syscall.CLONE_NEWUTS}
	cg, err := n.Cgroup.Open()
	if err != nil {
		return nil, err
	}
	defer cg.Close()
	if err := startInNode(cmd, n.Net.NS.Fd(), int(n.ext.pidns.Fd()), int(cg.Fd())); err != nil {
		return nil, err
	}
	stop := context.AfterFunc(ctx, func() { _ = cmd.Process.Kill() })
	err = cmd.Wait()
	stop()
	if err != nil {
		return nil, fmt.Errorf("CNI %s %s: %w: %s %s", command, typ, err, strings.TrimSpace(stdout.String()), strings.TrimSpace(stderr.String()))
	}
	p.logf("CNI plugin ran", "command", command, "plugin", typ)
	n.ext.mu.Lock()
	n.ext.cni = append(n.ext.cni, command+" "+typ+" "+p.key)
	n.ext.mu.Unlock()
	return stdout.Bytes(), nil
}
