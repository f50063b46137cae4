# Kmesh. `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION) -X kmesh.dev/kmesh/ambient/agent.Version=$(VERSION)
BIN := bin

.PHONY: help build generate check-generate test cluster-bins fuzz lint bench bench-tools bench-quick bench-hbone bench-program bench-sync demo manifests image clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## build kmesh-daemon, kmesh-cni, kmeshctl and the node simulator (kmesh-sim, test harness) into bin/
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/... ./integration/cmd/kmesh-sim

generate: ## regenerate the bpf2go output (needs clang, llvm-strip, libbpf headers)
	$(GO) generate ./bpf/...

check-generate: generate ## fail if the committed bpf2go output is stale
	@git diff --exit-code -- bpf/ || { echo "bpf2go output differs from the committed one: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- bpf/)" || { git status --porcelain -- bpf/; echo "untracked bpf2go output: commit it"; exit 1; }

# make test runs the product's packages (unit and kernel tiers) under the race
# detector, and the harness (integration/: the simulator and the end-to-end
# tests, which link Istio's discovery server and CA) without it, where it
# would cost more than the rest of the run together. Every package runs once.
# The cluster tier (integration/cluster and integration/simexternal: real
# etcd, kube-apiserver, pilot-discovery, ~1 GB and both cores while they
# start) runs last, one package at a time, so that it neither slows nor is
# slowed by the simulator's timing-sensitive tests.
RACE_PKGS = $(shell $(GO) list ./... | grep -v '^kmesh.dev/kmesh/integration/')
CLUSTER_PKGS = kmesh.dev/kmesh/integration/cluster kmesh.dev/kmesh/integration/simexternal
NORACE_PKGS = $(shell $(GO) list ./integration/... | grep -vx -e kmesh.dev/kmesh/integration/cluster -e kmesh.dev/kmesh/integration/simexternal)

test: ## all test tiers (the product under -race; allocation counts, which sync.Pool makes random under -race, without it); kernel, end-to-end and cluster tiers need root (CI sets KMESH_REQUIRE_PRIVILEGED=1)
	@rc=0; \
	if [ "$$(id -u)" = 0 ]; then $(MAKE) --no-print-directory cluster-bins || rc=1; fi; \
	$(GO) run ./integration/cmd/testsummary $(GO) test -json -count=1 -race -timeout 30m $(RACE_PKGS) || rc=1; \
	$(GO) run ./integration/cmd/testsummary $(GO) test -json -count=1 -run 'RoundTripAllocs$$|IdleMemory$$' ./ambient/tunnel || rc=1; \
	$(GO) run ./integration/cmd/testsummary $(GO) test -json -count=1 -timeout 30m $(NORACE_PKGS) || rc=1; \
	$(GO) run ./integration/cmd/testsummary $(GO) test -json -count=1 -p 1 -timeout 30m $(CLUSTER_PKGS) || rc=1; \
	exit $$rc

# The cluster tier (integration/cluster) runs real etcd, kube-apiserver,
# kube-controller-manager, pilot-discovery and istioctl, built from their Go
# modules into a cache that outlives the run. make test builds them first
# (as root, who runs that tier), so that a cold build (about 15 minutes on
# two cores) does not eat into the tests' timeout; warm, this is a hash check.
cluster-bins: ## build the cluster tier's control-plane binaries into KMESH_CLUSTER_CACHE (default /var/cache/kmesh-cluster-bins)
	$(GO) run ./integration/cmd/cluster-bins

# Fuzz targets are found, not listed by hand: the packages holding a
# `func Fuzz...` in a _test.go file, then `go test -list` in each (so build
# tags and helpers named Fuzz* in non-test code do not count).
FUZZTIME ?= 30s

fuzz: ## run every fuzz target for FUZZTIME each (default 30s); fails on the first crash (its input lands in testdata/fuzz/)
	@pkgs=$$(grep -rlE --include='*_test.go' '^func Fuzz[A-Z0-9_]' . | xargs -r -n1 dirname | sort -u); \
	test -n "$$pkgs" || { echo "no fuzz targets found"; exit 1; }; \
	n=0; for pkg in $$pkgs; do \
		targets=$$($(GO) test -list '^Fuzz' $$pkg | grep '^Fuzz') || { echo "listing fuzz targets of $$pkg failed"; exit 1; }; \
		for target in $$targets; do \
			echo "== $$pkg $$target ($(FUZZTIME))"; \
			$(GO) test -run '^$$' -fuzz "^$$target\$$" -fuzztime $(FUZZTIME) $$pkg || exit 1; \
			n=$$((n+1)); \
		done; \
	done; \
	echo "fuzz: $$n targets, $(FUZZTIME) each, no crash"

lint: ## gofmt, go vet, import rules (product never imports integration/; cilium/ebpf only in bpf/), clang-format
	@out=$$(gofmt -l $$(git ls-files '*.go' | grep -v '_bpfe[lb].go$$')); test -z "$$out" || { echo "gofmt:"; echo "$$out"; exit 1; }
	$(GO) vet ./...
	$(GO) run ./integration/cmd/layercheck
	clang-format --dry-run -Werror bpf/*.c bpf/include/*.h bpf/decidetest/*.c

TOOLS := $(abspath bin/tools)

$(TOOLS)/fortio:
	GOBIN=$(TOOLS) $(GO) install fortio.org/fortio@v1.68.2

bench-tools: $(TOOLS)/fortio
	$(GO) build -o $(BIN)/kmesh-bench ./integration/cmd/kmesh-bench

bench: build bench-tools ## the data path harness (~1 h) and the program cost; results in docs/benchmarks/ (needs root)
	$(BIN)/kmesh-bench -out docs/benchmarks -daemon $(BIN)/kmesh-daemon -fortio $(TOOLS)/fortio
	$(MAKE) bench-program

bench-quick: build bench-tools ## the data path harness in a few minutes (needs root)
	$(BIN)/kmesh-bench -quick -out docs/benchmarks -daemon $(BIN)/kmesh-daemon -fortio $(TOOLS)/fortio

# DAEMON_B: another kmesh-daemon build (e.g. main's, built in a git worktree) measured next to
# this one in the same run (arm kmesh-hbone-b); NOTE: a line for the report naming both commits.
bench-hbone: build bench-tools ## HBONE vs the haproxy mTLS pair, 7 repetitions, A/B with DAEMON_B if set: docs/benchmarks/hbone.* (needs root, ~17 min)
	$(BIN)/kmesh-bench -quick -reps 7 -duration 3s -arms kmesh-hbone,haproxy-mtls -prefix hbone -out docs/benchmarks \
		-daemon $(BIN)/kmesh-daemon $(if $(DAEMON_B),-daemon-b $(DAEMON_B)) -note "$(NOTE)" -fortio $(TOOLS)/fortio

bench-program: ## cost of one connect through kmesh_connect4 (needs root)
	@mkdir -p docs/benchmarks
	$(GO) test -run '^$$' -bench . -benchtime 10000x -count 5 ./ambient/dataplane/ | tee docs/benchmarks/connect-program.txt

bench-sync: build ## control-plane sync: full sync time, daemon RSS, update latency (needs root)
	$(GO) run ./integration/cmd/syncbench -services 1000,10000 -istiod-max 1000 -updates 200 -repeat 3 -out docs/benchmarks

demo: build ## the node simulator demo (needs root): kmeshctl demo runs bin/kmesh-sim
	$(BIN)/kmeshctl demo

# The image make image builds and the assembled profile names.
IMAGE ?= ghcr.io/kmesh-dev/kmesh:latest

manifests: ## istioctl install package in out/manifests: the pinned Istio charts + profiles/kmesh.yaml (IMAGE=ref to name another image)
	$(GO) run ./integration/cmd/manifests -out out/manifests -image $(IMAGE)

image: ## Kmesh's image (static binaries, entrypoint kmesh-daemon) as an OCI layout in out/image, named IMAGE; no docker needed
	$(GO) run ./integration/cmd/kmesh-image -out out/image -ref $(IMAGE) -version $(VERSION)

clean:
	rm -rf $(BIN) out
