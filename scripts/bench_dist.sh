#!/usr/bin/env bash
# Data-parallel speed on CPU: one process with N threads against N gloo processes with one thread each
# (torchrun), for LoRA fine-tuning and the TPP-MAE stage, same global batch and seed. Prints wall time
# and training images/s (mean over epochs after the first; an epoch's time includes its validation).
# Usage: scripts/bench_dist.sh BACKBONE.safetensors [DATA] [N]   (DATA default data/pneumoniamnist.npz)
set -euo pipefail
cd "$(dirname "$0")/.."
BB=${1:?usage: scripts/bench_dist.sh BACKBONE.safetensors [DATA] [N]}
DATA=${2:-data/pneumoniamnist.npz}
N=${3:-2}
TPP=target/release/tpp
TORCHRUN=.venv/bin/torchrun
OUT=$(mktemp -d)
COMMON=(--backbone "$BB" --img-size 56 --data "$DATA" --batch-size 64 --seed 0)
FT=(finetune "${COMMON[@]}" --peft lora --train-fraction 0.5 --epochs 3)
MAE=(pretrain-targets "${COMMON[@]}" --peft lora --pretext mae --epochs 3)
# images/s of epochs 2.. from a CSV column (metrics.csv: per epoch; loss.csv: per step, same per epoch).
rate() { python3 - "$1" "$2" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
by_epoch = {}
for r in rows:
    by_epoch[r.get("epoch")] = float(r[sys.argv[2]])
v = list(by_epoch.values())[1:] or list(by_epoch.values())
print(f"{sum(v) / len(v):.1f}")
PY
}
run() { # label, csv name, command...
  local label=$1 csv=$2; shift 2
  local t0=$(date +%s.%N)
  "$@" > "$OUT/log" 2>&1 || { cat "$OUT/log"; exit 1; }
  local t1=$(date +%s.%N)
  local dir; dir=$(ls -d "$OUT"/r* | tail -1)
  printf '%-44s wall %6.1f s   %s img/s\n' "$label" "$(echo "$t1 - $t0" | bc)" "$(rate "$dir/$csv" images_per_s)"
}
k=0
for what in FT MAE; do
  declare -n ARGS=$what
  csv=metrics.csv; [ $what = MAE ] && csv=loss.csv
  k=$((k + 1)); run "$what: 1 process x $N threads" $csv $TPP --threads "$N" "${ARGS[@]}" --out "$OUT/r$k-1"
  k=$((k + 1)); run "$what: $N processes x 1 thread (gloo)" $csv \
    $TORCHRUN --no-python --nproc-per-node "$N" --master-port $((29500 + RANDOM % 1000)) \
    $TPP --threads 1 "${ARGS[@]}" --out "$OUT/r$k-2"
done
rm -rf "$OUT"
