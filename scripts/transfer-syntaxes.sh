#!/usr/bin/env bash
# Writes RG3_UNCR.dcm (a real CR radiograph, MONOCHROME1, 10 bits stored) in every transfer
# syntax that /work/shared/FIXTURES.md lists, with Debian's dcmtk and gdcm:
#
#   scripts/transfer-syntaxes.sh OUTDIR
#
# Idempotent: a variant already in OUTDIR is kept. Prints OUTDIR as its last line, so
# `dir=$(bash scripts/transfer-syntaxes.sh DIR | tail -1)` works. The MONOCHROME2 twin and the
# signed-pixel variant are built in shared/tests/transfer_syntaxes.rs with dicom-object.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

out="${1:?usage: scripts/transfer-syntaxes.sh OUTDIR}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

log() { echo "transfer-syntaxes: $*" >&2; }

if ! command -v dcmcjpeg >/dev/null || ! command -v dcmcjpls >/dev/null ||
  ! command -v gdcmconv >/dev/null; then
  log "installing dcmtk and libgdcm-tools"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dcmtk libgdcm-tools >&2
fi

fixtures="$(bash scripts/fixtures.sh | tail -1)"
src="$fixtures/RG3_UNCR.dcm"
[ -f "$src" ] || { log "missing $src"; exit 1; }
cp -f "$src" "$out/uncr.dcm"

# name | command (IN and OUT are substituted); a variant a tool cannot write is skipped with a
# note, so the test can say which one is missing instead of this script failing half-way.
variants=(
  "jpeg-lossless-sv1|dcmcjpeg +e1 IN OUT"
  "jpeg-lossless-p14|dcmcjpeg +el IN OUT"
  "jpeg-baseline|dcmcjpeg +eb IN OUT"
  "jpeg-extended|dcmcjpeg +ee IN OUT"
  "rle|dcmcrle IN OUT"
  "jpegls-lossless|dcmcjpls +el IN OUT"
  "jpegls-near|dcmcjpls +en IN OUT"
  "j2k-lossless|gdcmconv --j2k IN OUT"
  "j2k-lossy|gdcmconv --j2k --lossy -r 10 IN OUT"
  "explicit-big-endian|dcmconv +tb IN OUT"
  "deflated|dcmconv +td IN OUT"
  "implicit|gdcmconv --implicit IN OUT"
)
for v in "${variants[@]}"; do
  name="${v%%|*}"
  cmd="${v#*|}"
  dest="$out/$name.dcm"
  [ -s "$dest" ] && continue
  tmp="$out/.$name.tmp.dcm"
  cmd="${cmd/IN/$src}"
  cmd="${cmd/OUT/$tmp}"
  # shellcheck disable=SC2086 # the command is split on purpose
  if $cmd >&2 && [ -s "$tmp" ]; then
    mv -f "$tmp" "$dest"
    log "$name.dcm ($(dcmdump -q -s +P 0002,0010 "$dest" | sed 's/.*=\([^ ]*\).*/\1/'))"
  else
    rm -f "$tmp"
    log "could not write $name.dcm with: $cmd"
  fi
done

echo "$out"
