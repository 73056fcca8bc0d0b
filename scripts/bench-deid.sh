#!/usr/bin/env bash
# Benchmark (not a test): folder-to-folder de-identification, ours against the peers, in one run.
#
# Usage:
#   scripts/bench-deid.sh
#       Builds (once, kept) a corpus of 2 x BENCH_COPIES files: copies of RG3_UNCR.dcm (6.2 MB)
#       and cat.dcm (16 MB) from scripts/fixtures.sh, each with new SOP/Series/Study Instance
#       UIDs (about 2.2 GB at the default 100 copies). Then, with the page cache warmed over the
#       corpus, runs each tool BENCH_RUNS times folder to folder (the output folder removed and
#       `sync` run before each run, so no tool pays for another's writeback) and prints a
#       Markdown table: best wall time, files/s, MB/s (input bytes / best time), peak RSS
#       (/usr/bin/time -v), exit status and output file count, then the ratios ours/gdcmanon and
#       ours/cp against the targets (>= 2x gdcmanon's files/s, >= 60% of cp's MB/s, peak RSS
#       under 4x the largest input file).
#
#   tools   cp         cp -r IN OUT                      the I/O floor
#           fracture   fracture deid IN --out OUT --key-file KEY   (run from an empty folder,
#                      so no ./fracture.toml is picked up: the default ingest profile). It ends
#                      with one syncfs(2) of the output's file system, so its time includes
#                      writing everything to disk
#           fracture-nosync   the same under eatmydata (Debian eatmydata: the sync becomes a
#                      no-op): what the peers, which never sync, are compared with; run only
#                      when eatmydata is installed
#           gdcmanon   gdcmanon -e -c cert.pem -i IN -o OUT   (PS3.15 Basic Profile, directory
#                      mode, a throwaway self-signed certificate made with openssl)
#           dicognito  python -m dicognito -q -o OUT IN  (PyPI dicognito, pinned below)
#           TOOL+sync  any tool above followed by `sync` inside the timing (cp+sync,
#                      gdcmanon+sync: the floor and the peer when the data must reach disk)
#
#           Runs are interleaved (run 1 of every tool, then run 2, ...), each round starting one
#           tool later, so a slow spell of the disk does not fall on one tool; the check table
#           pairs like with like: fracture with cp+sync and gdcmanon+sync, fracture-nosync with
#           cp and gdcmanon.
#
# Environment:
#   FRACTURE_BIN    our binary (default: $CARGO_TARGET_DIR or $FRACTURE_CACHE/target, release if
#                   built, else debug)
#   BENCH_COPIES    copies of each fixture (default 100)
#   BENCH_RUNS      runs per tool, best kept (default 2)
#   BENCH_TOOLS     space-separated subset of the tools above (default: all)
#   BENCH_DIR       work folder (default $FRACTURE_CACHE/bench-deid); the corpus is kept there
#
# Needs: the peers from scripts/deid-peers.sh (installs gdcmanon), python3 with venv, openssl,
# GNU time (apt-get install time). Nothing here is part of the test suite.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
VENV="$CACHE/bench-venv"
PINS=("pydicom==3.0.2" "dicognito==0.19.0")
COPIES="${BENCH_COPIES:-100}"
RUNS="${BENCH_RUNS:-2}"
DEFAULT_TOOLS="cp cp+sync fracture gdcmanon gdcmanon+sync dicognito"
command -v eatmydata >/dev/null 2>&1 && DEFAULT_TOOLS="cp cp+sync fracture fracture-nosync gdcmanon gdcmanon+sync dicognito"
TOOLS="${BENCH_TOOLS:-$DEFAULT_TOOLS}"
WORK="${BENCH_DIR:-$CACHE/bench-deid}"

