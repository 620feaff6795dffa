#!/usr/bin/env bash
# The PILOT protocol (RESULTS.md section 1) at a reduced budget on CPU; results in RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
TPP=./target/release/tpp
[ -f runs/pilot/backbone/config.json ] || $TPP pretrain-backbone --patch-size 4 --embed-dim 192 --depth 6 --heads 3 \
  --data data/pneumoniamnist.npz --norm half --batch-size 256 --epochs 60 --lr 1.5e-3 \
  --decoder-dim 128 --decoder-depth 2 --decoder-heads 4 --out runs/pilot/backbone
$TPP compare --config experiments/pilot_breastmnist.toml --out runs/pilot/compare
