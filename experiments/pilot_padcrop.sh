#!/usr/bin/env bash
# The PILOT protocol (RESULTS.md section 1) with PILOT's pad-crop augmentation, reduced budget (CPU):
# backbone MAE 60 epochs, linear probes, then LoRA vs LoRA + TPP (skipped with the argument `probe`).
# Results in RESULTS.md section 1.
set -euo pipefail
cd "$(dirname "$0")/.."
TPP=${TPP:-./target/release/tpp}
OUT=runs/pilot_padcrop
[ -f $OUT/backbone/config.json ] || $TPP pretrain-backbone --patch-size 4 --embed-dim 192 --depth 6 --heads 3 \
  --data data/pneumoniamnist.npz --norm half --batch-size 256 --epochs 60 --lr 1.5e-3 --pad-crop 2 \
  --decoder-dim 128 --decoder-depth 2 --decoder-heads 4 --out $OUT/backbone
for seed in 0 1 2; do
  [ -f $OUT/linear/seed$seed/metrics.json ] || $TPP finetune --backbone $OUT/backbone/backbone.safetensors \
    --data data/breastmnist.npz --norm half --peft linear --epochs 50 --batch-size 64 --lr 1e-3 \
    --weight-decay 0.05 --pad-crop 2 --seed $seed --out $OUT/linear/seed$seed
done
[ "${1:-}" = probe ] && exit 0
$TPP compare --config experiments/pilot_padcrop.toml --out $OUT/compare
