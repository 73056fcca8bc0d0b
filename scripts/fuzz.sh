#!/usr/bin/env bash
# Fuzzes the DICOM edge with cargo-fuzz (libFuzzer, AddressSanitizer) for a fixed budget, and
# keeps every crashing input as a regression test.
#
# Usage:
#   scripts/fuzz.sh [SECONDS]
#       SECONDS (default 600) is the fuzzing budget, split over the targets of fuzz/ (two
#       thirds to deid, one third to dicomdir):
#
#   deid      bytes as a DICOM file: the pre-parse gate, dicom-object's parser, pixel decoding,
#             de-identification both ways (pixel data passed through, and the whole file
#             parsed), the copy written and read back (fuzz/src/driver.rs)
#   dicomdir  bytes as a DICOMDIR, walked to the files it references in a small media folder
#
#       Installs what it lacks (nightly Rust, cargo-fuzz pinned below, into the cache), builds
#       the targets (release, debug assertions, AddressSanitizer), runs each one process at a
#       time (-timeout=10 s per input, -rss_limit_mb=2048, -malloc_limit_mb=256, -max_len=65536;
#       after a crash it starts again from the corpus until its budget is spent), and prints a
#       summary per target: seconds, inputs tried (execs), exec/s, coverage, crashes. Each
#       crashing input of a new kind (crash-, oom-, timeout-; one per signature: a panic's
#       message and first frame outside the runtime, else the error and that frame; those of
#       the inputs already kept are worked out first) is copied into
#       fuzz/regressions/<target>/, a crash also minimised (-minimize_crash, up to 30 s)
#       beside it as <name>-min, and its log (panic message, backtrace) is kept in the cache.
#       Commit the inputs: CI replays them (services/ingest/tests/fuzz_regressions.rs) and
#       fails until the crash is fixed.
#       Findings that are not crashes (a de-identified copy that does not read back, an input
#       blamed on a bug) are kept in the cache, one per kind, and listed.
#
# Not in CI: it needs nightly Rust and a sanitizer build of the whole ingest tree (a quarter of
# an hour on two cores), a run is random (what one finds, the next may not), and its budget is
# better spent at a desk than on every push. CI replays what it kept instead, on stable.
#
# Environment:
#   FRACTURE_CACHE      cache root (default $HOME/.cache/fracture); under it: cargo-fuzz-VERSION
#                       (the tool), fuzz-target (the build; FUZZ_TARGET_DIR overrides), fuzz/
#                       corpus/<target> (the corpus, grown across runs), fuzz/artifacts/<target>
#                       (crashing inputs and their logs), fuzz/findings/<target>
#   FUZZ_TARGETS        the targets to run (default "deid dicomdir")
#   FUZZ_TOOLCHAIN      the nightly toolchain (default nightly)
#   FUZZ_MALLOC_LIMIT_MB  -malloc_limit_mb (default 256, see MALLOC_LIMIT_MB below)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

CARGO_FUZZ_VERSION=0.13.2
CACHE="${FRACTURE_CACHE:-$HOME/.cache/fracture}"
TOOLCHAIN="${FUZZ_TOOLCHAIN:-nightly}"
TARGET_DIR="${FUZZ_TARGET_DIR:-$CACHE/fuzz-target}"
TOOL_ROOT="$CACHE/cargo-fuzz-$CARGO_FUZZ_VERSION"
STATE="$CACHE/fuzz"
TRIPLE=x86_64-unknown-linux-gnu
# One allocation over this is a crash (out of memory). Inputs are at most 64 KiB (-max_len), so
# 256 MiB is a 4096-fold amplification: a memory bomb. Left at 2048, the corpus fills with
# inputs that each allocate and zero 1 to 2 GiB, and the fuzzer crawls at a few execs a second.
# services/ingest/tests/fuzz_regressions.rs replays with the same limit.
MALLOC_LIMIT_MB="${FUZZ_MALLOC_LIMIT_MB:-256}"
read -r -a targets <<<"${FUZZ_TARGETS:-deid dicomdir}"

