#!/usr/bin/env bash
# The pipeline's own ceiling (operations issue, load): the five `fracture serve` processes with the
# null model on a real broker, fed a back-scan of small phantoms; prints radiographs/s end to end
# and per stage, each stage's batch time and wait (p50/p99) from the stages' OTLP spans, and each
# stage's cost per radiograph (CPU, claim-check bytes, bus bytes): docs/capacity.md's inputs.
#
# Usage: scripts/load.sh [INPUTS]   (default 500)
#   FRACTURE_LOAD_SIDES=2000-2500   phantom sides in pixels (default 256-320)
#   FRACTURE_LOAD_MODEL=demo        the demo ensemble instead of the null model
#   FRACTURE_LOAD_INPUT_SIZE=256    the null model's input side (default 1024, the paper's)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${FRACTURE_CACHE:-$HOME/.cache/fracture}/target}"
export FRACTURE_LOAD_INPUTS="${1:-500}"
# FRACTURE_LOAD_DICOM_OUTPUTS=0 leaves out the SR and Secondary Capture each radiograph gets.
broker_dir=""
if [ -z "${FRACTURE_TEST_KAFKA:-}" ]; then
  broker_dir="$(mktemp -d "${TMPDIR:-/tmp}/fracture-load-kafka.XXXXXX")"
  trap 'bash scripts/kafka.sh stop "$broker_dir" >/dev/null 2>&1 || true; rm -rf "$broker_dir"' EXIT
  FRACTURE_TEST_KAFKA="$(bash scripts/kafka.sh start "$broker_dir" --watch-pid $$ | tail -n 1)"
  export FRACTURE_TEST_KAFKA
fi
# The release build, as deployed (the first run compiles it: about 20 minutes on 2 cores);
# FRACTURE_LOAD_PROFILE=dev reuses the tests' build (dependencies at -O3, our code at -O1).
profile=()
[ -n "${FRACTURE_LOAD_PROFILE:-}" ] && profile=(--profile "$FRACTURE_LOAD_PROFILE")
cargo bench --locked "${profile[@]}" --bench pipeline 2>/dev/null
