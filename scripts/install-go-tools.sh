#!/usr/bin/env bash
# Builds the Go-based test peers once per machine, from the Go module proxy,
# into a cache dir outside the repo:
#   ${REGMIRROR_TOOLS:-$HOME/.cache/regmirror}/bin
# Each tool has a stamp file (stamps/TOOL) holding the version it was built
# at; a tool whose binary and stamp match is skipped, so bumping a version
# below rebuilds just that tool. See scripts/control-plane.md.
#
# Usage: scripts/install-go-tools.sh [TOOL...]    (default: all tools)
#        scripts/install-go-tools.sh --bin-dir     (print the bin dir, build nothing)
#        scripts/install-go-tools.sh --list        (print tools and pinned versions)
#        scripts/install-go-tools.sh --kwok-stages (print the path of the Stage config
#                                                   that standalone kwok needs: --config)
# Env:   REGMIRROR_TOOLS        cache root (default $HOME/.cache/regmirror)
#        GO                     go binary (default: go on PATH, else /usr/local/go/bin/go)
#        GO_BUILD_P             go build -p (default 2)
#        REGMIRROR_TOOLS_TIMEOUT  seconds allowed per build step (default 3600)
# First run on 2 cores, nothing cached: about 12-13 minutes (kube-apiserver
# about 5 of them) and about 6.5 GB under $CACHE/go (deletable afterwards).
# Later runs print "cached" for every tool and take well under a second.
set -euo pipefail

# ---- pinned versions ---------------------------------------------------------
K8S_VERSION=v1.35.4          # kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet
K8S_STAGING_VERSION=v0.35.4  # the k8s.io/* staging modules matching K8S_VERSION
ETCD_VERSION=v3.6.16
HELM_VERSION=v3.22.0
CRANE_VERSION=v0.22.1
CRICTL_VERSION=v1.34.0
KUBECONFORM_VERSION=v0.8.0
KWOK_VERSION=v0.8.0
# opencontainers/distribution-spec conformance/ has no tagged releases on the
# module proxy (`go list -m -versions` lists none): pinned by pseudo-version.
# This is the Go-program rewrite (Go >= 1.24, OCI_REGISTRY/OCI_RO_DATA_*), not
# the old Ginkgo `go test` suite (OCI_ROOT_URL/OCI_TEST_PULL).
OCI_CONFORMANCE_VERSION=v0.0.0-20260831232431-97274622c111
# Local fixes applied to that version (in the stamp: bump when they change).
OCI_CONFORMANCE_PATCHES=p1
# Bump to force a rebuild of everything when the recipe itself changes.
RECIPE=r2

# kubelet: the suite's one real node (tests/src/kubelet.rs), from the same wrapper module.
K8S_TOOLS=(kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet)
ALL_TOOLS=("${K8S_TOOLS[@]}" etcd helm crane crictl kubeconform kwok oci-conformance)

# tool -> "module-path-of-main-package version" for plain go install
declare -A GO_INSTALL=(
  [helm]="helm.sh/helm/v3/cmd/helm $HELM_VERSION"
  [crane]="github.com/google/go-containerregistry/cmd/crane $CRANE_VERSION"
  [crictl]="sigs.k8s.io/cri-tools/cmd/crictl $CRICTL_VERSION"
  [kubeconform]="github.com/yannh/kubeconform/cmd/kubeconform $KUBECONFORM_VERSION"
  [kwok]="sigs.k8s.io/kwok/cmd/kwok $KWOK_VERSION"
)
# tool -> extra -X ldflags so `TOOL version` prints the real version
declare -A GO_INSTALL_X=(
  [helm]="helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  [crictl]="sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION"
  [kubeconform]="main.version=$KUBECONFORM_VERSION"
)

CACHE="${REGMIRROR_TOOLS:-$HOME/.cache/regmirror}"
BIN="$CACHE/bin"
STAMPS="$CACHE/stamps"
LOGS="$CACHE/logs"
SRC="$CACHE/src"
# Standalone kwok starts only with Stage configs (--config FILE); kwokctl
# embeds its defaults, plain kwok does not. Built next to the kwok binary.
KWOK_STAGES="$CACHE/share/kwok-stages.yaml"
TIMEOUT="${REGMIRROR_TOOLS_TIMEOUT:-3600}"
P="${GO_BUILD_P:-2}"

