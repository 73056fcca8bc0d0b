#!/usr/bin/env bash
# The full kill run of the operations issue: 1,000 phantoms through the five `fracture serve`
# processes on a real broker while a random stage is SIGKILLed and restarted 20 times; then the
# exactly-once check (inputs, findings, dead letters, duplicates, lost; audit rows). CI runs the
# same test smaller (tests/chaos.rs defaults).
#
# Usage: scripts/chaos.sh [INPUTS [KILLS]]   (environment: FRACTURE_CHAOS_SEED to replay a run)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${FRACTURE_CACHE:-$HOME/.cache/fracture}/target}"
export FRACTURE_CHAOS_INPUTS="${1:-1000}" FRACTURE_CHAOS_KILLS="${2:-20}"

broker_dir=""
if [ -z "${FRACTURE_TEST_KAFKA:-}" ]; then
  broker_dir="$(mktemp -d "${TMPDIR:-/tmp}/fracture-chaos-kafka.XXXXXX")"
  trap 'bash scripts/kafka.sh stop "$broker_dir" >/dev/null 2>&1 || true; rm -rf "$broker_dir"' EXIT
  FRACTURE_TEST_KAFKA="$(bash scripts/kafka.sh start "$broker_dir" --watch-pid $$ | tail -n 1)"
  export FRACTURE_TEST_KAFKA
fi
start=$(date +%s)
cargo test --locked --test chaos random_sigkills -- --nocapture 2>&1 |
  grep -E "^(chaos:|kills done|outputs complete|exactly-once|kill run:|test |thread )"
echo "chaos.sh: ${FRACTURE_CHAOS_INPUTS} inputs, ${FRACTURE_CHAOS_KILLS} kills, $(( $(date +%s) - start )) s"
