#!/usr/bin/env bash
# The real Helm, pinned, built from the Go module proxy (go.sum-verified through sum.golang.org),
# for the chart's lint/template test (tests/helm_chart.rs).
#   scripts/helm.sh    last stdout line: the path of the helm binary
# Idempotent: an existing $FRACTURE_CACHE/bin/helm built from the pinned module version is kept.
# Needs Go >= 1.22 on PATH only when it has to build (about 2 minutes on 2 cores from an empty
# module cache). Everything Go writes stays under $FRACTURE_CACHE/go.
#   FRACTURE_CACHE         cache folder (default $HOME/.cache/fracture)
#   FRACTURE_HELM_VERSION  helm.sh/helm/v3 module version (default below)
set -euo pipefail

CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
VERSION="${FRACTURE_HELM_VERSION:-v3.16.4}"
BIN="$CACHE/bin/helm"

# Built like the release binaries: `helm version` says the pinned version; and where Go is at
# hand, the module version Go recorded in the binary must say so too.
is_pinned() {
  [ -x "$BIN" ] || return 1
  [ "$("$BIN" version --template '{{.Version}}' 2>/dev/null)" = "$VERSION" ] || return 1
  if command -v go >/dev/null 2>&1; then
    go version -m "$BIN" 2>/dev/null | grep -Eq "^[[:space:]]+mod[[:space:]]+helm\.sh/helm/v3[[:space:]]+${VERSION//./\\.}[[:space:]]"
  fi
}

mkdir -p "$CACHE/bin"
exec 9>"$CACHE/helm.lock"
flock 9

if ! is_pinned; then
  command -v go >/dev/null 2>&1 || {
    echo "scripts/helm.sh: building Helm $VERSION needs Go >= 1.22 on PATH (https://go.dev/dl/)" >&2
    exit 1
  }
  echo "building helm.sh/helm/v3/cmd/helm@$VERSION into $BIN" >&2
  export GOPATH="$CACHE/go"
  export GOMODCACHE="$CACHE/go/pkg/mod"
  export GOCACHE="$CACHE/go/build"
  export GOBIN="$CACHE/go/bin"
  # Build with the Go on PATH (never fetch a toolchain); module downloads are checked against
  # the checksum database; -mod=mod so a GOFLAGS=-mod=vendor from the caller cannot interfere.
  export GOTOOLCHAIN=local GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
  export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
  export GOSUMDB="${GOSUMDB:-sum.golang.org}"
  # The ldflags of Helm's Makefile: its version, and the Kubernetes version of its client-go as
  # the default for `helm template` capabilities and `helm lint` deprecation checks (without
  # them a module build says "v3.16" and assumes Kubernetes 1.20).
  gomod="$(go mod download -json "helm.sh/helm/v3@$VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')"
  k8s="$(sed -n 's/^[[:space:]]*k8s\.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$gomod")"
  [ -n "$k8s" ] || { echo "scripts/helm.sh: no k8s.io/client-go version in $gomod" >&2; exit 1; }
  ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$VERSION"
  for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
    ldflags="$ldflags -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s"
  done
  go install -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$VERSION" >&2
  install -m 0755 "$GOBIN/helm" "$BIN.new" && mv -f "$BIN.new" "$BIN"
  # The build cache (~750 MB) serves no later run; the module cache stays for offline rebuilds.
  rm -rf "$GOCACHE" "$GOBIN"
  is_pinned || { echo "scripts/helm.sh: $BIN is not Helm $VERSION after the build" >&2; exit 1; }
fi
"$BIN" version >&2
echo "$BIN"
