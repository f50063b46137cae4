# Kmesh. `make help` lists the targets.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)
BIN := bin

.PHONY: help build generate check-generate test lint bench bench-tools bench-quick bench-program bench-sync demo clean

help: ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## build kmesh-daemon, kmesh-cni, kmeshctl and the node simulator (kmesh-sim, test harness) into bin/
	$(GO) build -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/... ./integration/cmd/kmesh-sim

generate: ## regenerate the bpf2go output (needs clang, llvm-strip, libbpf headers)
	$(GO) generate ./bpf/...

check-generate: generate ## fail if the committed bpf2go output is stale
	@git diff --exit-code -- bpf/ || { echo "bpf2go output differs from the committed one: run make generate and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- bpf/)" || { git status --porcelain -- bpf/; echo "untracked bpf2go output: commit it"; exit 1; }

test: ## all test tiers; kernel and end-to-end tiers need root (CI sets KMESH_REQUIRE_PRIVILEGED=1)
	$(GO) run ./integration/cmd/testsummary $(GO) test -json -count=1 -timeout 30m ./...

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

bench-program: ## cost of one connect through kmesh_connect4 (needs root)
	@mkdir -p docs/benchmarks
	$(GO) test -run '^$$' -bench . -benchtime 10000x -count 5 ./ambient/dataplane/ | tee docs/benchmarks/connect-program.txt

bench-sync: build ## control-plane sync: full sync time, daemon RSS, update latency (needs root)
	$(GO) run ./integration/cmd/syncbench -services 1000,10000 -istiod-max 1000 -updates 200 -repeat 3 -out docs/benchmarks

demo: build ## the node simulator demo (needs root): kmeshctl demo runs bin/kmesh-sim
	$(BIN)/kmeshctl demo

clean:
	rm -rf $(BIN)
