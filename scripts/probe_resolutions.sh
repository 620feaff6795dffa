#!/usr/bin/env bash
# Issue 16 part 4: linear probes of the real ViT-S/14 at 28, 56, 112 and 224 px on BreastMNIST and
# PneumoniaMNIST (5 seeds each; MedMNIST's 28 px images upsampled), next to MedMNIST+'s published probes.
# TPP=path/to/tpp overrides the binary; TPP_FLAGS adds global flags (e.g. "--threads 1").
set -euo pipefail
tpp=${TPP:-target/release/tpp}
for d in breastmnist pneumoniamnist; do
  for s in 28 56 112 224; do
    "$tpp" ${TPP_FLAGS:-} compare --config experiments/probe_medmnist.toml --data "data/$d.npz" --img-size "$s" \
      --out "runs/probe_${d}_$s" > "runs/probe_${d}_$s.md"
  done
done
grep -H "^| linear" runs/probe_*_*.md
