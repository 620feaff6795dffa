#!/usr/bin/env bash
# End-to-end race on this machine: the PILOT protocol (RESULTS.md section 1) as a plain PyTorch + timm
# script and in tpp, one after the other, same budget; prints both wall times and their ratio.
#   scripts/bench_e2e.sh [SCALE=0.05] [SEEDS=1]
# SCALE multiplies PILOT's epochs (MAE 200, TPP 300, fine-tuning 100; at least 1 each). tpp runs
# `pretrain-backbone` with PILOT's settings, then `compare` (LoRA vs LoRA + TPP, linear and full references),
# from a fresh data cache. PEER (default scripts/pilot_peer.py) and PEER_ARGS choose the script to race.
# CPU_BF16=1 runs tpp's stages with bf16 autocast on the CPU (`--cpu-bf16`; CPUs with AVX512-BF16 or AMX);
# TPP_ONLY=1 skips the script (tpp's times only).
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-0.05}
SEEDS=${2:-1}
PEER=${PEER:-scripts/pilot_peer.py}
PEER_ARGS=${PEER_ARGS:---scale $SCALE --seeds $SEEDS}
TPP=${TPP:-target/release/tpp}
PY=${PY:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
BF16_FLAG=()
BF16_TOML="cpu_bf16 = false"
if [ "${CPU_BF16:-0}" = 1 ]; then BF16_FLAG=(--cpu-bf16); BF16_TOML="cpu_bf16 = true"; fi
epochs() { python3 -c "print(max(1, int($1 * $SCALE)))"; }
E_SRC=$(epochs 200)
E_TPP=$(epochs 300)
E_FT=$(epochs 100)
SEED_LIST=$(python3 -c "print(list(range($SEEDS)))")
cat > "$OUT/compare.toml" <<EOF
backbone = "$OUT/backbone/backbone.safetensors"
data = "data/breastmnist.npz"
norm = "half"
methods = ["lora"]
pretext = "mae"
seeds = $SEED_LIST
references = ["linear", "full"]
[peft]
lora_rank = 8
lora_alpha = 16.0
lora_targets = ["qkv"]
[tpp]
epochs = $E_TPP
batch_size = 256
lr = 1.5e-3
decoder = "fresh"
decoder_dim = 128
decoder_depth = 2
decoder_heads = 4
pad_crop = 2
$BF16_TOML
[finetune]
epochs = $E_FT
batch_size = 64
lr = 1e-3
full_lr = 1e-4
pad_crop = 2
$BF16_TOML
EOF
now() { date +%s.%N; }
echo "budget: MAE $E_SRC, TPP $E_TPP, fine-tuning $E_FT epochs; seeds $SEED_LIST; $(nproc) cores"
t0=$(now)
if [ "${TPP_ONLY:-0}" != 1 ]; then
  # shellcheck disable=SC2086
  "$PY" "$PEER" data $PEER_ARGS > "$OUT/peer.log" 2>&1 || { cat "$OUT/peer.log"; exit 1; }
else
  : > "$OUT/peer.log"
fi
t1=$(now)
export TPP_CACHE_DIR="$OUT/cache"
"$TPP" -q pretrain-backbone --patch-size 4 --embed-dim 192 --depth 6 --heads 3 --data data/pneumoniamnist.npz \
  --norm half --batch-size 256 --epochs "$E_SRC" --lr 1.5e-3 --pad-crop 2 --decoder-dim 128 --decoder-depth 2 \
  --decoder-heads 4 "${BF16_FLAG[@]}" --out "$OUT/backbone"
t2=$(now)
"$TPP" -q compare --config "$OUT/compare.toml" --out "$OUT/compare" > "$OUT/tpp.log" 2>&1 || { cat "$OUT/tpp.log"; exit 1; }
t3=$(now)
grep -E "^seed|^backbone" "$OUT/peer.log" || true
grep -E "^\| (lora|linear|full)" "$OUT/compare/report.md" | cut -d'|' -f2,4,6,7 || true
python3 - "$t0" "$t1" "$t2" "$t3" <<'PY'
import sys
t0, t1, t2, t3 = map(float, sys.argv[1:])
peer, tpp = t1 - t0, t3 - t1
print(f"peer (PyTorch script): {peer:.1f} s")
print(f"tpp: {tpp:.1f} s (backbone {t2 - t1:.1f} s, compare {t3 - t2:.1f} s)")
if peer > 1:
    print(f"tpp speed-up: {peer / tpp:.2f}x")
PY
