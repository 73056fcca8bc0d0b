#!/usr/bin/env bash
# The whole test suite, real Kafka broker included: fetches the pinned fixtures, assembles and
# starts a broker (unless FRACTURE_TEST_KAFKA names one), runs every test, stops the broker.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${FRACTURE_CACHE:-$HOME/.cache/fracture}/target}"

FRACTURE_FIXTURES="$(bash scripts/fixtures.sh | tail -n 1)"
export FRACTURE_FIXTURES
# Peers the tests compare against (each script is idempotent and pins its versions):
# gdcmanon, dciodvfy, dcmtk and pydicom; scikit-learn and statsmodels.
bash scripts/deid-peers.sh >/dev/null
bash scripts/pyenv.sh >/dev/null
bash scripts/chromium.sh >/dev/null
bash scripts/orthanc.sh install >/dev/null  # the PACS of services/ingest/tests/dicomweb.rs
FRACTURE_HELM="$(bash scripts/helm.sh | tail -n 1)"; export FRACTURE_HELM  # tests/helm_chart.rs
bash scripts/seaweedfs.sh install >/dev/null  # the S3 server of tests/store_s3.rs
FRACTURE_PROMETHEUS="$(bash scripts/prometheus.sh | tail -n 1)"; export FRACTURE_PROMETHEUS  # tests/prometheus.rs
FRACTURE_JAEGER="$(bash scripts/jaeger.sh | tail -n 1)"; export FRACTURE_JAEGER  # tests/otlp.rs
# Podman and the base images of tests/compose.rs; exit 3 means containers cannot run on this
# machine, and the test then says so and skips (any other failure stops here).
compose_rc=0
FRACTURE_COMPOSE="$(bash scripts/compose.sh install | tail -n 1)" || compose_rc=$?
case "$compose_rc" in
0) export FRACTURE_COMPOSE ;;
3) export FRACTURE_COMPOSE="" ;;
*) exit "$compose_rc" ;;
esac

broker_dir=""
if [ -z "${FRACTURE_TEST_KAFKA:-}" ]; then
  broker_dir="$(mktemp -d "${TMPDIR:-/tmp}/fracture-test-kafka.XXXXXX")"
  trap 'bash scripts/kafka.sh stop "$broker_dir" >/dev/null 2>&1 || true; rm -rf "$broker_dir"' EXIT
  FRACTURE_TEST_KAFKA="$(bash scripts/kafka.sh start "$broker_dir" --watch-pid $$ | tail -n 1)"
  export FRACTURE_TEST_KAFKA
  echo "test broker at $FRACTURE_TEST_KAFKA" >&2
fi

# With the S3 claim-check store, as the container image is built.
cargo test --workspace --locked --features s3 "$@"
