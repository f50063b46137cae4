// Package config reads the daemon's configuration from, in increasing
// precedence: built-in defaults, an optional YAML file, environment
// variables (ztunnel's names where ztunnel has one, so Kmesh can run in
// ztunnel's DaemonSet slot unchanged), and command-line flags.
package config

import (
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/spf13/pflag"
	"github.com/spf13/viper"

	"kmesh.dev/kmesh/bpf"
)

// Config is everything the daemon is told.
type Config struct {
	// Kernel data path.
	CgroupPath string `mapstructure:"cgroup_path"`
	PinRoot    string `mapstructure:"pin_root"`
	NoPeerVIP  bool   `mapstructure:"no_peer_vip"`
	// ConnEvents: report kernel-path connections from the kernel.
	ConnEvents bool `mapstructure:"conn_events"`
	// Splice: splice enrolled pods' same-node connections with sockmap.
	Splice bool `mapstructure:"splice"`
	// SpliceBudget: bytes one direction of a spliced connection may
	// redirect before it goes to TCP (the kernel does not bound a spliced
	// reader's queue; TCP's flow control then does).
	SpliceBudget uint64 `mapstructure:"splice_budget"`
	// SidecarSplice: splice the in-pod legs of sidecar pods annotated
	// kmesh.dev/splice (ambient/sidecar), learnt from a node-local watch
	// of the Kubernetes API at KubeAPI with the token and CA files.
	SidecarSplice bool   `mapstructure:"sidecar_splice"`
	KubeAPI       string `mapstructure:"kube_api"`
	KubeTokenFile string `mapstructure:"kube_token_file"`
	KubeCAFile    string `mapstructure:"kube_ca_file"`
	HostProc      string `mapstructure:"host_proc"`
	Maps          struct {
		Managed  uint32 `mapstructure:"managed"`
		Frontend uint32 `mapstructure:"frontend"`
		Service  uint32 `mapstructure:"service"`
		Endpoint uint32 `mapstructure:"endpoint"`
		Backend  uint32 `mapstructure:"backend"`
		Events   uint32 `mapstructure:"events"`
		Splice   uint32 `mapstructure:"splice"`
		// UDP is no longer used (unconnected UDP affinity lives in socket
		// storage, one per socket); kept so existing files still load.
		UDP uint32 `mapstructure:"udp"`
	} `mapstructure:"maps"`

	// Ports of the node-level servers (ztunnel's).
	AdminAddr     string `mapstructure:"admin_addr"`
	StatsAddr     string `mapstructure:"stats_addr"`
	ReadinessAddr string `mapstructure:"readiness_addr"`

	// Identity of this node and of the daemon's own pod, as ztunnel takes them.
	NodeName     string `mapstructure:"node_name"`
	PodName      string `mapstructure:"pod_name"`
	PodNamespace string `mapstructure:"pod_namespace"`
	InstanceIP   string `mapstructure:"instance_ip"`
	ClusterID    string `mapstructure:"cluster_id"`
	Network      string `mapstructure:"network"`
	TrustDomain  string `mapstructure:"trust_domain"`

	// Control plane.
	XDSAddress    string        `mapstructure:"xds_address"`
	XDSServerName string        `mapstructure:"xds_server_name"`
	XDSPlaintext  bool          `mapstructure:"xds_plaintext"`
	CAAddress     string        `mapstructure:"ca_address"`
	RootCertFile  string        `mapstructure:"root_cert_file"`
	TokenFile     string        `mapstructure:"token_file"`
	SecretTTL     time.Duration `mapstructure:"secret_ttl"`
	LocalXDSPath  string        `mapstructure:"local_xds_path"`
	ZDSSocket     string        `mapstructure:"zds_socket"`
	// ListenerHolder is the listener holder's socket (kmesh-daemon hold):
	// the pods' listeners outlive a crashing daemon there. Empty: none.
	ListenerHolder string        `mapstructure:"listener_holder"`
	DrainDuration  time.Duration `mapstructure:"drain_duration"`
	// RemoveWhenIdle removes the data path from the node at a graceful
	// stop when no pod is enrolled and no successor took it over (an
	// uninstall, not an upgrade or a restart).
	RemoveWhenIdle bool `mapstructure:"remove_when_idle"`

	LogLevel string `mapstructure:"log_level"`
	// LogFormat is ztunnel's LOG_FORMAT: "json", or text otherwise.
	LogFormat string `mapstructure:"log_format"`
	// AccessLog turns the connection access log on at start (switchable
	// at runtime); AccessLogRate bounds its lines a second.
	AccessLog     bool   `mapstructure:"access_log"`
	AccessLogRate uint32 `mapstructure:"access_log_rate"`
	// Level is the daemon's running log level, which the admin port's
	// /logging changes. Not a setting: the daemon's main creates it from
	// LogLevel and its logger reads it. Nil: the level is fixed.
	Level *slog.LevelVar `mapstructure:"-"`
	// DNS proxy (ztunnel's): DNSCapture is ztunnel's DNS_CAPTURE proxy
	// metadata (ISTIO_META_DNS_CAPTURE): unset or "true" (any case) runs
	// the server in every pod, anything else turns it off (DNSEnabled).
	// DNSProxyAddr is ztunnel's DNS_PROXY_ADDR; its port is the in-pod
	// port. DNSKernelCapture sends enrolled pods' port-53 queries to it
	// from the kernel (istio-cni's DNS capture does the same with
	// iptables). DNSResolvConf names the upstream resolvers; ClusterDomain
	// is ztunnel's CLUSTER_DOMAIN.
	DNSCapture       string `mapstructure:"dns_capture"`
	DNSProxyAddr     string `mapstructure:"dns_proxy_addr"`
	DNSKernelCapture bool   `mapstructure:"dns_kernel_capture"`
	DNSResolvConf    string `mapstructure:"dns_resolv_conf"`
	ClusterDomain    string `mapstructure:"cluster_domain"`
	// WorkerThreads bounds the threads running Go code (GOMAXPROCS): the
	// tunnel's latency and CPU per request depend on it (see README).
	WorkerThreads uint32 `mapstructure:"worker_threads"`
}

