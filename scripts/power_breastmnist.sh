#!/usr/bin/env bash
# Issue 16 part 4, BreastMNIST with LoRA: DINO-TPP (fixed) and MAE-TPP (budget picked on validation), 5 seeds,
# one seed at a time; the plain-LoRA run of each seed is made once (by the DINO grid) and copied into the MAE
# grid, whose compare checks that its record is the one asked for. TPP=path/to/tpp overrides the binary.
set -euo pipefail
tpp=${TPP:-target/release/tpp}
dino=runs/power_breast_lora_dino
mae=runs/power_breast_lora_mae
for k in 0 1 2 3 4; do
  "$tpp" compare --config experiments/power_breastmnist_lora_dino.toml --out "$dino" --cell "$k"
  if [ ! -e "$mae/runs/lora/seed$k" ]; then
    mkdir -p "$mae/runs/lora"
    cp -r "$dino/runs/lora/seed$k" "$mae/runs/lora/seed$k"
  fi
  "$tpp" compare --config experiments/power_breastmnist_lora_mae.toml --out "$mae" --cell "$k"
done
# The linear probes (cells 5-9 of the DINO grid; seconds each) complete it and write its report.
for k in 5 6 7 8 9; do
  "$tpp" compare --config experiments/power_breastmnist_lora_dino.toml --out "$dino" --cell "$k"
done
