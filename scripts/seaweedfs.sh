#!/usr/bin/env bash
# A real S3 server for the claim-check store's S3 tests: SeaweedFS (Apache-2.0), built from the
# Go module proxy at a pinned version (the module zip checked against sum.golang.org, its
# dependencies against its own go.sum), run as `weed mini` (master, volume server, filer and S3
# gateway in one process) on loopback ports.
#
# Usage:
#   scripts/seaweedfs.sh install
#       Build once into $FRACTURE_CACHE/bin/weed (about 5 minutes on 2 cores from an empty
#       module cache; later runs are instant and offline). Prints the binary's path.
#   scripts/seaweedfs.sh start DIR [--watch-pid PID]
#       Start a server whose files all live in DIR, with one bucket (`fracture`) and one identity
#       (access key `fracture-test`, secret `fracture-test-secret`, in DIR/s3.json). Waits until
#       the S3 gateway answers and prints its endpoint (http://127.0.0.1:PORT) as the last line.
#       Restarting in the same DIR reuses its ports and data.
#       --watch-pid PID: a detached watchdog stops the server once process PID has exited.
#   scripts/seaweedfs.sh stop DIR      SIGTERM, SIGKILL after 15 s. Succeeds when nothing runs.
#
# MinIO would be the usual choice, but its server is AGPL-licensed; SeaweedFS is Apache-2.0 and
# builds with CGO off. Its go.mod has a replace directive, so it cannot be `go install`ed as a
# dependency: the verified module source is built as the main module instead.
#   FRACTURE_CACHE              cache folder (default $HOME/.cache/fracture)
#   FRACTURE_SEAWEEDFS_VERSION  github.com/seaweedfs/seaweedfs module version (default below)
set -euo pipefail

CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
VERSION="${FRACTURE_SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
MODULE=github.com/seaweedfs/seaweedfs
BIN="$CACHE/bin/weed"
STAMP="$CACHE/bin/weed.version"
BUCKET=fracture
ACCESS_KEY=fracture-test
SECRET_KEY=fracture-test-secret

die() { echo "scripts/seaweedfs.sh: $*" >&2; exit 1; }
usage() { sed -n '2,20p' "$0" >&2; exit 2; }

# The stamp names the module version and the binary's sha256, so a binary from another version,
# or one changed since, is rebuilt.
is_pinned() {
  [[ -x "$BIN" && -s "$STAMP" ]] || return 1
  [[ "$(cat "$STAMP")" == "$VERSION $(sha256sum "$BIN" | cut -d' ' -f1)" ]]
}

install() {
  mkdir -p "$CACHE/bin"
  exec 9>"$CACHE/seaweedfs.lock"
  flock 9
  if ! is_pinned; then
    command -v go >/dev/null 2>&1 || die "building SeaweedFS needs Go >= 1.26.6 on PATH (https://go.dev/dl/)"
    echo "building $MODULE@$VERSION (weed) into $BIN" >&2
    export GOPATH="$CACHE/go" GOMODCACHE="$CACHE/go/pkg/mod"
    export GOTOOLCHAIN=local GOFLAGS="-mod=mod -buildvcs=false" CGO_ENABLED=0
    export GOPROXY="${GOPROXY:-https://proxy.golang.org,direct}"
    export GOSUMDB="${GOSUMDB:-sum.golang.org}"
    local work src
    work="$(mktemp -d "${TMPDIR:-/tmp}/fracture-seaweedfs.XXXXXX")"
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    export GOCACHE="$work/gocache"
    src="$(go mod download -json "$MODULE@$VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",\{0,1\}$/\1/p')"
    [[ -d "$src" ]] || die "go mod download $MODULE@$VERSION gave no source folder"
    cp -r "$src" "$work/src"
    chmod -R u+w "$work/src"
    (cd "$work/src" && go build -trimpath -ldflags "-s -w" -o "$BIN.new" ./weed) >&2
    mv -f "$BIN.new" "$BIN"
    echo "$VERSION $(sha256sum "$BIN" | cut -d' ' -f1)" >"$STAMP"
  fi
  # Let go of the lock: a server started after this must not hold it (another `start` or
  # `install` would wait for that server to exit).
  exec 9>&-
  echo "$BIN"
}

