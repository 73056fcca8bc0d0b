#!/usr/bin/env bash
# The real Jaeger (v2, built on the OpenTelemetry Collector), pinned, built from the Go module
# proxy (go.sum-verified through sum.golang.org), for tests/otlp.rs: the five stages export their
# spans over OTLP/HTTP to it and the test reads the traces back from its query API.
#   scripts/jaeger.sh    last stdout line: the path of the `jaeger` binary
# Idempotent: a binary built from the pinned module version is kept (a stamp records the version
# and its sha256). Building needs Go >= 1.26.7 on PATH (10 minutes or more on 2 cores from an
# empty module cache); everything Go writes stays under $FRACTURE_CACHE/go.
#   FRACTURE_CACHE           cache folder (default $HOME/.cache/fracture)
#   FRACTURE_JAEGER_VERSION  github.com/jaegertracing/jaeger module version (default below;
#                            v1.75.0 is the module of Jaeger v2.x, cmd/jaeger is v2)
set -euo pipefail

CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
VERSION="${FRACTURE_JAEGER_VERSION:-v1.75.0}"
MODULE=github.com/jaegertracing/jaeger
DIR="$CACHE/jaeger"
BIN="$DIR/jaeger"
STAMP="$DIR/version"

stamp() {
  echo "$VERSION $(sha256sum "$BIN" | cut -d' ' -f1)"
}

is_pinned() {
  [[ -x "$BIN" && -s "$STAMP" ]] || return 1
  [[ "$(cat "$STAMP")" == "$(stamp)" ]]
}

mkdir -p "$DIR"
exec 9>"$CACHE/jaeger.lock"
flock 9

if ! is_pinned; then
  command -v go >/dev/null 2>&1 || {
    echo "scripts/jaeger.sh: building Jaeger $VERSION needs Go on PATH (https://go.dev/dl/)" >&2
    exit 1
  }
  echo "building $MODULE/cmd/jaeger@$VERSION into $DIR" >&2
  work="$(mktemp -d "${TMPDIR:-/tmp}/fracture-jaeger.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/pkg/mod" GOCACHE="$work/gocache"
  # The module's go.mod may ask for a newer toolchain than the one on PATH; only the pinned one
  # below may then be fetched (through the same proxy and checksum database), never "auto".
  export GOTOOLCHAIN="${GOTOOLCHAIN:-local}" GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
  export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
  export GOSUMDB="${GOSUMDB:-sum.golang.org}"
  # cmd/jaeger's go.mod has replace directives, which `go install pkg@version` refuses; a
  # scratch module that requires it as a tool resolves the same versions through go.sum.
  mkdir -p "$work/mod"
  (
    cd "$work/mod"
    go mod init fracture.local/jaeger-build >&2
    go get -tool "$MODULE/cmd/jaeger@$VERSION" >&2
    go build -trimpath -ldflags "-s -w" -o "$work/jaeger" "$MODULE/cmd/jaeger" >&2
  )
  install -m 0755 "$work/jaeger" "$BIN"
  stamp >"$STAMP"
fi
echo "$BIN"
