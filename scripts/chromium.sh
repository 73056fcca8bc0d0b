#!/usr/bin/env bash
# Debian's Chromium for the dashboard's browser test; installs it if missing.
#   scripts/chromium.sh    last stdout line: the path of the chromium binary
# Run it as root with: --headless --no-sandbox --disable-gpu --disable-quic --no-first-run
#   --disable-background-networking --disable-component-update --disable-sync
#   --user-data-dir=<a new empty temp dir>; then --dump-dom URL, or
#   --screenshot=FILE --window-size=1400,1000 URL.
set -euo pipefail

find_chromium() {
  local c
  for c in chromium chromium-browser; do
    if command -v "$c" >/dev/null 2>&1; then command -v "$c"; return 0; fi
  done
  return 1
}

if ! bin="$(find_chromium)"; then
  echo "installing chromium from Debian's packages" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Update the lists only when apt does not know the package yet (a fresh machine has none).
  if ! apt-cache show chromium >/dev/null 2>&1; then
    apt-get update -qq >&2
  fi
  if ! apt-get install -y -qq chromium >&2; then
    # The lists may be stale (a removed version): refresh once and retry.
    apt-get update -qq >&2
    apt-get install -y -qq chromium >&2
  fi
  bin="$(find_chromium)" || { echo "chromium was installed but is not on PATH" >&2; exit 1; }
fi
echo "$bin"
