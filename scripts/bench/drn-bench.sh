#!/usr/bin/env bash
# The DRN forward-pass benchmark: our CPU path, PyTorch eager and ONNX Runtime, interleaved in one
# run, then the peak memory of one 1024 x 1024 radiograph through a 10-member full-width ensemble.
#
# Usage:
#   scripts/bench/drn-bench.sh [drn_torch.py options]
#       e.g. --reps 5 --sizes 512,1024 --batches 1,4 --nets drn_d_22,drn_c_26
#   scripts/bench/drn-bench.sh --venv-only     # only create the Python venv, print its python
#   scripts/bench/drn-bench.sh --memory-only   # only the ensemble peak-memory measurement
#
# What it does:
#   1. Creates (once) a venv at $FRACTURE_CACHE/torch-venv (FRACTURE_CACHE defaulting to
#      $HOME/.cache/fracture) with the pinned packages below. PyPI's Linux torch wheel is the CUDA
#      build and will not import without its nvidia-* libraries (about 4 GB installed); they are
#      never used here (everything runs on the CPU), but the wheel needs them to load.
#   2. Builds the Rust bench binary `drn` (models/benches/drn.rs, release profile).
#   3. Runs scripts/bench/drn_torch.py, which drives the three implementations round-robin
#      (ours through the bench binary's --serve mode) with 2 threads each, checks torch parity
#      on one shared set of weights, and prints the table.
#   4. Runs the `ensemble_memory` bench binary under /usr/bin/time -v.
#
# Needs python3 3.11+ with venv, cargo, and about 6 GB of disk for the venv.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
VENV="$CACHE/torch-venv"
MARKER="$VENV/.fracture-pinned"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"

# Every implementation gets the same two threads.
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
export MKL_NUM_THREADS="${MKL_NUM_THREADS:-2}"

# Top-level pins; torch's nvidia-* and triton dependencies are pinned exactly by torch itself.
PINNED=(
  "torch==2.10.0"
  "numpy==2.4.6"
  "safetensors==0.7.0"
  "onnx==1.19.1"
  "onnxruntime==1.23.2"
  "filelock==3.20.0"
  "fsspec==2025.10.0"
  "jinja2==3.1.6"
  "MarkupSafe==3.0.3"
  "networkx==3.5"
  "sympy==1.14.0"
  "mpmath==1.3.0"
  "typing_extensions==4.16.0"
  "protobuf==6.33.0"
  "ml_dtypes==0.5.3"
  "flatbuffers==25.9.23"
  "coloredlogs==15.0.1"
  "humanfriendly==10.0"
  "packaging==26.4"
)
WANT="$(printf '%s\n' "${PINNED[@]}")"

make_venv() {
  mkdir -p "$CACHE"
  if command -v flock >/dev/null 2>&1; then
    exec 8>"$CACHE/torch-venv.lock"
    flock 8
  fi
  if [ -x "$VENV/bin/python" ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ]; then
    return 0
  fi
  local avail_gb
  avail_gb="$(df -Pk "$CACHE" | awk 'NR == 2 { print int($4 / 1048576) }')"
  if [ "$avail_gb" -lt 22 ]; then
    echo "drn-bench.sh: only ${avail_gb} GB free under $CACHE; the torch venv needs about 6 GB" \
      "and this script keeps 15 GB free: free some space first" >&2
    exit 1
  fi
  local py="${FRACTURE_PYTHON:-python3}"
  if ! "$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "drn-bench.sh: $py is not Python 3.11+; set FRACTURE_PYTHON" >&2
    exit 1
  fi
  rm -rf "$VENV"
  echo "drn-bench.sh: creating $VENV (torch, onnxruntime; several GB, once)" >&2
  "$py" -m venv "$VENV" >&2
  if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
    --only-binary=:all: "${PINNED[@]}" >&2; then
    echo "drn-bench.sh: pip could not install the pinned packages into $VENV" >&2
    rm -rf "$VENV"
    exit 1
  fi
  printf '%s' "$WANT" >"$MARKER"
}

bench_exe() {
  # The bench binaries' paths come from cargo itself, not from guessing target/ hashes.
  cargo bench -p fracture-models --bench "$1" --no-run --message-format=json 2>/dev/null |
    "$VENV/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == sys.argv[1]:
        print(m["executable"])
' "$1" | tail -n 1
}

memory() {
  local exe
  exe="$(bench_exe ensemble_memory)"
  echo "== peak memory: one 1024 x 1024 radiograph, 10 full-width members (/usr/bin/time -v) =="
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v "$exe" 2> >(grep -E "Maximum resident|Elapsed" >&2)
  else
    "$exe"
  fi
}

case "${1:-}" in
  --venv-only)
    make_venv
    echo "$VENV/bin/python"
    exit 0
    ;;
  --memory-only)
    make_venv
    (cd "$ROOT" && cargo bench -p fracture-models --bench ensemble_memory --no-run >&2)
    cd "$ROOT" && memory
    exit 0
    ;;
esac

make_venv
cd "$ROOT"
echo "drn-bench.sh: building the bench binaries (release)" >&2
cargo bench -p fracture-models --bench drn --bench ensemble_memory --no-run >&2
DRN="$(bench_exe drn)"
"$VENV/bin/python" "$ROOT/scripts/bench/drn_torch.py" --ours "$DRN" "$@"
memory
