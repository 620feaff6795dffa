#!/usr/bin/env bash
# Run on a device machine (see scripts/device_prepare.sh): one call, every GPU number issue 17 asks for.
# 1. the card and versions; 2. tpp bench vs the PyTorch/timm peer, same work, same batch, same card
# (ViT-B/16 224, batch 128, bf16); 3. the whole pipeline on CUDA (demo --quick: MAE pre-training, TPP,
# fine-tuning, evaluation with bf16 autocast; a DINO-TPP compare; a native-resolution segmentation
# fine-tune); 4. data-parallel fine-tuning on NCCL. Everything lands in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3
[ -x $PY ] || PY=python3
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  $PY -c 'import torch, timm; print("torch", torch.__version__, "cuda", torch.version.cuda, "timm", timm.__version__)'
  ldd device/tpp | grep -E 'torch|c10' || true
} 2>&1 | tee "$OUT/card.txt"
STEPS=${STEPS:-20}
# Peer first, then tpp, then the peer again: a drift between the two peer runs (clocks, heat) shows.
for run in peer1 tpp peer2; do
  case $run in
    tpp) timeout 240 device/tpp bench --device cuda --model vit_base_patch16_224 --batch 128 --steps "$STEPS" ;;
    *) timeout 150 $PY device/torch_peer.py --model vit_base_patch16_224 --batch 128 --dtype bf16 --steps "$STEPS" ;;
  esac 2>&1 | tee "$OUT/bench_$run.txt"
done
# Where a LoRA and a TPP-MAE step spend their time on the card: libtorch's trace (CPU operators and CUDA
# kernels), summed per operator (the trace itself stays on the machine: tens of MB).
for w in lora_ft tpp_mae; do
  timeout 90 device/tpp --device cuda --profile-trace /tmp/trace_$w.json bench --model vit_base_patch16_224 \
    --batch 128 --steps 3 --work $w > /dev/null 2>&1 && \
    $PY scripts/trace_summary.py /tmp/trace_$w.json --top 40 > "$OUT/trace_$w.txt" 2>&1
done
timeout 150 device/tpp --device cuda demo --from-scratch --quick --out /tmp/demo_cuda 2>&1 | tail -40 | tee "$OUT/demo_quick.txt"
cp /tmp/demo_cuda/compare/report.md "$OUT/demo_report.md" 2>/dev/null || true
timeout 90 device/tpp --device cuda compare --config scripts/device_compare.toml --out /tmp/dino_cuda 2>&1 |
  grep -v 'img/s' | tail -20 | tee "$OUT/compare_dino.txt"
cp /tmp/dino_cuda/report.md "$OUT/compare_dino_report.md" 2>/dev/null || true
timeout 60 device/tpp --device cuda finetune --backbone tests/fixtures/timm_vit_avg_fcnorm.safetensors --heads 3 \
  --img-size 32 --data device/seg --norm half --peft lora --epochs 2 --batch-size 16 --seg-head unetr \
  --seg-native --seg-crops-per-image 2 --out /tmp/seg_cuda 2>&1 | grep -v 'img/s' | tail -5 | tee "$OUT/seg.txt"
cp /tmp/seg_cuda/metrics.json "$OUT/seg.metrics.json" 2>/dev/null || true
# 4. Data-parallel fine-tuning on NCCL under torchrun: world size 1, and every GPU of the machine.
TORCHRUN=/opt/torch/.venv/bin/torchrun
[ -x $TORCHRUN ] || TORCHRUN=torchrun
NGPU=$(nvidia-smi --list-gpus | wc -l)
for n in 1 $NGPU; do
  timeout 120 $TORCHRUN --no-python --nproc-per-node "$n" device/tpp --device cuda finetune \
    --backbone tests/fixtures/timm_vit_avg_fcnorm.safetensors --heads 3 --img-size 32 --data data/breastmnist.npz \
    --norm half --peft lora --epochs 2 --batch-size 64 --out /tmp/ddp_$n 2>&1 | tail -5 | tee "$OUT/ddp_nccl_$n.txt"
  cp /tmp/ddp_$n/metrics.json "$OUT/ddp_nccl_$n.metrics.json" 2>/dev/null || true
  [ "$NGPU" = 1 ] && break
done