// DNSEnabled says whether the DNS proxy runs, as ztunnel reads its
// DNS_CAPTURE metadata: absent or "true" in any case.
func (c *Config) DNSEnabled() bool {
	return c.DNSCapture == "" || strings.EqualFold(c.DNSCapture, "true")
}

// DNSPort is the in-pod DNS port, from DNSProxyAddr (15053 when it has none).
func (c *Config) DNSPort() (uint16, error) {
	if c.DNSProxyAddr == "" {
		return 15053, nil
	}
	ap, err := netip.ParseAddrPort(c.DNSProxyAddr)
	if err != nil || ap.Port() == 0 {
		return 0, fmt.Errorf("ISTIO_META_DNS_PROXY_ADDR=%q: want an address and a port", c.DNSProxyAddr)
	}
	return ap.Port(), nil
}

// MapSizes converts the configured sizes for the loader.
func (c *Config) MapSizes() bpf.MapSizes {
	return bpf.MapSizes{Managed: c.Maps.Managed, Frontend: c.Maps.Frontend, Service: c.Maps.Service,
		Endpoint: c.Maps.Endpoint, Backend: c.Maps.Backend, Events: c.Maps.Events,
		Splice: c.Maps.Splice}
}

// setting is one configuration key: its default, the environment variable
// that sets it (ztunnel's where one exists) and its flag help.
type setting struct {
	key, env, help string
	def            any
}

