#!/usr/bin/env bash
# Installs the real peers the test suite runs against, only when missing:
# Debian's docker-registry (CNCF distribution), skopeo and containerd, and
# the CNI plugins (only `loopback`: the real node's network, tests/src/kubelet.rs).
set -euo pipefail

missing=()
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v skopeo >/dev/null || missing+=(skopeo)
command -v containerd >/dev/null && command -v ctr >/dev/null || missing+=(containerd)
[ -x /usr/lib/cni/loopback ] || missing+=(containernetworking-plugins)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install-test-deps: need root to install: ${missing[*]}" >&2
  exit 1
fi
echo "install-test-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
# The package starts a registry with htpasswd auth on :5000; tests run
# their own, and :5000 is the cache's default port.
if command -v systemctl >/dev/null && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
fi
