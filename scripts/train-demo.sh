#!/usr/bin/env bash
# Trains the phantom-only demo ensemble into models/demo: synthetic phantoms -> three members
# (models/demo/recipes/*.toml) -> thresholds calibrated on held-out phantoms -> ensemble.toml with
# a model card holding the held-out metrics; prints how long it took.
#
# Usage: scripts/train-demo.sh
#        DEMO_FROM=calibrate scripts/train-demo.sh   (keep the shipped members, redo steps 3-7)
#
# Time: about 1.5-2 hours on two CPU cores (each training epoch about 80 s per member: 64 epochs
# in all; phantoms, calibration and the held-out scan about 8 minutes).
#
# Re-running resumes: phantoms already written are kept, each member continues from its last
# checkpoint (`fracture train --resume`), so a killed run loses at most one epoch.
#
# Environment (the defaults are the recipe of the shipped ensemble):
#   DEMO_OUT       the ensemble's folder (default models/demo)
#   DEMO_WORK      scratch: phantoms, checkpoints, scans (default $CARGO_TARGET_DIR/demo-work);
#                  about 1.5 GB of training phantoms, 4 GB (calibration) and 3 GB (held-out) of
#                  full-size ones, and the held-out scan's de-identified copies (3 GB more), each
#                  deleted once used unless DEMO_KEEP=1
#   DEMO_TRAIN     training phantoms, 480-832 px a side (default 1800)
#   DEMO_CALIB     calibration phantoms, full size (default 2000: every region then has 35 to
#                  80 positives, enough for thresholds of its own; 400 gave 3 to 13)
#   DEMO_HELDOUT   held-out evaluation phantoms, full size (default 300)
#   DEMO_ACCEPT    acceptance-check phantoms, full size, seed 99 (default 300)
#   DEMO_VERSION   the manifest's model_version (default demo-phantoms-0.2.0)
#   DEMO_FROM      train (default): everything; calibrate: the members already in DEMO_OUT are
#                  kept as they are (their weights and the lines saying how they were trained)
#                  and only the thresholds, the evaluations and the model card are redone;
#                  card: only the model card, from the thresholds and metrics a run left in
#                  DEMO_WORK
#   DEMO_EPOCHS, DEMO_PATIENCE, DEMO_BATCH, DEMO_LR   (default 30, 10, 16, 2e-3)
#   DEMO_EPOCHS_<member, - as _>   one member's epoch limit (the shipped ensemble: m1 16 and m2 18,
#                  cut from 30 to fit a working session; m3 30). The limit only decides when a
#                  run stops, so these reproduce the shipped weights epoch for epoch.
#   DEMO_MIN_POSITIVES   regions with fewer calibration positives use the global thresholds
#                        (default 20)
#   FRACTURE_BIN   the binary (default: cargo build --release, then target/release/fracture)
#   RAYON_NUM_THREADS    threads (the numbers in the model card were measured with 2)
#
# The seeds are fixed and distinct from every test's: training 7001, calibration 7002,
# held-out 7003; seed 99 (the acceptance check, step 7) is used for nothing else.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${FRACTURE_CACHE:-$HOME/.cache/fracture}/target}"
out="${DEMO_OUT:-models/demo}"
work="${DEMO_WORK:-$CARGO_TARGET_DIR/demo-work}"
n_train="${DEMO_TRAIN:-1800}" n_calib="${DEMO_CALIB:-2000}" n_held="${DEMO_HELDOUT:-300}"
n_accept="${DEMO_ACCEPT:-300}" from="${DEMO_FROM:-train}"
# Any change of weights or thresholds changes the calls: a new version keeps the audit's
# per-version performance apart.
version="${DEMO_VERSION:-demo-phantoms-0.2.0}"
epochs="${DEMO_EPOCHS:-30}"
export DEMO_EPOCHS_m1_lcn_map_att="${DEMO_EPOCHS_m1_lcn_map_att:-16}"
export DEMO_EPOCHS_m2_lcn_spp="${DEMO_EPOCHS_m2_lcn_spp:-18}" patience="${DEMO_PATIENCE:-10}" batch="${DEMO_BATCH:-16}"
lr="${DEMO_LR:-2e-3}" min_pos="${DEMO_MIN_POSITIVES:-20}"
start=$(date +%s)
if [ -z "${FRACTURE_BIN:-}" ]; then
  cargo build --release --locked --bin fracture
  FRACTURE_BIN="$CARGO_TARGET_DIR/release/fracture"