var settings = []setting{
	{"cgroup_path", "KMESH_CGROUP_PATH", "cgroup v2 directory to attach to (default: the hierarchy root)", ""},
	{"pin_root", "KMESH_PIN_ROOT", "bpffs directory holding pinned maps and links", bpf.DefaultPinRoot},
	{"no_peer_vip", "KMESH_NO_PEER_VIP", "do not restore the service VIP as peer name (saves ~0.6us per connect)", false},
	{"conn_events", "KMESH_CONN_EVENTS", "report kernel-path connections (Istio metrics, access logs for connections the proxy never sees; ~2us of sockops time per connection of an enrolled pod)", true},
	{"splice", "KMESH_SPLICE", "splice enrolled pods' connections whose both ends are on this node (kernel path, the tunnel's in-pod legs) with sockmap; off by default: an application reading such a socket with splice(2) gets the FIN without the bytes (Linux 6.18)", false},
	{"splice_budget", "KMESH_SPLICE_BUDGET", "bytes one direction of a spliced connection may move through sockmap before the rest goes through TCP: Linux 6.18 queues spliced bytes at the reader without bound (a writer faster than its reader would grow kernel memory until the node's TCP limit, then get ENOMEM), TCP's flow control bounds what follows", uint64(16 << 20)},
	{"sidecar_splice", "KMESH_SIDECAR_SPLICE", "splice the sidecar-to-application loopback legs of pods that keep an Istio sidecar and are annotated kmesh.dev/splice: \"true\" (or whose namespace is); watches this node's pods and the namespaces in the Kubernetes API (needs the chart's sidecarSplice RBAC)", false},
	{"kube_api", "KMESH_KUBE_API", "Kubernetes API server for sidecar_splice (default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)", ""},
	{"kube_token_file", "KMESH_KUBE_TOKEN_FILE", "service account token for the Kubernetes API (sidecar_splice)", "/var/run/secrets/kubernetes.io/serviceaccount/token"},
	{"kube_ca_file", "KMESH_KUBE_CA_FILE", "CA bundle of the Kubernetes API (sidecar_splice)", "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"},
	{"host_proc", "KMESH_HOST_PROC", "the node's /proc (sidecar_splice finds pods' network namespaces from their processes' cgroups there)", "/proc"},
	{"maps.managed", "KMESH_MAP_MANAGED", "max enrolled pods on the node", uint32(4096)},
	{"maps.frontend", "KMESH_MAP_FRONTEND", "max service VIP:port/proto and workload IP entries", uint32(262144)},
	{"maps.service", "KMESH_MAP_SERVICE", "max load-balancing sets", uint32(65536)},
	{"maps.endpoint", "KMESH_MAP_ENDPOINT", "max endpoint slots (twice the live ones fit during an update)", uint32(524288)},
	{"maps.backend", "KMESH_MAP_BACKEND", "max workloads", uint32(131072)},
	{"maps.events", "KMESH_MAP_EVENTS", "bytes of the kernel-path connection events' ring buffer (a power of two; ~100 bytes an event)", uint32(1 << 20)},
	{"maps.splice", "KMESH_MAP_SPLICE", "max spliced connection ends (two per connection; beyond: plain TCP, counted)", uint32(65536)},
	{"maps.udp", "KMESH_MAP_UDP", "unused (UDP affinity is per-socket storage now)", uint32(65536)},
	{"admin_addr", "KMESH_ADMIN_ADDR", "admin server (/config_dump, /logging, /quitquitquit, /debug/pprof)", "localhost:15000"},
	{"stats_addr", "KMESH_STATS_ADDR", "Prometheus metrics", ":15020"},
	{"readiness_addr", "KMESH_READINESS_ADDR", "readiness probe", ":15021"},
	{"node_name", "NODE_NAME", "name of this node", ""},
	{"pod_name", "POD_NAME", "name of the daemon's pod", ""},
	{"pod_namespace", "POD_NAMESPACE", "namespace of the daemon's pod", "istio-system"},
	{"instance_ip", "INSTANCE_IP", "IP of the daemon's pod", ""},
	{"cluster_id", "CLUSTER_ID", "cluster the node belongs to", "Kubernetes"},
	{"network", "NETWORK", "network the node belongs to", ""},
	{"trust_domain", "TRUST_DOMAIN", "SPIFFE trust domain", "cluster.local"},
	{"xds_address", "XDS_ADDRESS", "istiod xDS address", "istiod.istio-system.svc:15012"},
	{"xds_server_name", "ALT_XDS_HOSTNAME", "name verified in istiod's certificate (default: host of the xDS address)", ""},
	{"xds_plaintext", "KMESH_XDS_PLAINTEXT", "talk to istiod without TLS (development only)", false},
	{"ca_address", "CA_ADDRESS", "istiod CA address (default: the xDS address)", ""},
	{"root_cert_file", "XDS_ROOT_CA", "mesh root certificate for the control plane", "/var/run/secrets/istio/root-cert.pem"},
	{"token_file", "KMESH_TOKEN_FILE", "service account token presented to istiod", "/var/run/secrets/tokens/istio-token"},
	{"secret_ttl", "SECRET_TTL", "validity of the workload certificates asked from the CA", 24 * time.Hour},
	{"zds_socket", "KMESH_ZDS_SOCKET", "node agent socket the pods' network namespaces come from (empty: no enrolment)", "/var/run/ztunnel/ztunnel.sock"},
	{"listener_holder", "KMESH_LISTENER_HOLDER", "listener holder socket (kmesh-daemon hold): the pods' listeners outlive a crash of the daemon there, new connections wait instead of being refused (empty: none)", ""},
	{"local_xds_path", "LOCAL_XDS_PATH", "YAML file of workloads and services used instead of istiod", ""},
	{"drain_duration", "TERMINATION_GRACE_PERIOD_SECONDS", "time to drain connections on shutdown (from the env: the pod's grace period in seconds, of which the drain takes all but 5 s, 1 s when it is 10 s or less, as ztunnel)", 5 * time.Second},
	{"remove_when_idle", "KMESH_REMOVE_WHEN_IDLE", "at a graceful stop with no pod enrolled in the kernel or opted into splicing and no newer daemon holding the data path (an uninstall: Istio takes pods out of the mesh first), detach the programs and remove the pinned state, as kmesh-daemon uninstall does; the chart and the istioctl profile turn it on", false},
	{"log_level", "KMESH_LOG_LEVEL", "error, warn, info, debug, trace or off (the admin port's /logging changes it at runtime)", "info"},
	{"log_format", "LOG_FORMAT", "json for JSON logs (ztunnel's variable), text otherwise", ""},
	{"access_log", "KMESH_ACCESS_LOG", "log each connection as it ends, ztunnel's access log (switchable at runtime)", true},
	{"access_log_rate", "KMESH_ACCESS_LOG_RATE", "access log lines a second at most (beyond: dropped and counted)", uint32(100)},
	{"dns_capture", "ISTIO_META_DNS_CAPTURE", "ztunnel's DNS proxy in every enrolled pod on the DNS port: unset or true runs it, anything else turns it off", ""},
	{"dns_proxy_addr", "ISTIO_META_DNS_PROXY_ADDR", "address of the DNS proxy in each pod (ztunnel's DNS_PROXY_ADDR; it listens on the pod's loopback at this port)", "127.0.0.1:15053"},
	{"dns_kernel_capture", "KMESH_DNS_KERNEL_CAPTURE", "with the DNS proxy on, send enrolled pods' DNS (port 53, UDP and TCP) to it from the kernel (no iptables)", true},
	{"dns_resolv_conf", "KMESH_DNS_RESOLV_CONF", "resolver configuration whose nameservers the DNS proxy forwards to", "/etc/resolv.conf"},
	{"cluster_domain", "CLUSTER_DOMAIN", "the cluster's DNS domain", "cluster.local"},
	{"worker_threads", "ZTUNNEL_WORKER_THREADS", "threads running the proxy's Go code (GOMAXPROCS; 0: one per CPU)", uint32(2)},
}

