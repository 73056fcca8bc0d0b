#!/usr/bin/env bash
# The real Prometheus and promtool, pinned, built from the Go module proxy (go.sum-verified
# through sum.golang.org), for tests/prometheus.rs: promtool checks and unit-tests the chart's
# alert rules (helm/fracture/rules), and Prometheus scrapes the five stages.
#   scripts/prometheus.sh    last stdout line: the folder holding `prometheus` and `promtool`
# Idempotent: binaries built from the pinned module version are kept (a stamp records the
# version and their sha256). Building needs Go >= 1.26.7 on PATH (about 10 minutes on 2 cores from
# an empty module cache); everything Go writes stays under $FRACTURE_CACHE/go.
#   FRACTURE_CACHE               cache folder (default $HOME/.cache/fracture)
#   FRACTURE_PROMETHEUS_VERSION  github.com/prometheus/prometheus module version (default below;
#                                v0.316.0 is Prometheus 3.16.0)
set -euo pipefail

CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
VERSION="${FRACTURE_PROMETHEUS_VERSION:-v0.316.0}"
MODULE=github.com/prometheus/prometheus
DIR="$CACHE/prometheus"
STAMP="$DIR/version"

stamp() {
  echo "$VERSION $(cat "$DIR/prometheus" "$DIR/promtool" | sha256sum | cut -d' ' -f1)"
}

is_pinned() {
  [[ -x "$DIR/prometheus" && -x "$DIR/promtool" && -s "$STAMP" ]] || return 1
  [[ "$(cat "$STAMP")" == "$(stamp)" ]]
}

mkdir -p "$DIR"
exec 9>"$CACHE/prometheus.lock"
flock 9

if ! is_pinned; then
  command -v go >/dev/null 2>&1 || {
    echo "scripts/prometheus.sh: building Prometheus $VERSION needs Go on PATH (https://go.dev/dl/)" >&2
    exit 1
  }
  echo "building $MODULE@$VERSION (prometheus, promtool) into $DIR" >&2
  work="$(mktemp -d "${TMPDIR:-/tmp}/fracture-prometheus.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/pkg/mod" GOCACHE="$work/gocache"
  export GOBIN="$work/bin" GOTOOLCHAIN=local GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
  export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
  export GOSUMDB="${GOSUMDB:-sum.golang.org}"
  go install -trimpath -ldflags "-s -w" \
    "$MODULE/cmd/prometheus@$VERSION" "$MODULE/cmd/promtool@$VERSION" >&2
  install -m 0755 "$GOBIN/prometheus" "$DIR/prometheus"
  install -m 0755 "$GOBIN/promtool" "$DIR/promtool"
  stamp >"$STAMP"
fi
echo "$DIR"
