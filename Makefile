# regmirror: build, run and test.
CARGO ?= cargo

.PHONY: all build run test test-deps unit fmt lint bench clean

all: build

build:
	$(CARGO) build --workspace --bins

## Run the cache on its embedded defaults (Docker Hub mirror on :5000, ./data).
run:
	$(CARGO) run --release -p regmirror-cache

## The whole test suite: unit tests and end-to-end tests against real peers.
test: test-deps
	$(CARGO) build --workspace --bins
	$(CARGO) test --workspace --no-fail-fast

test-deps:
	./scripts/install-test-deps.sh
	./scripts/install-go-tools.sh

## Benchmarks (issue 7): regmirror-cache vs distribution's proxy mode, side by side.
## Not part of `make test`. BENCH_QUICK=1 for a short smoke run; results in bench/results/latest.md.
bench:
	./scripts/install-test-deps.sh
	$(CARGO) build --release -p regmirror-cache
	$(CARGO) build --release -p regmirror-bench
	ulimit -n $$(ulimit -Hn) 2>/dev/null || true; \
	  REGMIRROR_BIN_DIR=$(CURDIR)/target/release ./target/release/regmirror-bench

unit:
	$(CARGO) test --workspace --lib

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
