package bpf

import (
	"bufio"
	"net/netip"
	"os"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/cilium/ebpf/btf"
)

// TestABILayout checks every Go struct that crosses into a map against the
// BTF of the committed object: a header edited without regenerating, or a
// Go type edited by hand, fails here instead of corrupting maps.
func TestABILayout(t *testing.T) {
	spec, err := loadSockAddr()
	if err != nil {
		t.Fatal(err)
	}
	ops, err := loadSockOps()
	if err != nil {
		t.Fatal(err)
	}
	types := map[string]*btf.Spec{"conn_event": ops.Types}
	for cName, goVal := range map[string]any{
		"conn_event":     sockOpsConnEvent{},
		"managed_value":  sockAddrManagedValue{},
		"frontend_key":   sockAddrFrontendKey{},
		"frontend_value": sockAddrFrontendValue{},
		"service_value":  sockAddrServiceValue{},
		"endpoint_key":   sockAddrEndpointKey{},
		"endpoint_value": sockAddrEndpointValue{},
		"backend_value":  sockAddrBackendValue{},
		"sock_orig":      sockAddrSockOrig{},
		"tunnel_key":     sockAddrTunnelKey{},
		"tunnel_value":   sockAddrTunnelValue{},
		"udp_slot":       sockAddrUdpSlot{},
		"udp_affinity":   sockAddrUdpAffinity{},
	} {
		var st *btf.Struct
		from := spec.Types
		if types[cName] != nil {
			from = types[cName]
		}
		if err := from.TypeByName(cName, &st); err != nil {
			t.Errorf("%s: %v", cName, err)
			continue
		}
		gt := reflect.TypeOf(goVal)
		if uintptr(st.Size) != gt.Size() {
			t.Errorf("%s: C size %d, Go size %d", cName, st.Size, gt.Size())
		}
		var goFields []reflect.StructField
		for i := 0; i < gt.NumField(); i++ {
			if f := gt.Field(i); f.Name != "_" {
				goFields = append(goFields, f)
			}
		}
		if len(goFields) != len(st.Members) {
			t.Errorf("%s: %d C members, %d Go fields", cName, len(st.Members), len(goFields))
			continue
		}
		for i, m := range st.Members {
			if uintptr(m.Offset.Bytes()) != goFields[i].Offset {
				t.Errorf("%s.%s: C offset %d, Go %s offset %d", cName, m.Name, m.Offset.Bytes(), goFields[i].Name, goFields[i].Offset)
			}
		}
	}
}

// TestABIConstants keeps the Go mirrors of kmesh_consts.h equal to the header.
func TestABIConstants(t *testing.T) {
	f, err := os.Open("include/kmesh_consts.h")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	consts := map[string]int{}
	re := regexp.MustCompile(`^\s*(?:#define\s+)?([A-Z][A-Z0-9_]+)\s*=?\s*(0x[0-9a-fA-F]+|\d+),?`)
	s := bufio.NewScanner(f)
	for s.Scan() {
		if m := re.FindStringSubmatch(s.Text()); m != nil {
			v, err := strconv.ParseInt(m[2], 0, 64)
			if err != nil {
				t.Fatal(err)
			}
			consts[m[1]] = int(v)
		}
	}
	for name, goVal := range map[string]int{
		"KMESH_MAX_RANKS":     MaxRanks,
		"KMESH_FAMILIES":      familyCount,
		"KMESH_FAMILY_V4":     int(FamilyV4),
		"KMESH_FAMILY_V6":     int(FamilyV6),
		"FRONTEND_SERVICE":    int(FrontendService),
		"FRONTEND_WORKLOAD":   int(FrontendWorkload),
		"BACKEND_F_HBONE":     backendFlagHBONE,
		"BACKEND_F_LOCAL":     backendFlagLocal,
		"BACKEND_F_WAYPOINT":  backendFlagWaypoint,
		"BACKEND_F_POLICY":    backendFlagPolicy,
		"BACKEND_F_KAUTHZ":    backendFlagKAuthz,
		"KMESH_AUTHZ_PORTS":   AuthzPorts,
		"PATH_AUTHZ":          int(PathAuthz),
		"CONN_EV_DENY":        int(ConnDeny),
		"SPLICE_NS_INPOD":     int(SpliceInPod),
		"SPLICE_NS_PEERS":     int(SplicePeers),
		"SPLICE_NS_SIDECAR":   int(SpliceSidecar),
		"PATH_SIDECAR":        pathSidecar,
		"KMESH_SIDECAR_UID":   1337,
		"SPLICE_UNDECIDED":    spliceUndecided,
		"SPLICE_REDIRECT":     spliceRedirect,
		"SPLICE_TCP":          spliceTCP,
		"PATH_REFUSE":         int(PathRefuse),
		"PATH_DIRECT":         int(PathDirect),
		"PATH_PLAIN":          int(PathPlain),
		"PATH_TUNNEL":         int(PathTunnel),
		"PATH_WAYPOINT":       int(PathWaypoint),
		"PATH_BALANCE":        int(PathBalance),
		"PATH_PASSTHROUGH":    int(PathPassthrough),
		"PATH_MAX":            int(pathMax),
		"KMESH_PROXY_MARK":    ProxyMark,
		"KMESH_OUTBOUND_PORT": OutboundPort,
		"KMESH_HBONE_PORT":    HBONEPort,
		"LB_MODE_STANDARD":    int(LBStandard),
		"LB_MODE_STRICT":      int(LBStrict),
		"LB_MODE_FAILOVER":    int(LBFailover),
		"LB_MODE_PASSTHROUGH": int(LBPassthrough),
	} {
		if c, ok := consts[name]; !ok || c != goVal {
			t.Errorf("%s: header %d (found %v), Go %d", name, c, ok, goVal)
		}
	}
	// Stat names follow enum kmesh_stat order; kmesh_stats' frozen size
	// and the extension's room are the header's.
	if consts["STAT_MAX"] != statMax {
		t.Errorf("STAT_MAX: header %d, Go %d (kmesh_stats' size is frozen: counters beyond go to kmesh_stats_ext)", consts["STAT_MAX"], statMax)
	}
	if n := len(statNames) - statMax; n > consts["STAT_EXT_MAX"] {
		t.Errorf("%d counters beyond STAT_MAX, kmesh_stats_ext has room for %d", n, consts["STAT_EXT_MAX"])
	}
	for i, name := range statNames {
		cName := "STAT_" + strings.ToUpper(name)
		if c, ok := consts[cName]; !ok || c != i {
			t.Errorf("stat %s: header %s = %d (found %v), Go index %d", name, cName, c, ok, i)
		}
	}
}

