#!/usr/bin/env bash
# A real PACS for tests: Orthanc with its DICOMweb plugin (QIDO-RS, WADO-RS, STOW-RS) on
# loopback, from Debian's packages (bookworm: orthanc 1.10.1, orthanc-dicomweb 1.7, orthanc-gdcm).
#
# Usage:
#   scripts/orthanc.sh install
#       Installs the Debian packages when Orthanc or its DICOMweb plugin is missing (apt-get update
#       runs only when apt cannot find them). Idempotent; prints the Orthanc binary path.
#   scripts/orthanc.sh start DIR [--watch-pid PID [--remove-on-exit]]
#       Installs if needed, writes DIR/orthanc.json (free HTTP and DICOM ports, storage in DIR/db,
#       loopback only, no authentication) and starts Orthanc with its files in DIR (orthanc.log,
#       orthanc.pid, http-port, dicom-port). Waits until the REST API answers and prints the
#       DICOMweb base URL (http://127.0.0.1:PORT/dicom-web) as the last line of stdout; the REST
#       API is that URL without /dicom-web, the DICOM AE title is ORTHANC on DIR/dicom-port; it
#       takes C-STOREs from any calling AE title (DicomAlwaysAllowStore), as the export tests need.
#       Diagnostics go to stderr. Restarting in the same DIR keeps the data and the ports when
#       they are still free. If the Orthanc of DIR is already running, prints its URL.
#       --watch-pid PID: a detached watchdog stops Orthanc once process PID has exited, so a test
#       binary that starts one cannot leak it; with --remove-on-exit it then deletes DIR too.
#   scripts/orthanc.sh stop DIR
#       SIGTERM, SIGKILL after 15 s. Succeeds when nothing runs.
#   scripts/orthanc.sh status DIR
#       Prints the DICOMweb base URL and exits 0 when the Orthanc of DIR answers, else exits 1.
#
# Environment:
#   FRACTURE_ORTHANC_TIMEOUT  seconds to wait for readiness (default 60)
#
# Needs root (or sudo) for the Debian packages, curl and python3.
set -euo pipefail

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
READY_TIMEOUT="${FRACTURE_ORTHANC_TIMEOUT:-60}"
STOP_GRACE=15
PLUGINS=/usr/share/orthanc/plugins
PACKAGES=(orthanc orthanc-dicomweb orthanc-gdcm)