server_pid() {
  local pid
  pid="$(cat "$1/weed.pid" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
  return 0
}

free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

port_free() {
  python3 - "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
# As the server binds (Go sets SO_REUSEADDR): its own connections in TIME_WAIT do not count.
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

start() {
  local dir="" watch=""
  while (($#)); do
    case "$1" in
      --watch-pid) (($# >= 2)) || usage; watch="$2"; shift 2 ;;
      -*) die "unknown option $1" ;;
      *) [[ -z "$dir" ]] || usage; dir="$1"; shift ;;
    esac
  done
  [[ -n "$dir" ]] || usage
  [[ -z "$watch" || "$watch" =~ ^[0-9]+$ ]] || die "--watch-pid needs a process id, got '$watch'"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  install >/dev/null

  local ports=()
  if [[ -z "$(server_pid "$dir")" ]]; then
    if [[ -s "$dir/ports" ]]; then
      read -r -a ports <"$dir/ports"
      for p in "${ports[@]}"; do port_free "$p" || { ports=(); break; }; done
    fi
    if ((${#ports[@]} != 10)); then
      # master, volume, filer, s3 and admin, each with a gRPC port beside it.
      read -r -a ports < <(free_ports 10)
      ((${#ports[@]} == 10)) || die "could not pick free ports"
      echo "${ports[*]}" >"$dir/ports"
    fi
    cat >"$dir/s3.json" <<EOF
{"identities":[{"name":"fracture","credentials":[{"accessKey":"$ACCESS_KEY","secretKey":"$SECRET_KEY"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
    mkdir -p "$dir/data"
    (
      cd "$dir"
      exec setsid "$BIN" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
        -master.port="${ports[0]}" -master.port.grpc="${ports[1]}" \
        -volume.port="${ports[2]}" -volume.port.grpc="${ports[3]}" \
        -filer.port="${ports[4]}" -filer.port.grpc="${ports[5]}" \
        -s3.port="${ports[6]}" -s3.port.grpc="${ports[7]}" \
        -admin.port="${ports[8]}" -admin.port.grpc="${ports[9]}" -admin.port.legacy=0 \
        -admin.ui=false -webdav=false -s3.port.iceberg=0 -s3.port.lance=0 \
        -s3.config="$dir/s3.json" -bucket="$BUCKET" </dev/null >>"$dir/weed.log" 2>&1
    ) &
    echo $! >"$dir/weed.pid"
  fi
  read -r -a ports <"$dir/ports"
  local endpoint="http://127.0.0.1:${ports[6]}"
  # Ready when the bucket answers: an unauthenticated HEAD is refused (403), not unreachable.
  local i code
  for ((i = 0; i < 120; i++)); do
    [[ -n "$(server_pid "$dir")" ]] || die "SeaweedFS exited; see $dir/weed.log"
    code="$(curl -s -o /dev/null -w '%{http_code}' -I "$endpoint/$BUCKET" || true)"
    [[ "$code" == 403 || "$code" == 200 ]] && break
    sleep 0.5
  done
  ((i < 120)) || die "the S3 gateway at $endpoint did not answer in 60 s; see $dir/weed.log"
  if [[ -n "$watch" ]]; then
    (
      while kill -0 "$watch" 2>/dev/null; do sleep 2; done
      "$0" stop "$dir" >/dev/null 2>&1
    ) </dev/null >/dev/null 2>&1 &
    disown
  fi
  echo "$endpoint"
}

stop() {
  [[ $# -eq 1 ]] || usage
  local dir="$1" pid i
  pid="$(server_pid "$dir")"
  [[ -n "$pid" ]] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.5
  done
  kill -KILL "$pid" 2>/dev/null || true
}

case "${1:-}" in
  install) install ;;
  start) shift; start "$@" ;;
  stop) shift; stop "$@" ;;
  *) usage ;;
esac