// EnvNames returns the environment variables the daemon takes settings from,
// in the order of the settings table. Deployment manifests are checked
// against it (integration/charttest), so a variable the chart sets that the
// daemon does not read is caught.
func EnvNames() []string {
	names := make([]string, 0, len(settings)+len(envOverrides))
	for _, s := range settings {
		names = append(names, s.env)
	}
	for _, k := range slices.Sorted(maps.Keys(envOverrides)) {
		names = append(names, envOverrides[k])
	}
	return names
}

// envOverrides are variables that win over a setting's own, as in
// ztunnel: ISTIO_META_CLUSTER_ID (what ztunnel's chart sets) over
// CLUSTER_ID.
var envOverrides = map[string]string{"cluster_id": "ISTIO_META_CLUSTER_ID"}

// DrainFor is how long connections drain when the pod has grace to stop:
// ztunnel's rule, all but 5 s of it (1 s when it is 10 s or less), so the
// forced close happens before Kubernetes kills the process.
func DrainFor(grace time.Duration) time.Duration {
	switch {
	case grace > 10*time.Second:
		return grace - 5*time.Second
	case grace > time.Second:
		return grace - time.Second
	}
	return grace
}

// Flags registers every setting as a flag (dots become dashes).
func Flags(fs *pflag.FlagSet) {
	fs.String("config", "", "YAML configuration file")
	for _, s := range settings {
		name := strings.ReplaceAll(strings.ReplaceAll(s.key, ".", "-"), "_", "-")
		help := fmt.Sprintf("%s (env %s)", s.help, s.env)
		switch d := s.def.(type) {
		case string:
			fs.String(name, d, help)
		case bool:
			fs.Bool(name, d, help)
		case uint32:
			fs.Uint32(name, d, help)
		case uint64:
			fs.Uint64(name, d, help)
		case time.Duration:
			fs.Duration(name, d, help)
		}
	}
}

