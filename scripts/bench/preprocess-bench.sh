#!/usr/bin/env bash
# Benchmark (not a test): our pre-processing transform against OpenCV + numpy, in one run.
#
# Usage:
#   scripts/bench/preprocess-bench.sh
#       On RG3_UNCR.dcm and cat.dcm (scripts/fixtures.sh) and a synthetic 3000 x 2500 16-bit
#       radiograph (written once by preprocess_cv.py synth), times crop + resize to 1024 + LCN:
#         decode excluded   both sides read the same [0, 1] float32 image (a .npy our decoder
#                           wrote), so only the transform is timed
#         decode included   ours: read + fracture_shared::pixels decode + transform;
#                           OpenCV: pydicom dcmread + pixel_array + the same normalisation + the
#                           same steps
#       Ours (models/benches/transform.rs) and the peer (scripts/bench/preprocess_cv.py) run
#       alternately, BENCH_REPS times each (the order flipping every repetition), each run timing
#       BENCH_ITERS iterations after 2 warm-up ones; the table shows the median of the runs'
#       medians and the ratio ours / OpenCV (under 1: ours is faster). Then the agreement of the
#       two LCN outputs on cat.dcm: largest absolute difference with the same border rule as ours
#       and with OpenCV's default (reflect-101), and of each against a float64 reference.
#
# Environment:
#   BENCH_THREADS   threads for both sides (default 2): RAYON_NUM_THREADS and cv2.setNumThreads
#   BENCH_REPS      interleaved repetitions (default 5)
#   BENCH_ITERS     timed iterations per run (default 5)
#   BENCH_DIR       work folder (default $FRACTURE_CACHE/bench-preprocess): the .npy inputs, the
#                   synthetic image, results.jsonl
#
# Needs python3 with venv; the peer's packages go into $FRACTURE_CACHE/cv-venv (pinned below).
# Nothing here is part of the test suite.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
VENV="$CACHE/cv-venv"
PINS=("opencv-python-headless==4.13.0.92" "numpy==2.4.6" "pydicom==3.0.2")
THREADS="${BENCH_THREADS:-2}"
REPS="${BENCH_REPS:-5}"
ITERS="${BENCH_ITERS:-5}"
WORK="${BENCH_DIR:-$CACHE/bench-preprocess}"
PEER="$ROOT/scripts/bench/preprocess_cv.py"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"

log() { echo "preprocess-bench.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 0
fi
(($# == 0)) || die "usage: scripts/bench/preprocess-bench.sh (no arguments; see --help)"

# --- the peer's venv ---------------------------------------------------------------------------
venv_ok() {
  [[ -x "$VENV/bin/python" ]] && "$VENV/bin/python" - "${PINS[@]}" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(p.split("==")[0]) != p.split("==")[1] for p in sys.argv[1:]))
EOF
}
mkdir -p "$CACHE"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/cv-venv.lock"
  flock 9
fi
if ! venv_ok; then
  log "creating $VENV with ${PINS[*]} ..."
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2 || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "${PINS[@]}" >&2 ||
    die "pip install ${PINS[*]} failed"
fi
PY="$VENV/bin/python"

# --- our side ----------------------------------------------------------------------------------
log "building the transform bench (release) ..."
BIN="$(cd "$ROOT" && cargo bench -p fracture-models --bench transform --no-run --message-format=json 2>/dev/null |
  "$PY" -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "transform" and m.get("executable"):
        print(m["executable"])')"
[[ -x "$BIN" ]] || die "cargo bench -p fracture-models --bench transform --no-run gave no executable; run it by hand to see why"

# --- inputs ------------------------------------------------------------------------------------
FIX="$(bash "$ROOT/scripts/fixtures.sh" | tail -n 1)"
mkdir -p "$WORK"
cp -f "$FIX/RG3_UNCR.dcm" "$WORK/RG3.dcm"
cp -f "$FIX/cat.dcm" "$WORK/cat.dcm"
[[ -f "$WORK/synthetic.dcm" ]] || "$PY" "$PEER" synth "$WORK/synthetic.dcm" >/dev/null
IMAGES=(RG3 cat synthetic)
for img in "${IMAGES[@]}"; do
  "$BIN" npy "$WORK/$img.dcm" "$WORK/$img.npy" >/dev/null
done

# --- timing, interleaved -----------------------------------------------------------------------
export RAYON_NUM_THREADS="$THREADS"
RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
tag() { "$PY" -c 'import json, sys
r = json.loads(sys.stdin.read()); r.update(image=sys.argv[1], rep=int(sys.argv[2])); print(json.dumps(r))' "$1" "$2"; }
ours() { "$BIN" time "$1" "$ITERS"; }
peer() { "$PY" "$PEER" time "$1" "$ITERS" --threads "$THREADS"; }
for ((rep = 1; rep <= REPS; rep++)); do
  log "repetition $rep of $REPS ..."
  for img in "${IMAGES[@]}"; do
    for input in "$WORK/$img.npy" "$WORK/$img.dcm"; do
      if ((rep % 2)); then
        ours "$input" | tag "$img" "$rep" >>"$RESULTS"
        peer "$input" | tag "$img" "$rep" >>"$RESULTS"
      else
        peer "$input" | tag "$img" "$rep" >>"$RESULTS"
        ours "$input" | tag "$img" "$rep" >>"$RESULTS"
      fi
    done
  done
done

echo "## Pre-processing: fracture (Rust) vs OpenCV + numpy, ms per image"
echo
echo "$(uname -m), $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')"
echo
"$PY" "$PEER" report "$RESULTS"

# --- agreement ---------------------------------------------------------------------------------
echo
echo "## Agreement of the outputs on cat.dcm (largest absolute difference, LCN in [-1, 1])"
echo
"$BIN" lcn "$WORK/cat.npy" "$WORK/cat.raw.npy" "$WORK/cat.lcn.npy" >/dev/null
"$PY" "$PEER" agree "$WORK/cat.npy" "$WORK/cat.raw.npy" "$WORK/cat.lcn.npy"
echo
echo "normalised = zeros outside the canvas, each window divided by its weight inside (what ours"
echo "does); reflect101 = OpenCV's default, which mirrors the canvas at its edge, so the two differ"
echo "within 4 pixels (the window radius) of the canvas edge. Raw results: $RESULTS"
