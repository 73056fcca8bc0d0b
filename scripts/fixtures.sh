#!/usr/bin/env bash
# Real radiographs for the tests, fetched from PyPI with pip (pinned versions, sha256-checked).
#
# Usage:
#   scripts/fixtures.sh [DEST]
#       Puts the files below into DEST (default $FRACTURE_CACHE/fixtures, FRACTURE_CACHE defaulting
#       to $HOME/.cache/fracture) and prints DEST as the last line of stdout (diagnostics on
#       stderr). Files already in DEST with the right sha256 are kept; the package archives are
#       kept in $FRACTURE_CACHE/downloads, so later runs need no network.
#
#   RG3_UNCR.dcm  CR ankle AP, MONOCHROME1, 1760x1760, 10 bits     (PyPI pydicom-data 1.0.0)
#   RG1_UNCR.dcm  CR chest PA, MONOCHROME1, 1955x1841, 15 bits,
#                 PixelSpacing 0\0 (edge case)                      (PyPI pydicom-data 1.0.0)
#   cat.dcm       DX lateral radiograph of a cat, MONOCHROME2, 2614x3072, realistic identifiers
#                 in the header: the de-identification subject.     (PyPI deid-data 0.0.20)
#                 Keep its names out of logs and test output.
#
# Needs python3 with pip (Debian: apt-get install python3-pip); nothing is installed.
set -euo pipefail

CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
DOWNLOADS="$CACHE/downloads"
DEST="${1:-$CACHE/fixtures}"

# Package archives: requirement | file name | sha256
ARCHIVES=(
  "pydicom-data==1.0.0|pydicom_data-1.0.0-py3-none-any.whl|622ac97265f1d91f76b5120b5bd6eb0f57737c392ef863b72c71779c91e33637"
  "deid-data==0.0.20|deid-data-0.0.20.tar.gz|33d455f13c82f76a39e8eb52d2808a35d7cde29c120819e246c863432281b8ed"
)
# Fixtures: file name | archive file name | member inside the archive | sha256
FILES=(
  "RG3_UNCR.dcm|pydicom_data-1.0.0-py3-none-any.whl|data_store/data/RG3_UNCR.dcm|6babfc42dd404213e1758d6dbb93648c248783cc23f593103fff4295c3374dfb"
  "RG1_UNCR.dcm|pydicom_data-1.0.0-py3-none-any.whl|data_store/data/RG1_UNCR.dcm|946f28f48b9fbf360196a9b835c8fce83b0c654bf85a5107663c8a61df02e498"
  "cat.dcm|deid-data-0.0.20.tar.gz|deid-data-0.0.20/deid_data/data/animals/cat.dcm|b59cc9078961c4b377a8e03d5efec84902b4c5375aa7590c862c3afa579f27d0"
)

log() { echo "fixtures.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 0
fi
(($# <= 1)) || die "usage: scripts/fixtures.sh [DEST]"
command -v python3 >/dev/null 2>&1 || die "python3 not found"

sha256() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | cut -d' ' -f1
  else
    python3 -c 'import hashlib,sys;h=hashlib.sha256();f=open(sys.argv[1],"rb")
for b in iter(lambda:f.read(1<<20),b""):h.update(b)
print(h.hexdigest())' "$1"
  fi
}

has_sha() { [[ -f "$1" ]] && [[ "$(sha256 "$1")" == "$2" ]]; }

# Make sure DOWNLOADS/NAME is the pinned archive; pip fetches it when missing or wrong.
fetch_archive() {
  local name="$1" req="" sha="" entry r n s
  for entry in "${ARCHIVES[@]}"; do
    IFS='|' read -r r n s <<<"$entry"
    [[ "$n" == "$name" ]] && { req="$r"; sha="$s"; }
  done
  [[ -n "$req" ]] || die "no archive named $name"
  has_sha "$DOWNLOADS/$name" "$sha" && return 0

  python3 -m pip --version >/dev/null 2>&1 || die "pip not found (Debian: apt-get install python3-pip)"
  mkdir -p "$DOWNLOADS"
  local tmp
  tmp="$(mktemp -d "$DOWNLOADS/.pip.XXXXXX")"
  log "downloading $req from PyPI ..."
  if ! python3 -m pip download --quiet --disable-pip-version-check --no-input --no-deps \
    -d "$tmp" "$req" >&2; then
    rm -rf "$tmp"
    die "pip download $req failed"
  fi
  local got=("$tmp"/*)
  if ((${#got[@]} != 1)) || [[ ! -f "${got[0]}" ]]; then
    rm -rf "$tmp"
    die "pip download $req did not give exactly one file"
  fi
  local actual
  actual="$(sha256 "${got[0]}")"
  if [[ "$actual" != "$sha" ]]; then
    rm -rf "$tmp"
    die "$req: sha256 $actual, expected $sha"
  fi
  mv -f "${got[0]}" "$DOWNLOADS/$name"
  rm -rf "$tmp"
}

# Copy one member of a wheel (zip) or sdist (tar.gz) to a file.
extract() {
  python3 - "$1" "$2" "$3" <<'EOF'
import shutil, sys, tarfile, zipfile
archive, member, out = sys.argv[1:]
if zipfile.is_zipfile(archive):
    with zipfile.ZipFile(archive) as z, z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
else:
    with tarfile.open(archive, "r:*") as t:
        src = t.extractfile(member)
        if src is None:
            sys.exit(f"{member} is not a regular file in {archive}")
        with src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
EOF
}

mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd -P)"

entry=""
for entry in "${FILES[@]}"; do
  IFS='|' read -r file archive member sha <<<"$entry"
  if has_sha "$DEST/$file" "$sha"; then
    continue
  fi
  fetch_archive "$archive"
  tmpfile="$DEST/.$file.tmp.$$"
  if ! extract "$DOWNLOADS/$archive" "$member" "$tmpfile"; then
    rm -f "$tmpfile"
    die "could not extract $member from $archive"
  fi
  actual="$(sha256 "$tmpfile")"
  if [[ "$actual" != "$sha" ]]; then
    rm -f "$tmpfile"
    die "$file from $archive: sha256 $actual, expected $sha"
  fi
  chmod 0644 "$tmpfile"
  mv -f "$tmpfile" "$DEST/$file"
  log "$file ready"
done

echo "$DEST"
