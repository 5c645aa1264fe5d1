# regmirror: build, run and test.
CARGO ?= cargo

.PHONY: all build run test test-deps unit fmt lint bench clean fuzz crds

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

## Regenerate the RegistryMirror CRD from the Rust types (a unit test fails when it drifts).
crds:
	$(CARGO) run -q -p regmirror-operator -- crd > crds/registrymirror.yaml

test-deps:
	./scripts/install-test-deps.sh
	./scripts/install-go-tools.sh

unit:
	$(CARGO) test --workspace --lib

## Fuzz the parsers that face untrusted input (nightly + cargo-fuzz); new finds
## land in fuzz/corpus, which `make test` replays.
FUZZ_TARGETS := route range www_authenticate credentials references
FUZZ_SECONDS ?= 30
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	for t in $(FUZZ_TARGETS); do \
	  $(CARGO) +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096 || exit 1; \
	done

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