fi
bin="$FRACTURE_BIN"
mkdir -p "$out" "$work"
say() { echo "train-demo: $* ($(( $(date +%s) - start )) s)"; }

# Phantoms whose labels.csv has COUNT radiographs are reused; anything else is redrawn.
phantoms() { # DIR COUNT SEED [ARGS...]
  local dir=$1 count=$2 seed=$3
  shift 3
  local have=0
  [ -f "$dir/labels.csv" ] && have=$(tail -n +2 "$dir/labels.csv" | cut -d, -f1 | sort -u | wc -l)
  if [ "$have" -ne "$count" ]; then
    rm -rf "$dir"
    "$bin" phantoms --count "$count" --seed "$seed" --out "$dir" "$@"
  fi
}
done_with() { [ "${DEMO_KEEP:-0}" = 1 ] || rm -rf "$1"; }

members=()
case "$from" in
train)
  # 1. Training phantoms: small sides keep them at about 0.8 MB each; the fracture line is then
  #    1-2 px wide, like a full-size phantom's relative to its side, so at 256 px input both look
  #    alike (a full-size phantom at 256 px: 0.5-1.5 px lines).
  phantoms "$work/train" "$n_train" 7001 --min-side 480 --max-side 832
  say "training phantoms ready"

  # 2. The members, one after another, each split the same way (--split-seed 2020).
  seed=1
  for recipe in models/demo/recipes/*.toml; do
    name=$(basename "$recipe" .toml)
    limit="DEMO_EPOCHS_${name//-/_}"
    "$bin" train --labels "$work/train/labels.csv" --images "$work/train" --member "$recipe" \
      --out "$work/ckpt/$name" --epochs "${!limit:-$epochs}" --patience "$patience" --batch "$batch" \
      --lr "$lr" --seed "$seed" --split-seed 2020 --resume
    cp "$work/ckpt/$name/$name.safetensors" "$out/"
    members+=("$work/ckpt/$name/member.toml")
    seed=$((seed + 1))
    say "trained $name"
  done
  done_with "$work/train"
  ;;
calibrate | card)
  # The shipped members: each [[members]] table of the manifest with the comment line above it
  # (how it was trained), one file each, in the manifest's order. The manifest is rewritten below.
  rm -rf "$work/members"
  mkdir -p "$work/members"
  python3 - "$out/ensemble.toml" "$work/members" <<'PY'
import sys
lines = open(sys.argv[1]).read().split("\n")
starts = [i for i, l in enumerate(lines) if l.strip() == "[[members]]"]
if not starts:
    sys.exit(f"{sys.argv[1]} has no [[members]] to keep")
starts = [i - 1 if i and lines[i - 1].startswith("# Trained by") else i for i in starts]
for k, s in enumerate(starts):
    end = starts[k + 1] if k + 1 < len(starts) else len(lines)
    block = "\n".join(lines[s:end]).strip() + "\n"
    open(f"{sys.argv[2]}/{k:02d}.toml", "w").write(block)
PY
  members=("$work/members"/*.toml)
  say "kept ${#members[@]} members of $out"
  ;;
*)
  echo "train-demo: DEMO_FROM is train, calibrate or card, not $from" >&2
  exit 2
  ;;
esac

# 3. The manifest, first with default thresholds (calibration scores with it).
write_manifest() { # CARD THRESHOLDS_FILE
  {
    echo "# The phantom-only demo ensemble, made by scripts/train-demo.sh; re-run it to reproduce."
    echo
    echo 'name = "demo"'
    echo "model_version = \"$version\""
    echo "# Synthetic data only: never trained on a radiograph of a patient."
    echo 'trained = false'
    echo 'input_size = 256'
    printf 'model_card = """\n%s\n"""\n\n' "$1"
    printf '[transform]\ncrop_threshold = 0.05\nlcn_window = 9\nlcn_sigma = 2.0\n\n'
    if [ -n "$2" ]; then
      cat "$2"
    else
      printf '[thresholds]\ndefault_score = 0.5\ndefault_map = 0.5\n'
    fi
    for m in "${members[@]}"; do
      echo
      cat "$m"
    done
  } > "$out/ensemble.toml"
}
if [ "$from" != card ]; then
  write_manifest "Being calibrated by scripts/train-demo.sh." ""

  # 4. Thresholds on held-out full-size phantoms (another seed, other patients).
  phantoms "$work/calib" "$n_calib" 7002
  "$bin" calibrate --model "$out/ensemble.toml" --images "$work/calib" \
    --labels "$work/calib/labels.csv" --min-positives "$min_pos" \
    --write-predictions "$work/calib-predictions.jsonl" --out "$work/thresholds.toml"
  done_with "$work/calib"
  say "calibrated"
  write_manifest "Being evaluated by scripts/train-demo.sh." "$work/thresholds.toml"

  # 5. Held-out evaluation through the whole pipeline (fracture scan), a third seed.
  phantoms "$work/heldout" "$n_held" 7003
  rm -rf "$work/heldout-scan"
  "$bin" scan "$work/heldout" --out "$work/heldout-scan" --model "$out/ensemble.toml" \
    --labels "$work/heldout/labels.csv"
  done_with "$work/heldout"
  # The scan keeps a de-identified copy of every input (as large as the inputs); the metrics stay.
  [ "${DEMO_KEEP:-0}" = 1 ] || rm -rf "$work/heldout-scan/dicom" "$work/heldout-scan/store"
  say "evaluated"

  # 6. The acceptance check: seed 99, used by nothing else, through the whole pipeline.
  phantoms "$work/accept" "$n_accept" 99
  rm -rf "$work/accept-scan"
  "$bin" scan "$work/accept" --out "$work/accept-scan" --model "$out/ensemble.toml" \
    --labels "$work/accept/labels.csv"
  done_with "$work/accept"
  [ "${DEMO_KEEP:-0}" = 1 ] || rm -rf "$work/accept-scan/dicom" "$work/accept-scan/store"
  say "acceptance check done"
fi

# 7. The model card, with the numbers.
# Sensitivity by region of a metrics.json, wrapped: "ankle 93.3% (14/15), ...".
by_region() { # FILE
  python3 - "$1" <<'PY'
import json, sys, textwrap
regions = json.load(open(sys.argv[1]))["regions"]
parts = []
for name, m in sorted(regions.items()):
    sens, pos = (m.get("sensitivity") or {}).get("value"), m["positives"]
    parts.append(f"{name} {sens * 100:.1f}% ({round(sens * pos)}/{pos})" if sens is not None else f"{name} n/a (0 positives)")
print(textwrap.fill(", ".join(parts) + ".", width=95))
PY
}
# One number of a metrics.json by its path (.a.b or .a.b[0]): a percentage, a plain number, or
# the count of true positives (sensitivity times positives).
metric() { # FILE PATH pct|num|tp
  python3 - "$1" "$2" "$3" <<'PY'
import json, re, sys
v = json.load(open(sys.argv[1]))
for key, index in re.findall(r"\.(\w+)(?:\[(\d+)\])?", sys.argv[2]):
    v = v.get(key) if isinstance(v, dict) else None
    if index and isinstance(v, list):
        v = v[int(index)]
if sys.argv[3] == "tp" and isinstance(v, dict):
    sens = (v.get("sensitivity") or {}).get("value")
    v = round(sens * v["positives"]) if isinstance(sens, (int, float)) else None
if not isinstance(v, (int, float)):
    print("undefined")
elif sys.argv[3] == "pct":
    print(f"{v * 100:.1f}%")
elif sys.argv[3] in ("tp", "int"):
    print(int(v))
else:
    print(f"{v:.3f}")
PY
}
held="$work/heldout-scan/metrics.json" accept="$work/accept-scan/metrics.json"
member_lines=$(for m in "${members[@]}"; do
  echo "  - $(grep -m1 '^name' "$m" | cut -d'"' -f2): $(head -n 1 "$m" | sed 's/^# Trained by `fracture train` //')"
done)
member_names=$(for m in "${members[@]}"; do grep -m1 '^name' "$m" | cut -d'"' -f2; done | paste -sd, - | sed 's/,/, /g')
own=$(python3 -c 'import sys, tomllib; print(len(tomllib.load(open(sys.argv[1], "rb"))["thresholds"]["score"]))' "$work/thresholds.toml")
if [ "$own" = 13 ]; then own_regions="all 13 regions have their own"; else own_regions="$own of the 13 regions have their own"; fi
calib_lines=$(grep '^#' "$work/thresholds.toml" | sed 's/^#/   /')
card="**NOT FOR CLINICAL USE. THIS ENSEMBLE HAS NEVER SEEN A REAL FRACTURE OR A REAL RADIOGRAPH:
IT WAS TRAINED ONLY ON SYNTHETIC PHANTOMS. ITS SCORES, CALLS AND BOXES SAY NOTHING ABOUT A
PATIENT; NEVER SHOW ITS OUTPUT TO A CLINICIAN OR USE IT FOR ANY DECISION ABOUT A PATIENT.**

Purpose: shows what the training machinery (fracture train, fracture calibrate) makes of
synthetic phantoms on two CPU cores, for pipeline demos and tests on phantoms; the numbers
below say how well it does on held-out phantoms.

Members ($member_names): Dilated Residual Networks at 256 x 256 input, narrow channels
(8, 8, 16, 16, 32, 32, 32, 32), varying as the paper's do (raw / LCN / both inputs, with and
without a map head, attention, spatial pyramid pooling).

Training data: $n_train synthetic phantoms (fracture-phantoms seed 7001, 480-832 px a side,
about a third fractured, 13 regions), split 80/10/10 by patient (split seed 2020). Recipe: the
paper's (joint map and image loss 3:1, 10:1 with attention; Adam without weight decay, here
lr $lr, batch $batch; rotation, flips, gamma, contrast, translation and zoom; balanced
(region, fracture) sampling for 10 epochs; early stopping on tuning AUC, patience $patience), from
random initialisation, on the CPU. The epoch limit was the paper's 30 for m3 and was cut to
16 (m1) and 18 (m2) to fit a working session; scripts/train-demo.sh uses the same limits.
m2, the member without a map head, learns slowly from image labels alone (tuning AUC about
0.7 after 18 epochs): the map heads' dense supervision is what makes m1 and m3 learn.
$member_lines

Thresholds, the paper's rule: per region, the score threshold that keeps 92.5% sensitivity and
the map threshold that best recovers the fracture boxes, calibrated on $n_calib full-size
phantoms (seed 7002). A region with fewer than $min_pos positives keeps the global thresholds
(all regions pooled); $own_regions (rows marked own):
$calib_lines

Held-out evaluation ($n_held full-size phantoms, seed 7003, through fracture scan):
AUC $(metric "$held" .overall.auc.value num) (95% CI $(metric "$held" '.overall.auc.ci[0]' num)-$(metric "$held" '.overall.auc.ci[1]' num)),
sensitivity $(metric "$held" .overall.sensitivity.value pct), specificity $(metric "$held" .overall.specificity.value pct),
PPV $(metric "$held" .overall.ppv.value pct), NPV $(metric "$held" .overall.npv.value pct).
Sensitivity by region, each at its own thresholds:
$(by_region "$held")

Acceptance check ($n_accept full-size phantoms from seed 99, never used for training or
calibration: fracture phantoms --count $n_accept --seed 99, then fracture scan --labels): AUC
$(metric "$accept" .overall.auc.value num) (95% CI $(metric "$accept" '.overall.auc.ci[0]' num)-$(metric "$accept" '.overall.auc.ci[1]' num)), sensitivity $(metric "$accept" .overall.sensitivity.value pct) ($(metric "$accept" .overall tp) of $(metric "$accept" .overall.positives int); 95% CI
$(metric "$accept" '.overall.sensitivity.ci[0]' pct)-$(metric "$accept" '.overall.sensitivity.ci[1]' pct)), specificity $(metric "$accept" .overall.specificity.value pct), PPV $(metric "$accept" .overall.ppv.value pct), NPV $(metric "$accept" .overall.npv.value pct).

Not known: how it behaves on anything but these phantoms. Real radiographs differ from them in
every way that matters."
write_manifest "$card" "$work/thresholds.toml"
say "wrote $out/ensemble.toml ($(du -sh "$out" | cut -f1)); took $(( $(date +%s) - start )) s"
