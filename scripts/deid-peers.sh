#!/usr/bin/env bash
# De-identification peers for the ingest tests: real tools to compare our Basic Profile against.
#
# Usage:
#   scripts/deid-peers.sh
#       Installs the Debian packages below when a tool is missing (apt-get update runs first only
#       when apt cannot find them), then makes (or reuses) a Python venv at
#       ${FRACTURE_CACHE:-$HOME/.cache/fracture}/deid-venv with pinned pydicom, and prints that
#       venv's python path as the last line of stdout (diagnostics on stderr). Idempotent: a
#       second run installs nothing and needs no network.
#
#   gdcmanon   (libgdcm-tools)  PS3.15 Basic Profile de-identifier, our comparison peer
#   dciodvfy   (dicom3tools)    IOD validity checker: our output must add no errors
#   dcmdump    (dcmtk)          readable dumps when a test fails
#   pydicom==3.0.2 (PyPI)       builds the planted-identifier corpus (scripts/corpus/)
#   dicom-anonymizer==2.1.0     (PyPI, wheel sha256-checked, installed without its dependencies:
#                               only its copy of Table E.1-1, generated from the 2026c edition of
#                               PS3.15, is read, as data, by tests/deid_peers.rs)
#
# Needs root (or an apt that works for this user) for the Debian packages, and python3 with venv.
set -euo pipefail

CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
VENV="$CACHE/deid-venv"
PYDICOM_PIN="pydicom==3.0.2"
ANONYMIZER_PIN="dicom-anonymizer==2.1.0"
ANONYMIZER_SHA256="bf642a6b43afd362faa2c7d2b101a3d4765cf85cf0d7590795e3ee556e636b8b"

log() { echo "deid-peers.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 0
fi
(($# == 0)) || die "usage: scripts/deid-peers.sh (no arguments)"

# tool -> Debian package
declare -A PACKAGE_OF=([gdcmanon]=libgdcm-tools [dciodvfy]=dicom3tools [dcmdump]=dcmtk)
missing=()
for tool in "${!PACKAGE_OF[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${PACKAGE_OF[$tool]}")
done

if ((${#missing[@]} > 0)); then
  command -v apt-get >/dev/null 2>&1 ||
    die "missing ${missing[*]} and no apt-get here: install them by hand (they provide gdcmanon, dciodvfy, dcmdump)"
  SUDO=()
  if ((EUID != 0)); then
    command -v sudo >/dev/null 2>&1 || die "installing ${missing[*]} needs root; run as root or install sudo"
    SUDO=(sudo -n)
  fi
  # Serialised: two test binaries may call this script at once, and apt takes a global lock.
  mkdir -p "$CACHE"
  exec 9>"$CACHE/deid-peers.lock"
  flock 9 2>/dev/null || true
  log "installing ${missing[*]} ..."
  export DEBIAN_FRONTEND=noninteractive
  if ! "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
    log "apt-get install failed; refreshing the package lists and retrying"
    "${SUDO[@]}" apt-get update -q >&2 || die "apt-get update failed (no network?)"
    "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 ||
      die "apt-get install ${missing[*]} failed"
  fi
  for tool in "${!PACKAGE_OF[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool still missing after installing ${PACKAGE_OF[$tool]}"
  done
fi

command -v openssl >/dev/null 2>&1 || die "openssl not found (Debian: apt-get install openssl); gdcmanon -e needs a certificate"
command -v python3 >/dev/null 2>&1 || die "python3 not found"

mkdir -p "$CACHE"
exec 8>"$CACHE/deid-venv.lock"
flock 8 2>/dev/null || true
venv_ok() {
  [[ -x "$VENV/bin/python" ]] &&
    "$VENV/bin/python" -c 'import pydicom, sys; sys.exit(pydicom.__version__ != "3.0.2")' 2>/dev/null
}
anonymizer_ok() {
  "$VENV/bin/python" -c 'import sys; from importlib.metadata import version; sys.exit(version("dicom-anonymizer") != "2.1.0")' 2>/dev/null
}
if ! venv_ok; then
  log "creating $VENV with $PYDICOM_PIN ..."
  rm -rf "$VENV"
  python3 -m venv "$VENV" >&2 || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input \
    "$PYDICOM_PIN" >&2 || die "pip install $PYDICOM_PIN failed (no network?)"
  venv_ok || die "the venv at $VENV does not import pydicom 3.0.2"
fi
if ! anonymizer_ok; then
  log "adding $ANONYMIZER_PIN (its Table E.1-1 data only) ..."
  wheels="$CACHE/wheels"
  mkdir -p "$wheels"
  "$VENV/bin/python" -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
    --only-binary=:all: -d "$wheels" "$ANONYMIZER_PIN" >&2 || die "pip download $ANONYMIZER_PIN failed (no network?)"
  wheel="$wheels/dicom_anonymizer-2.1.0-py3-none-any.whl"
  echo "$ANONYMIZER_SHA256  $wheel" | sha256sum -c --quiet - >&2 ||
    die "$wheel does not have the pinned sha256 $ANONYMIZER_SHA256"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --no-input --no-deps \
    "$wheel" >&2 || die "pip install $wheel failed"
  anonymizer_ok || die "the venv at $VENV does not have $ANONYMIZER_PIN"
fi
echo "$VENV/bin/python"