func TestEncoding(t *testing.T) {
	for _, tc := range []struct {
		name string
		k    FrontendKey
	}{
		{"ipv4", FrontendKey{Addr: netip.MustParseAddr("10.96.0.10"), Port: 80, Proto: TCP}},
		{"ipv6", FrontendKey{Addr: netip.MustParseAddr("fd00::10"), Port: 443, Proto: UDP}},
		{"workload", FrontendKey{Addr: netip.MustParseAddr("10.244.0.5"), Port: 0, Proto: TCP}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			enc := encodeFrontendKey(tc.k)
			if got := decodeFrontendKey(enc); got != tc.k {
				t.Fatalf("round trip %v -> %v", tc.k, got)
			}
			// The kernel compares raw bytes: port in network order, IPv4 v4-mapped.
			b := (*[2]byte)(reflect.ValueOf(&enc.Port).UnsafePointer())
			if uint16(b[0])<<8|uint16(b[1]) != tc.k.Port {
				t.Fatalf("port bytes %v not network order for %d", b, tc.k.Port)
			}
			raw := wordsRaw(enc.Addr)
			if want := tc.k.Addr.As16(); raw != want {
				t.Fatalf("address bytes %v, want %v", raw, want)
			}
		})
	}
	be := Backend{ID: 7, Addr4: netip.MustParseAddr("10.0.0.1"), Addr6: netip.MustParseAddr("fd00::1"), Identity: 3, Capacity: 2,
		PathSvc: PathTunnel, PathAddr: PathWaypoint, PathUDP: PathPlain, HBONE: true, Local: true, Waypoint: true, Policy: true}
	if got := decodeBackend(7, encodeBackend(be)); got != be {
		t.Fatalf("backend round trip %+v -> %+v", be, got)
	}
	v4only := Backend{ID: 1, Addr4: netip.MustParseAddr("10.0.0.2")}
	if got := decodeBackend(1, encodeBackend(v4only)); got != v4only {
		t.Fatalf("v4-only backend round trip %+v -> %+v", v4only, got)
	}
	fe := Frontend{Key: FrontendKey{Addr: netip.MustParseAddr("10.0.0.3"), Port: 53, Proto: UDP}, Kind: FrontendService, ID: 9, TargetPort: 5353, Path: PathPassthrough}
	if got := decodeFrontend(encodeFrontendKey(fe.Key), encodeFrontendValue(fe)); got != fe {
		t.Fatalf("frontend round trip %+v -> %+v", fe, got)
	}
}

func wordsRaw(w [4]uint32) [16]byte {
	return *(*[16]byte)(reflect.ValueOf(&w).UnsafePointer())
}
