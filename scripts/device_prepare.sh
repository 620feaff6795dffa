#!/usr/bin/env bash
# Run here (no GPU) before a device session: builds tpp with the device's libtorch on its rpath and puts
# the binary and the PyTorch peer into device/ (ignored by git), which the device call carries.
# Then: run(command="bash scripts/device_check.sh", carry=["device"], timeout_s=540).
set -euo pipefail
cd "$(dirname "$0")/.."
source env.sh
# NCCL process groups need the CUDA headers the torch wheel lacks (crt/, cccl): PyPI cuda-toolkit.
[ -d .venv/cuda-headers/nvidia/cu13/include/crt ] ||
  .venv/bin/pip install --quiet --target .venv/cuda-headers "cuda-toolkit[cccl,crt]==13.0.2"
export TPP_CUDA_INCLUDE=$PWD/.venv/cuda-headers/nvidia/cu13/include
TPP_LIBTORCH_RPATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib cargo build --release
nm -C target/release/tpp | grep -q 'c10d::ProcessGroupNCCL::ProcessGroupNCCL' || { echo "built without NCCL" >&2; exit 1; }
mkdir -p device
install -m 755 target/release/tpp device/tpp
install -m 644 scripts/torch_peer.py device/torch_peer.py
# A synthetic fine-structure segmentation set for the check's segmentation fine-tune (no data set travels).
[ -d device/seg ] || .venv/bin/python scripts/make_seg_lines.py device/seg
ls -la device