// Load resolves the configuration from defaults, file, environment and fs.
func Load(fs *pflag.FlagSet, getenv func(string) string) (*Config, error) {
	// Environment and flags are applied with Set, which viper ranks above the
	// file; flags come last and win.
	v := viper.New()
	for _, s := range settings {
		v.SetDefault(s.key, s.def)
		e := getenv(s.env)
		if o := envOverrides[s.key]; o != "" && getenv(o) != "" {
			e = getenv(o)
		}
		if e == "" {
			continue
		}
		if s.key == "drain_duration" {
			if !strings.ContainsAny(e, "smh") {
				e += "s" // ztunnel's variable is whole seconds
			}
			grace, err := time.ParseDuration(e)
			if err != nil || grace < 0 {
				return nil, fmt.Errorf("%s=%q: want the pod's grace period in whole seconds", s.env, getenv(s.env))
			}
			e = DrainFor(grace).String()
		}
		v.Set(s.key, e)
	}
	if fs != nil {
		if f := fs.Lookup("config"); f != nil && f.Value.String() != "" {
			v.SetConfigFile(f.Value.String())
			if err := v.ReadInConfig(); err != nil {
				return nil, fmt.Errorf("reading config file: %w", err)
			}
		}
		for _, s := range settings {
			name := strings.ReplaceAll(strings.ReplaceAll(s.key, ".", "-"), "_", "-")
			if f := fs.Lookup(name); f != nil && f.Changed {
				v.Set(s.key, f.Value.String())
			}
		}
	}
	var c Config
	if err := v.Unmarshal(&c); err != nil {
		return nil, fmt.Errorf("configuration: %w", err)
	}
	if c.CAAddress == "" {
		c.CAAddress = c.XDSAddress
	}
	return &c, nil
}
