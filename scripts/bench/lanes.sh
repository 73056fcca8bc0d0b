#!/usr/bin/env bash
# The emergency room under a back-scan (scale issue, part 3): live radiographs through STOW-RS
# while a folder back-scan floods the five `fracture serve` processes, for each lane arrangement
# in one run (idle, one queue, two lanes alternating, two lanes live first); prints the live
# p50/p99 latency and the back-scan's throughput of each as a table.
#
# Usage: scripts/bench/lanes.sh [BACKSCAN [LIVE [EVERY_MS]]]   (default 1500 40 400)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${FRACTURE_CACHE:-$HOME/.cache/fracture}/target}"
export FRACTURE_LANES_BACKSCAN="${1:-1500}" FRACTURE_LANES_LIVE="${2:-40}" FRACTURE_LANES_EVERY_MS="${3:-400}"
broker_dir=""
if [ -z "${FRACTURE_TEST_KAFKA:-}" ]; then
  broker_dir="$(mktemp -d "${TMPDIR:-/tmp}/fracture-lanes-kafka.XXXXXX")"
  trap 'bash scripts/kafka.sh stop "$broker_dir" >/dev/null 2>&1 || true; rm -rf "$broker_dir"' EXIT
  FRACTURE_TEST_KAFKA="$(bash scripts/kafka.sh start "$broker_dir" --watch-pid $$ | tail -n 1)"
  export FRACTURE_TEST_KAFKA
fi
# The dev profile the tests use (dependencies at -O3, our code at -O1), as scripts/load.sh:
# the arrangements are compared with each other, in one build.
cargo bench --locked --profile dev --bench lanes