log() { echo "fuzz.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
  exit 0
fi
(($# <= 1)) || die "usage: scripts/fuzz.sh [SECONDS]"
budget="${1:-600}"
[[ "$budget" =~ ^[0-9]+$ ]] && ((budget >= 10)) || die "SECONDS must be a whole number >= 10"
[ "$(uname -m)" = x86_64 ] && [ "$(uname -s)" = Linux ] || die "x86_64 Linux only ($TRIPLE)"
command -v rustup >/dev/null 2>&1 || die "rustup is required: https://rustup.rs"

# The tools: a nightly toolchain (sanitizers and sancov need it) and the pinned cargo-fuzz.
mkdir -p "$STATE"
exec 9>"$CACHE/fuzz.lock"
flock 9
if ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
  log "installing Rust $TOOLCHAIN"
  rustup toolchain install "$TOOLCHAIN" --profile minimal >&2
fi
if [ "$("$TOOL_ROOT/bin/cargo-fuzz" --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  log "installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOL_ROOT"
  CARGO_TARGET_DIR="$TARGET_DIR/install" cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" \
    --locked --root "$TOOL_ROOT" >&2
fi
export PATH="$TOOL_ROOT/bin:$PATH"

log "building the fuzz targets (release, debug assertions, AddressSanitizer) in $TARGET_DIR"
cargo "+$TOOLCHAIN" fuzz build --target-dir "$TARGET_DIR" >&2

work="$(mktemp -d "${TMPDIR:-/tmp}/fracture-fuzz.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# The dicomdir target makes its media folder under TMPDIR.
mkdir -p "$work/tmp"
export TMPDIR="$work/tmp"
export FRACTURE_FUZZ_FINDINGS="$STATE/findings"
export RUST_BACKTRACE=1
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0}"

weight() { case "$1" in deid) echo 2 ;; *) echo 1 ;; esac; }
total_weight=0
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || die "no fuzz target $t (fuzz/fuzz_targets/$t.rs)"
  total_weight=$((total_weight + $(weight "$t")))
done

# The first line of a crash log that says what happened (for a panic, its message too).
what() {
  local p
  p=$(grep -m1 -A1 "panicked at" "$1" | tr '\n' ' ' || true)
  if [ -n "$p" ]; then
    echo "${p:0:400}"
  else
    grep -m1 -E "^==[0-9]+==.*ERROR|ERROR: libFuzzer|has overflowed its stack|SUMMARY:" "$1" |
      cut -c1-300 || true
  fi
}

# A crash's signature, to keep one input per bug: a panic's message (numbers out) and the first
# frame of its backtrace outside the runtime, else the sanitizer's or libFuzzer's error and the
# first frame of its stack outside the runtime (std, alloc, libFuzzer, sanitizers, allocation
# helpers).
runtime='^(__rustc|rust_begin|rust_panic|__rust|core::|std::|alloc::|<core::|<std::|<alloc::'
runtime+='|<smallvec::|<hashbrown::|smallvec::|hashbrown::|libfuzzer_sys|fuzzer::|__sanitizer|__asan'
runtime+='|__interceptor|__libc|__GI|malloc|calloc|realloc|free|abort|raise|__pthread|start_thread'
runtime+='|clone|drop_glue|drop|try_reserve|try_grow|reserve|resize|with_capacity|vec|from_elem'
runtime+='|handle_alloc_error|panic)'
signature() {
  local p e f
  p=$(grep -m1 -A1 "panicked at" "$1" | tail -n 1 | sed -e 's/[0-9][0-9]*/N/g' || true)
  if [ -n "$p" ]; then
    f=$(sed -n 's/^ *[0-9][0-9]*: \(.*\)$/\1/p' "$1" | grep -vE "$runtime" | head -n 1 || true)
    echo "panic: $p at $f"
    return
  fi
  e=$(grep -m1 -oE "ERROR: (libFuzzer|AddressSanitizer): [a-z-]+" "$1" || true)
  # "#N 0xADDR in FUNCTION PATH:LINE:COL": the function (generic arguments out) of the first
  # frame outside the runtime.
  f=$(sed -n 's/^ *#[0-9][0-9]* 0x[0-9a-f]* in \(.*\) \(\/[^ ]*\)$/\2 \1/p' "$1" |
    grep -vE "^[^ ]*(/rustc/|compiler-rt|/libfuzzer|/smallvec-|/hashbrown-)" | cut -d' ' -f2- |
    sed -e ':a' -e 's/<[^<>]*>//g' -e 'ta' | grep -vE "$runtime" | head -n 1 || true)
  echo "$e at $f"
}

summary=()
crash_lines=()
for t in "${targets[@]}"; do
  seconds=$((budget * $(weight "$t") / total_weight))
  bin="$TARGET_DIR/$TRIPLE/release/$t"
  [ -x "$bin" ] || die "the build did not make $bin"
  corpus="$STATE/corpus/$t"
  artifacts="$STATE/artifacts/$t"
  mkdir -p "$corpus" "$artifacts" "fuzz/regressions/$t"
  # The hand-made hostile inputs start the corpus too; the crashes kept beside them do not (a
  # crash in the corpus stops libFuzzer before it fuzzes).
  find "fuzz/regressions/$t" -maxdepth 1 -type f -name 'hostile-*' -exec cp -n -t "$corpus" {} +
  # One input per crash signature: those of the kept crashes first (replayed once each).
  signatures="$STATE/signatures-$t.txt"
  touch "$signatures"
  while read -r kept; do
    [ -n "$kept" ] || continue
    grep -qF "	$kept" "$signatures" && continue
    "$bin" "${flags[@]}" -runs=1 "$kept" >"$work/replay.log" 2>&1 || true
    printf '%s\t%s\n' "$(signature "$work/replay.log")" "$kept" >>"$signatures"
  done < <(find "fuzz/regressions/$t" -maxdepth 1 -type f ! -name 'hostile-*' ! -name '*.md' | sort)
  flags=(
    -dict=fuzz/dicom.dict -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb="$MALLOC_LIMIT_MB"
    -max_len=65536 -print_final_stats=1 -artifact_prefix="$artifacts/"
  )
  log "fuzzing $t for ${seconds}s (corpus $corpus)"
  start=$(date +%s)
  end=$((start + seconds))
  execs=0 runs=0 dups=0 cov="" seen=" " new=()
  while :; do
    left=$((end - $(date +%s)))
    ((left >= 5 && runs < 100)) || break
    runs=$((runs + 1))
    out="$work/$t.$runs.log"
    # The corpus first: new inputs go there. The seeds are read, not changed.
    rc=0
    "$bin" "$corpus" "fuzz/seeds/$t" "${flags[@]}" -max_total_time="$left" >"$out" 2>&1 || rc=$?
    # Inputs tried: the final stats, or after a crash the last status line (#N).
    n=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$out" | tail -n 1)
    [ -n "$n" ] || n=$(sed -n 's/^#\([0-9][0-9]*\).*/\1/p' "$out" | tail -n 1)
    execs=$((execs + ${n:-0}))
    c=$(grep -oE "cov: [0-9]+ ft: [0-9]+" "$out" | tail -n 1 || true)
    [ -n "$c" ] && cov="$c"
    ((rc == 0)) && break
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$out" | tail -n 1)
    if [ -z "$artifact" ] || [ ! -f "$artifact" ]; then
      log "$t: libFuzzer exited $rc without a crashing input; its log:"
      tail -n 30 "$out" >&2
      break
    fi
    name="$(basename "$artifact")"
    cp "$out" "$artifacts/$name.log"
    log "$t: $name: $(what "$out")"
    # An input in the corpus that crashes (grown there before a limit changed, or an RSS crash
    # that depends on what ran before) would stop every restart: it leaves the corpus (libFuzzer
    # names corpus files by their SHA-1, as it names artifacts).
    if [ -f "$corpus/${name#*-}" ]; then
      rm -f "$corpus/${name#*-}"
      log "$t: removed ${name#*-} from the corpus"
    elif [[ "$seen" == *" $name "* ]]; then
      log "$t: the same input crashed again (a seed?): fix it first"
      break
    fi
    seen+="$name "
    sig="$(signature "$out")"
    kept=$(awk -F '\t' -v s="$sig" '$1 == s { print $2; exit }' "$signatures")
    if [ -n "$kept" ]; then
      log "$t: $name is the crash of $kept again (not kept)"
      dups=$((dups + 1))
      continue
    fi
    printf '%s\t%s\n' "$sig" "fuzz/regressions/$t/$name" >>"$signatures"
    new+=("$name")
    cp "$artifact" "fuzz/regressions/$t/$name"
    if [[ "$name" == crash-* ]]; then
      # Smaller is easier to read; any crash counts, so the log of the minimised one is kept too.
      "$bin" "${flags[@]}" -minimize_crash=1 -max_total_time=30 -runs=100000 \
        -exact_artifact_path="$work/min" "$artifact" >"$work/min.log" 2>&1 || true
      if [ -s "$work/min" ] && ! cmp -s "$work/min" "$artifact"; then
        cp "$work/min" "fuzz/regressions/$t/$name-min"
        "$bin" "${flags[@]}" "$work/min" >"$artifacts/$name-min.log" 2>&1 || true
      fi
    fi
  done
  took=$(($(date +%s) - start))
  rate=$((execs / (took > 0 ? took : 1)))
  summary+=("$(printf '%-9s %5ss %11s execs %7s exec/s  %-22s corpus %5s  runs %2s  new crashes %s (+%s again)' \
    "$t" "$took" "$execs" "$rate" "${cov:-cov: ?}" "$(find "$corpus" -type f | wc -l)" "$runs" "${#new[@]}" "$dups")")
  for name in "${new[@]}"; do
    crash_lines+=("$t: fuzz/regressions/$t/$name  ($(what "$artifacts/$name.log"))  log: $artifacts/$name.log")
  done
done

echo
echo "cargo-fuzz $CARGO_FUZZ_VERSION, $(rustup run "$TOOLCHAIN" rustc --version), budget ${budget}s"
printf '%s\n' "${summary[@]}"
if ((${#crash_lines[@]})); then
  echo "crashing inputs (kept; commit them, CI replays them):"
  printf '  %s\n' "${crash_lines[@]}"
else
  echo "no crashes"
fi
if [ -d "$FRACTURE_FUZZ_FINDINGS" ]; then
  found=$(find "$FRACTURE_FUZZ_FINDINGS" -name '*.txt' | sort)
  if [ -n "$found" ]; then
    echo "findings that are not crashes, one input per kind (in $FRACTURE_FUZZ_FINDINGS):"
    while read -r f; do echo "  ${f%.txt}: $(head -c 300 "$f")"; done <<<"$found"
  fi
fi
