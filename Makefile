# regmirror: build, run and test.
CARGO ?= cargo

.PHONY: all build run test test-deps unit fmt lint bench clean fuzz crds image

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

## Regenerate the RegistryMirror and RegistryMirrorNode CRDs from the Rust types (a unit test fails when it drifts).
## The Helm chart carries a copy (tests/tests/chart.rs fails when they differ).
crds:
	$(CARGO) run -q -p regmirror-operator -- crd > crds/registrymirror.yaml
	$(CARGO) run -q -p regmirror-operator -- crd --node > crds/registrymirrornode.yaml
	cp crds/registrymirror.yaml crds/registrymirrornode.yaml charts/regmirror/crds/

## Container images from the Containerfile: $(IMAGE_REPO)/regmirror-cache and
## $(IMAGE_REPO)/regmirror-operator, tagged $(IMAGE_TAG) (the chart's defaults).
## Uses the first of docker, podman or buildah that can build here
## (ENGINE=... to choose); without one it says so and succeeds.
IMAGE_REPO ?= ghcr.io/regmirror
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
ENGINE ?= $(shell for e in docker podman buildah; do command -v $$e >/dev/null 2>&1 && timeout 20 $$e info >/dev/null 2>&1 && { echo $$e; break; }; done)
image:
	@if [ -z "$(ENGINE)" ]; then \
	  echo "make image: no usable container engine (docker with a running daemon, podman or buildah); nothing built."; \
	  echo "  Install one and re-run, or build elsewhere: docker build -f Containerfile --target cache|operator ."; \
	  exit 0; \
	fi; \
	for t in cache operator; do \
	  img=$(IMAGE_REPO)/regmirror-$$t:$(IMAGE_TAG); \
	  echo "building $$img with $(ENGINE)"; \
	  if [ "$(ENGINE)" = buildah ]; then \
	    buildah build --layers -f Containerfile --target $$t -t $$img . || exit 1; \
	  else \
	    $(ENGINE) build -f Containerfile --target $$t -t $$img . || exit 1; \
	  fi; \
	done

test-deps:
	./scripts/install-test-deps.sh
	./scripts/install-go-tools.sh

## Benchmarks (issue 7): regmirror-cache vs distribution's proxy mode, side by side.
## Not part of `make test`. BENCH_QUICK=1 for a short smoke run; results in bench/results/latest.md.
bench:
	./scripts/install-test-deps.sh
	./scripts/install-go-tools.sh crane
	$(CARGO) build --release -p regmirror-cache
	$(CARGO) build --release -p regmirror-bench
	ulimit -n $$(ulimit -Hn) 2>/dev/null || true; \
	  REGMIRROR_BIN_DIR=$(CURDIR)/target/release ./target/release/regmirror-bench

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
