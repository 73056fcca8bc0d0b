#!/usr/bin/env bash
# The pipeline's own ceiling (operations issue, load): the five `fracture serve` processes with the
# null model on a real broker, fed a back-scan of small phantoms; prints radiographs/s end to end
# and per stage, and each stage's batch time and wait (p50/p99) from the stages' OTLP spans.
#
# Usage: scripts/load.sh [INPUTS]   (default 500)
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
# The dev profile the tests use (dependencies at -O3, our code at -O1): no separate release build.
cargo bench --locked --profile dev --bench pipeline 2>/dev/null