log() { echo "bench-deid.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 0
fi
(($# == 0)) || die "usage: scripts/bench-deid.sh (no arguments; see --help for the environment)"

# --- tools -------------------------------------------------------------------------------------
if [[ ! -x /usr/bin/time ]]; then
  log "installing GNU time ..."
  apt-get install -y -q time >&2 || { apt-get update -q >&2 && apt-get install -y -q time >&2; } ||
    die "apt-get install time failed"
fi
bash "$ROOT/scripts/deid-peers.sh" >/dev/null
command -v gdcmanon >/dev/null || die "gdcmanon missing after scripts/deid-peers.sh"

venv_ok() {
  [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - "${PINS[@]}" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
EOF
}
if ! venv_ok; then
  log "creating $VENV with ${PINS[*]} ..."
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2 || die "python3 -m venv failed"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${PINS[@]}" >&2 ||
    die "pip install ${PINS[*]} failed"
  venv_ok || die "the venv at $VENV does not have ${PINS[*]}"
fi
PY="$VENV/bin/python"

if [[ -z "${FRACTURE_BIN:-}" ]]; then
  target="${CARGO_TARGET_DIR:-$CACHE/target}"
  if [[ -x "$target/release/fracture" ]]; then FRACTURE_BIN="$target/release/fracture"
  elif [[ -x "$target/debug/fracture" ]]; then FRACTURE_BIN="$target/debug/fracture"
  else die "no fracture binary under $target (cargo build --release --bin fracture), or set FRACTURE_BIN"
  fi
fi
[[ -x "$FRACTURE_BIN" ]] || die "FRACTURE_BIN=$FRACTURE_BIN is not executable"

# --- corpus ------------------------------------------------------------------------------------
FIXTURES="$(bash "$ROOT/scripts/fixtures.sh" | tail -n 1)"
CORPUS="$WORK/corpus"
STAMP="$WORK/corpus.stamp"
want_stamp="copies=$COPIES ${PINS[0]} $(cd "$ROOT/scripts/bench" && sha256sum make_corpus.py | cut -d' ' -f1)"
mkdir -p "$WORK"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want_stamp" ]]; then
  log "building the corpus in $CORPUS ($((2 * COPIES)) files) ..."
  rm -rf "$CORPUS" "$STAMP"
  "$PY" "$ROOT/scripts/bench/make_corpus.py" "$FIXTURES" "$CORPUS" "$COPIES" >&2
  echo "$want_stamp" >"$STAMP"
fi
IN_FILES=$(find "$CORPUS" -type f | wc -l)
IN_BYTES=$(find "$CORPUS" -type f -printf '%s\n' | awk '{s+=$1} END {printf "%.0f\n", s}')
MAX_FILE=$(find "$CORPUS" -type f -printf '%s\n' | sort -n | tail -n 1)

# Throwaway material: our key, gdcmanon's certificate, an empty folder to run ours from.
SECRETS="$WORK/secrets"
mkdir -p "$SECRETS" "$WORK/cwd"
[[ -s "$SECRETS/key" ]] || head -c 32 /dev/urandom >"$SECRETS/key"
if [[ ! -s "$SECRETS/cert.pem" ]]; then
  openssl req -x509 -newkey rsa:2048 -nodes -keyout "$SECRETS/key.pem" -out "$SECRETS/cert.pem" \
    -days 3650 -subj "/CN=fracture-bench" 2>/dev/null || die "openssl could not make a certificate"
fi

# --- runs --------------------------------------------------------------------------------------
tool_cmd() { # tool OUT -> the command line, one word per line
  case "${1%+sync}" in
    cp) printf '%s\n' cp -r "$CORPUS" "$2" ;;
    fracture-nosync)
      command -v eatmydata >/dev/null || die "fracture-nosync needs eatmydata (apt-get install eatmydata)"
      printf '%s\n' eatmydata "$FRACTURE_BIN" deid "$CORPUS" --out "$2" --key-file "$SECRETS/key" ;;
    fracture) printf '%s\n' "$FRACTURE_BIN" deid "$CORPUS" --out "$2" --key-file "$SECRETS/key" ;;
    gdcmanon) printf '%s\n' gdcmanon -e -c "$SECRETS/cert.pem" -i "$CORPUS" -o "$2" ;;
    dicognito) printf '%s\n' "$PY" -m dicognito -q -o "$2" "$CORPUS" ;;
    *) die "unknown tool $1" ;;
  esac
}

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"
log "warming the page cache over the corpus ($IN_BYTES bytes) ..."
cat "$CORPUS"/* >/dev/null

declare -A best best_rss best_rc best_files cmdline
read -r -a tool_list <<<"$TOOLS"
for ((run = 1; run <= RUNS; run++)); do
  # Each round starts one tool later, so no tool always follows the same one (the disk is still
  # busy with what the previous run wrote and deleted).
  n=${#tool_list[@]}
  for ((k = 0; k < n; k++)); do
    tool="${tool_list[$(((k + run - 1) % n))]}"
    out="$WORK/out-$tool"
    mapfile -t cmd < <(tool_cmd "$tool" "$out")
    cmdline[$tool]="${cmd[*]}"
    rm -rf "$out"
    sync
    tfile="$WORK/time-$tool-$run.txt"
    start=$(date +%s.%N)
    set +e
    if [[ "$tool" == *+sync ]]; then
      (cd "$WORK/cwd" && /usr/bin/time -v -o "$tfile" "${cmd[@]}" >"$WORK/log-$tool-$run.txt" 2>&1 && sync)
    else
      (cd "$WORK/cwd" && /usr/bin/time -v -o "$tfile" "${cmd[@]}" >"$WORK/log-$tool-$run.txt" 2>&1)
    fi
    rc=$?
    set -e
    end=$(date +%s.%N)
    wall=$(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.3f", b - a}')
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$tfile")
    files=$(find "$out" -type f -name '*.dcm' 2>/dev/null | wc -l)
    log "$tool run $run: ${wall}s rc=$rc peak RSS ${rss} KiB, $files .dcm files out"
    if [[ -z "${best[$tool]:-}" ]] || awk -v w="$wall" -v b="${best[$tool]}" 'BEGIN {exit !(w < b)}'; then
      best[$tool]=$wall best_rc[$tool]=$rc best_files[$tool]=$files
    fi
    [[ -z "${best_rss[$tool]:-}" || "$rss" -gt "${best_rss[$tool]}" ]] && best_rss[$tool]=$rss
    # The outputs are 2 GB each: only one is kept at a time.
    rm -rf "$out"
  done
done
for tool in $TOOLS; do
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "${best[$tool]}" "${best_rss[$tool]}" "${best_rc[$tool]}" \
    "${best_files[$tool]}" "${cmdline[$tool]}" >>"$RESULTS"
done
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# --- report ------------------------------------------------------------------------------------
echo "## De-identification benchmark, folder to folder"
echo
echo "- corpus: $IN_FILES files, $IN_BYTES bytes ($COPIES x RG3_UNCR.dcm, $COPIES x cat.dcm, new UIDs each), largest $MAX_FILE bytes"
echo "- host: $(nproc) cores, $(uname -sr); load average before $LOAD_BEFORE, after $LOAD_AFTER"
echo "- ours: $FRACTURE_BIN ($(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo "- $(gdcmanon --version 2>&1 | head -n 1 | sed 's/ \$Date\$//'); dicognito $("$PY" -c 'from importlib.metadata import version; print(version("dicognito"))'), pydicom $("$PY" -c 'import pydicom; print(pydicom.__version__)'), $("$PY" --version)"
echo "- best of $RUNS interleaved runs each (order rotated every round), page cache warm, output folder removed and \`sync\` before each run"
echo
"$PY" "$ROOT/scripts/bench/report.py" "$RESULTS" "$IN_FILES" "$IN_BYTES" "$MAX_FILE"
