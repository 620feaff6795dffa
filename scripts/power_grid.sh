#!/usr/bin/env bash
# Issue 16 part 4 for one PEFT method (lora, adaptformer): DINO-TPP (fixed recipe) and MAE-TPP (budget picked
# on validation), 5 seeds, one seed at a time, from experiments/<NAME>_<method>_{dino,mae}.toml into
# runs/<OUT>_<method>_{dino,mae} (NAME defaults to power_breastmnist, OUT to power_breast). Each seed's plain
# run is made once (by the DINO grid) and copied into the MAE grid, whose compare checks that its record is the
# one asked for. TPP=path/to/tpp overrides the binary.
set -euo pipefail
m=${1:?usage: $0 lora|adaptformer [NAME [OUT]]}
name=${2:-power_breastmnist}
prefix=${3:-power_breast}
tpp=${TPP:-target/release/tpp}
dino=runs/${prefix}_${m}_dino
mae=runs/${prefix}_${m}_mae
for k in 0 1 2 3 4; do
  "$tpp" compare --config "experiments/${name}_${m}_dino.toml" --out "$dino" --cell "$k"
  if [ ! -e "$mae/runs/$m/seed$k" ]; then
    mkdir -p "$mae/runs/$m"
    cp -r "$dino/runs/$m/seed$k" "$mae/runs/$m/seed$k"
  fi
  "$tpp" compare --config "experiments/${name}_${m}_mae.toml" --out "$mae" --cell "$k"
done
# The linear probes (cells 5-9 of the DINO grid; seconds each) complete it and write its report.
for k in 5 6 7 8 9; do
  "$tpp" compare --config "experiments/${name}_${m}_dino.toml" --out "$dino" --cell "$k"
done