version_of() {
  case "$1" in
    kube-*|kubectl|kubelet) echo "$K8S_VERSION" ;;
    etcd) echo "$ETCD_VERSION" ;;
    oci-conformance) echo "$OCI_CONFORMANCE_VERSION" ;;
    *) echo "${GO_INSTALL[$1]#* }" ;;
  esac
}

case "${1:-}" in
  --bin-dir) echo "$BIN"; exit 0 ;;
  --list) for t in "${ALL_TOOLS[@]}"; do echo "$t $(version_of "$t")"; done; exit 0 ;;
  --kwok-stages) echo "$KWOK_STAGES"; exit 0 ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
esac

want=("$@")
[ ${#want[@]} -gt 0 ] || want=("${ALL_TOOLS[@]}")
for t in "${want[@]}"; do
  case " ${ALL_TOOLS[*]} " in *" $t "*) ;; *) echo "install-go-tools: unknown tool '$t' (known: ${ALL_TOOLS[*]})" >&2; exit 2 ;; esac
done

stamp_of() {
  if [ "$1" = oci-conformance ]; then echo "$(version_of "$1") $RECIPE $OCI_CONFORMANCE_PATCHES"
  else echo "$(version_of "$1") $RECIPE"; fi
}
fresh() {
  [ -x "$BIN/$1" ] && [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$(stamp_of "$1")" ] || return 1
  [ "$1" != kwok ] || [ -s "$KWOK_STAGES" ]
}

# Fast path: everything requested is already built; needs no go at all.
todo=()
for t in "${want[@]}"; do
  if fresh "$t"; then echo "$t $(version_of "$t"): cached"; else todo+=("$t"); fi
done
[ ${#todo[@]} -gt 0 ] || exit 0

GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"
[ -x "$GO" ] || { echo "install-go-tools: no go toolchain (set GO=/path/to/go)" >&2; exit 1; }
mkdir -p "$BIN" "$STAMPS" "$LOGS" "$SRC"

# One run at a time per cache dir (two test runs starting together would
# otherwise both build, and clobber each other's wrapper modules).
exec 9>"$CACHE/.lock"
if ! flock -w "$TIMEOUT" 9; then
  echo "install-go-tools: timed out waiting for $CACHE/.lock" >&2; exit 1
fi

# Private Go state under the cache dir; static binaries, no cgo needed.
export GOPATH="$CACHE/go"
export GOMODCACHE="$CACHE/go/pkg/mod"
export GOCACHE="$CACHE/go/build-cache"
export GOTOOLCHAIN="${GOTOOLCHAIN:-auto}"
export CGO_ENABLED=0
# -modcacherw: lets `rm -rf` remove the cache dir (module files are read-only otherwise).
export GOFLAGS="-buildvcs=false -modcacherw"
unset GOBIN GOWORK GOOS GOARCH 2>/dev/null || true
export GOWORK=off

# run LOG CMD...: bounded, logged; on failure show the log tail and stop.
run() {
  local log="$1"; shift
  echo "+ $*" >>"$log"
  if ! timeout --kill-after=30 "$TIMEOUT" "$@" >>"$log" 2>&1; then
    echo "install-go-tools: failed: $* (log: $log)" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
}

install_bin() { # install_bin TOOL BUILT_FILE STARTED_AT
  mv -f "$2" "$BIN/$1"
  stamp_of "$1" >"$STAMPS/$1"
  echo "$1 $(version_of "$1"): built in $(( $(date +%s) - $3 ))s"
}

# ---- k8s.io/kubernetes binaries via a wrapper module ------------------------
# k8s.io/kubernetes requires its staging modules at v0.0.0 with replaces to
# ./staging/src/..., so `go install` refuses it. A wrapper module requires it
# and replaces every staging module with its published v0.Y.Z release.
k8s_tools_go() {
  echo '//go:build tools'
  echo
  echo '// Package tools pins the k8s.io/kubernetes commands built from this module.'
  echo 'package tools'
  echo
  echo 'import ('
  for t in "${K8S_TOOLS[@]}"; do echo "	_ \"k8s.io/kubernetes/cmd/$t\""; done
  echo ')'
}

k8s_wrapper() {
  local dir="$SRC/k8s-$K8S_VERSION" log="$LOGS/k8s-wrapper.log" gomod staging m
  if [ -f "$dir/.ready" ]; then
    # A wrapper made before a tool joined K8S_TOOLS (kubelet did) gets the
    # new tools.go and a tidy in place; the module downloads stay cached.
    if ! k8s_tools_go | cmp -s - "$dir/tools.go"; then
      k8s_tools_go >"$dir/tools.go"
      ( cd "$dir" && GOFLAGS="$GOFLAGS -mod=mod" run "$log" "$GO" mod tidy ) || exit 1
    fi
    echo "$dir"; return
  fi
  : >"$log"
  rm -rf "$dir"; mkdir -p "$dir"
  gomod=$(cd "$dir" && "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" 2>>"$log" |
    sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p') || true
  [ -n "$gomod" ] && [ -f "$gomod" ] || { echo "install-go-tools: cannot download k8s.io/kubernetes@$K8S_VERSION (log: $log)" >&2; cat "$log" >&2; exit 1; }
  staging=$(sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\)[[:space:]]*=>[[:space:]]*\./staging/src/.*#\1#p' "$gomod")
  [ -n "$staging" ] || { echo "install-go-tools: no staging replaces found in $gomod" >&2; exit 1; }
  (
    cd "$dir"
    run "$log" "$GO" mod init regmirror.test/k8s-tools
    args=(-require="k8s.io/kubernetes@$K8S_VERSION")
    for m in $staging; do args+=(-replace="$m=$m@$K8S_STAGING_VERSION"); done
    run "$log" "$GO" mod edit "${args[@]}"
    k8s_tools_go >tools.go
    GOFLAGS="$GOFLAGS -mod=mod" run "$log" "$GO" mod tidy
  )
  touch "$dir/.ready"
  echo "$dir"
}

k8s_ldflags() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local f="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    f+=" -X $p.gitTreeState=clean -X $p.gitCommit=module-$K8S_VERSION"
    f+=" -X $p.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  done
  echo "$f"
}

build_k8s() {
  local t="$1" started dir
  started=$(date +%s)
  dir=$(k8s_wrapper)
  : >"$LOGS/$t.log"
  ( cd "$dir" && GOFLAGS="$GOFLAGS -mod=mod" run "$LOGS/$t.log" "$GO" build -p "$P" -trimpath \
      -ldflags "$(k8s_ldflags)" -o "$BIN/.$t.tmp" "k8s.io/kubernetes/cmd/$t" )
  install_bin "$t" "$BIN/.$t.tmp" "$started"
}

# ---- etcd via a wrapper module ----------------------------------------------
# go.etcd.io/etcd/server/v3 has relative replaces too, but a dependency's
# replaces are ignored and its requires are real versions.
build_etcd() {
  local started dir="$SRC/etcd-$ETCD_VERSION" log="$LOGS/etcd.log"
  started=$(date +%s)
  : >"$log"
  if [ ! -f "$dir/.ready" ]; then
    rm -rf "$dir"; mkdir -p "$dir"
    ( cd "$dir"
      run "$log" "$GO" mod init regmirror.test/etcd-tools
      GOFLAGS="$GOFLAGS -mod=mod" run "$log" "$GO" get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" )
    touch "$dir/.ready"
  fi
  ( cd "$dir" && GOFLAGS="$GOFLAGS -mod=mod" run "$log" "$GO" build -p "$P" -trimpath \
      -ldflags "-s -w" -o "$BIN/.etcd.tmp" go.etcd.io/etcd/server/v3 )
  install_bin etcd "$BIN/.etcd.tmp" "$started"
}

# ---- OCI distribution-spec conformance suite, patched -----------------------
# The module (a plain `package main`) is copied out of the module cache, fixed
# and built with `go build` (binary: oci-conformance). Fix p1: with push
# disabled (read-only registries, OCI_API_PUSH=false) the blob tests record a
# data status without test data, and writing results.yaml dereferences the
# missing entry (nil pointer panic, exit 2, before junit.xml is written).
OCI_CONFORMANCE_MODULE=github.com/opencontainers/distribution-spec/conformance
build_oci_conformance() {
  local started dir="$SRC/oci-conformance-$OCI_CONFORMANCE_VERSION-$OCI_CONFORMANCE_PATCHES"
  local log="$LOGS/oci-conformance.log" mod old new
  started=$(date +%s)
  : >"$log"
  if [ ! -f "$dir/.ready" ]; then
    mod=$(cd "$CACHE" && "$GO" mod download -json "$OCI_CONFORMANCE_MODULE@$OCI_CONFORMANCE_VERSION" 2>>"$log" |
      sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p') || true
    [ -n "$mod" ] && [ -f "$mod/run.go" ] || { echo "install-go-tools: cannot download $OCI_CONFORMANCE_MODULE@$OCI_CONFORMANCE_VERSION (log: $log)" >&2; cat "$log" >&2; exit 1; }
    rm -rf "$dir"; mkdir -p "$dir"; cp -r "$mod/." "$dir/"; chmod -R u+w "$dir"
    old='results.Data[r.State.Data[k].name] = v'
    new='if td := r.State.Data[k]; td != nil { results.Data[td.name] = v } else { results.Data[k] = v }'
    [ "$(grep -cF "$old" "$dir/run.go")" = 1 ] || { echo "install-go-tools: oci-conformance patch p1 does not apply to $OCI_CONFORMANCE_VERSION" >&2; exit 1; }
    OLD="$old" NEW="$new" perl -pi -e 's/\Q$ENV{OLD}\E/$ENV{NEW}/' "$dir/run.go"
    touch "$dir/.ready"
  fi
  ( cd "$dir" && run "$log" "$GO" build -p "$P" -trimpath \
      -ldflags "-s -w -X main.Version=$OCI_CONFORMANCE_VERSION+$OCI_CONFORMANCE_PATCHES" -o "$BIN/.oci-conformance.tmp" . )
  install_bin oci-conformance "$BIN/.oci-conformance.tmp" "$started"
}

# ---- plain go install --------------------------------------------------------
build_go_install() {
  local t="$1" started pkg ver tmpbin="$CACHE/.gobin-tmp" ld="-s -w"
  started=$(date +%s)
  pkg=${GO_INSTALL[$t]% *}; ver=${GO_INSTALL[$t]#* }
  [ -z "${GO_INSTALL_X[$t]:-}" ] || ld+=" -X ${GO_INSTALL_X[$t]}"
  rm -rf "$tmpbin"; mkdir -p "$tmpbin"
  : >"$LOGS/$t.log"
  ( cd "$CACHE" && GOBIN="$tmpbin" run "$LOGS/$t.log" "$GO" install -p "$P" -trimpath \
      -ldflags "$ld" "$pkg@$ver" )
  [ "$t" != kwok ] || kwok_stages "$LOGS/$t.log"
  install_bin "$t" "$tmpbin/$t" "$started"
  rm -rf "$tmpbin"
}

# The default stages kwokctl uses (node-fast + plain heartbeat, pod-fast),
# taken from the kwok module's own kustomize/stage/ tree.
kwok_stages() {
  local dir f tmp="$KWOK_STAGES.tmp"
  dir=$(cd "$CACHE" && "$GO" mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" 2>>"$1" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p') || true
  [ -n "$dir" ] && [ -d "$dir/kustomize/stage" ] || { echo "install-go-tools: kwok module dir not found (log: $1)" >&2; exit 1; }
  mkdir -p "$(dirname "$KWOK_STAGES")"
  : >"$tmp"
  for f in node/fast/node-initialize.yaml node/heartbeat/node-heartbeat.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    { echo "---"; echo "# from sigs.k8s.io/kwok@$KWOK_VERSION kustomize/stage/$f"; cat "$dir/kustomize/stage/$f"; } >>"$tmp"
  done
  mv -f "$tmp" "$KWOK_STAGES"
}

for t in "${todo[@]}"; do
  if fresh "$t"; then echo "$t $(version_of "$t"): cached"; continue; fi  # built by a concurrent run
  case "$t" in
    kube-*|kubectl|kubelet) build_k8s "$t" ;;
    etcd) build_etcd ;;
    oci-conformance) build_oci_conformance ;;
    *) build_go_install "$t" ;;
  esac
done
echo "install-go-tools: binaries in $BIN"