log() { echo "orthanc.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "$SELF" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

orthanc_bin() {
  if command -v Orthanc >/dev/null 2>&1; then command -v Orthanc
  elif [[ -x /usr/sbin/Orthanc ]]; then echo /usr/sbin/Orthanc
  fi
}

install() {
  if [[ -n "$(orthanc_bin)" && -f "$PLUGINS/libOrthancDicomWeb.so" && -f "$PLUGINS/libOrthancGdcm.so" ]]; then
    orthanc_bin
    return
  fi
  command -v apt-get >/dev/null 2>&1 ||
    die "Orthanc is missing and there is no apt-get here: install ${PACKAGES[*]} by hand"
  local sudo=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 || die "installing ${PACKAGES[*]} needs root; run as root or install sudo"
    sudo=(sudo -n)
  fi
  # Serialised: two test binaries may call this at once, and apt takes a global lock.
  local cache="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
  mkdir -p "$cache"
  exec 9>"$cache/orthanc-install.lock"
  flock 9 2>/dev/null || true
  if [[ -z "$(orthanc_bin)" || ! -f "$PLUGINS/libOrthancDicomWeb.so" || ! -f "$PLUGINS/libOrthancGdcm.so" ]]; then
    log "installing ${PACKAGES[*]} ..."
    export DEBIAN_FRONTEND=noninteractive
    # The package's maintainer scripts try to start a system service; there is no init here,
    # and the policy-rc.d refusal is harmless.
    if ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2; then
      log "apt-get install failed; refreshing the package lists and retrying"
      "${sudo[@]}" apt-get update -q >&2 || die "apt-get update failed (no network?)"
      "${sudo[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >&2 ||
        die "apt-get install ${PACKAGES[*]} failed"
    fi
  fi
  exec 9>&-
  [[ -n "$(orthanc_bin)" && -f "$PLUGINS/libOrthancDicomWeb.so" ]] ||
    die "the packages installed but Orthanc or $PLUGINS/libOrthancDicomWeb.so is missing"
  orthanc_bin
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

port_free() {
  python3 -c 'import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1",int(sys.argv[1])))' "$1" 2>/dev/null
}

running_pid() {
  local dir="$1" pid state
  [[ -f "$dir/orthanc.pid" ]] || return 1
  pid="$(cat "$dir/orthanc.pid")"
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  # An exited Orthanc whose parent has not reaped it yet is a zombie: not running.
  state="$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || true)"
  [[ "$state" != Z ]] || return 1
  echo "$pid"
}

answers() {
  curl -fsS --max-time 2 "http://127.0.0.1:$1/system" >/dev/null 2>&1
}

base_url() { echo "http://127.0.0.1:$1/dicom-web"; }

start() {
  local dir="$1" watch="${2:-}" remove="${3:-}" bin pid http dicom
  bin="$(install)"
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if pid="$(running_pid "$dir")" && answers "$(cat "$dir/http-port")"; then
    base_url "$(cat "$dir/http-port")"
    return
  fi
  http="$(cat "$dir/http-port" 2>/dev/null || true)"
  dicom="$(cat "$dir/dicom-port" 2>/dev/null || true)"
  [[ -n "$http" ]] && port_free "$http" || http="$(free_port)"
  [[ -n "$dicom" ]] && port_free "$dicom" && [[ "$dicom" != "$http" ]] || dicom="$(free_port)"
  while [[ "$dicom" == "$http" ]]; do dicom="$(free_port)"; done
  echo "$http" >"$dir/http-port"
  echo "$dicom" >"$dir/dicom-port"
  mkdir -p "$dir/db"
  cat >"$dir/orthanc.json" <<EOF
{
  "Name": "FRACTURE-TEST",
  "StorageDirectory": "$dir/db",
  "IndexDirectory": "$dir/db",
  "Plugins": ["$PLUGINS/libOrthancDicomWeb.so", "$PLUGINS/libOrthancGdcm.so"],
  "HttpServerEnabled": true,
  "HttpPort": $http,
  "RemoteAccessAllowed": false,
  "AuthenticationEnabled": false,
  "SslEnabled": false,
  "DicomServerEnabled": true,
  "DicomAet": "ORTHANC",
  "DicomPort": $dicom,
  "DicomCheckCalledAet": false,
  "DicomAlwaysAllowStore": true,
  "OverwriteInstances": false,
  "SaveJobs": false,
  "StableAge": 5,
  "HttpTimeout": 60,
  "ExecuteLuaEnabled": false,
  "RestApiWriteToFileSystemEnabled": false,
  "DeidentifyLogs": true,
  "DicomWeb": {
    "Enable": true,
    "Root": "/dicom-web/",
    "EnableWado": false,
    "Host": "127.0.0.1:$http",
    "Ssl": false,
    "Servers": {}
  }
}
EOF
  log "starting Orthanc ($("$bin" --version 2>/dev/null | head -n 1)) on 127.0.0.1:$http (DICOM $dicom) in $dir"
  setsid "$bin" --logfile="$dir/orthanc.log" "$dir/orthanc.json" </dev/null >/dev/null 2>&1 &
  pid=$!
  echo "$pid" >"$dir/orthanc.pid"
  local waited=0
  until answers "$http"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$dir/orthanc.log" >&2 || true
      die "Orthanc exited during startup (log: $dir/orthanc.log)"
    fi
    if ((waited >= READY_TIMEOUT * 4)); then
      tail -n 30 "$dir/orthanc.log" >&2 || true
      kill "$pid" 2>/dev/null || true
      die "Orthanc did not answer on 127.0.0.1:$http within ${READY_TIMEOUT}s"
    fi
    sleep 0.25
    waited=$((waited + 1))
  done
  curl -fsS --max-time 5 "$(base_url "$http")/studies?limit=1" >/dev/null ||
    die "Orthanc answers but its DICOMweb plugin does not (log: $dir/orthanc.log)"
  if [[ -n "$watch" ]]; then
    local after=""
    [[ -z "$remove" ]] || after="; rm -rf '$dir'"
    setsid bash -c "while kill -0 $watch 2>/dev/null; do sleep 1; done; bash '$SELF' stop '$dir' >/dev/null 2>&1$after" \
      </dev/null >/dev/null 2>&1 &
  fi
  base_url "$http"
}

stop() {
  local dir="$1" pid i
  pid="$(running_pid "$dir")" || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < STOP_GRACE * 4; i++)); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$dir/orthanc.pid"; return 0; }
    sleep 0.25
  done
  log "Orthanc did not stop in ${STOP_GRACE}s, killing it"
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/orthanc.pid"
}

status() {
  local dir="$1"
  running_pid "$dir" >/dev/null && answers "$(cat "$dir/http-port")" || exit 1
  base_url "$(cat "$dir/http-port")"
}

cmd="${1:-}"
case "$cmd" in
  install) install ;;
  start)
    dir="${2:-}"; [[ -n "$dir" ]] || usage
    watch="" remove=""
    if [[ "${3:-}" == "--watch-pid" ]]; then watch="${4:?--watch-pid needs a pid}"; fi
    if [[ -n "$watch" && "${5:-}" == "--remove-on-exit" ]]; then remove=1; fi
    start "$dir" "$watch" "$remove"
    ;;
  stop) [[ -n "${2:-}" ]] || usage; stop "$2" ;;
  status) [[ -n "${2:-}" ]] || usage; status "$2" ;;
  -h | --help) usage ;;
  *) usage ;;
esac
