#!/usr/bin/env bash
# The Python peers of the tests, in a venv of their own: scikit-learn and statsmodels (the evaluation
# oracles), highdicom and pydicom, and kubernetes-validate (the chart's manifests against the
# Kubernetes OpenAPI schemas, tests/helm_chart.rs).
#
# Usage:
#   scripts/pyenv.sh
#       Creates (once) a venv at $FRACTURE_CACHE/venv (FRACTURE_CACHE defaulting to
#       $HOME/.cache/fracture) with the pinned packages below, and prints the venv's python as the
#       last line of stdout (diagnostics on stderr). A marker file in the venv holds the pinned list;
#       while it matches, nothing is installed again, so later runs need no network.
#
# Needs python3 (3.11 or later) with the venv module (Debian: apt-get install python3-venv).
# Override the interpreter with FRACTURE_PYTHON=/path/to/python3.
set -euo pipefail

CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
VENV="$CACHE/venv"
MARKER="$VENV/.fracture-pinned"

# Exact versions, transitive dependencies included, so every machine computes with the same code.
PINNED=(
  "numpy==2.4.6"
  "kubernetes-validate==1.34.1"
  "attrs==26.1.0"
  "importlib_resources==7.1.0"
  "jsonschema==4.26.0"
  "jsonschema-specifications==2025.9.1"
  "PyYAML==6.0.4"
  "referencing==0.37.0"
  "rpds-py==2026.9.1"
  "scipy==1.17.1"
  "scikit-learn==1.9.1"
  "statsmodels==0.15.0"
  "highdicom==0.28.2"
  "cloudpickle==3.1.3"
  "formulaic==1.2.2"
  "interface_meta==2.0.1"
  "joblib==1.6.0"
  "narwhals==2.29.0"
  "packaging==26.4"
  "pandas==3.1.1"
  "patsy==1.0.3"
  "pillow==13.0.0"
  "pydicom==3.0.2"
  "pyjpegls==1.5.1"
  "python-dateutil==4.0.0"
  "safetensors==0.7.0"
  "threadpoolctl==3.8.0"
  "typing_extensions==4.16.0"
  "tzdata==2026.6"
  "wrapt==2.5.2"
)
WANT="$(printf '%s\n' "${PINNED[@]}")"

mkdir -p "$CACHE"
# Two test runs at once must not build (or delete) the venv under each other.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$CACHE/venv.lock"
  flock 9
fi

if [ -x "$VENV/bin/python" ] && [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$WANT" ]; then
  echo "$VENV/bin/python"
  exit 0
fi

# The pins were checked on 3.11, so it comes first; a candidate must run (pyenv shims may not) and be 3.11+.
version_ok='import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'
PY="${FRACTURE_PYTHON:-}"
if [ -n "$PY" ]; then
  if ! "$PY" -c "$version_ok" >/dev/null 2>&1; then
    echo "pyenv.sh: FRACTURE_PYTHON=$PY does not run or is older than Python 3.11" >&2
    exit 1
  fi
else
  for c in python3.11 python3.12 python3.13 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c "$version_ok" >/dev/null 2>&1; then
      PY="$(command -v "$c")"
      break
    fi
  done
fi
if [ -z "$PY" ]; then
  echo "pyenv.sh: no Python 3.11+ found; install one or set FRACTURE_PYTHON" >&2
  exit 1
fi

# A stale or half-made venv is rebuilt from scratch rather than patched.
rm -rf "$VENV"
echo "pyenv.sh: creating $VENV with $PY" >&2
if ! "$PY" -m venv "$VENV" >&2; then
  echo "pyenv.sh: '$PY -m venv' failed (Debian: apt-get install python3-venv)" >&2
  rm -rf "$VENV"
  exit 1
fi
if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --no-input --quiet \
  --only-binary=:all: "${PINNED[@]}" >&2; then
  echo "pyenv.sh: pip could not install the pinned packages into $VENV" >&2
  rm -rf "$VENV"
  exit 1
fi
printf '%s' "$WANT" >"$MARKER"
echo "$VENV/bin/python"
