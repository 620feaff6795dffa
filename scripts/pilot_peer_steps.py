#!/usr/bin/env python3
"""Per-phase times of the end-to-end peer's MAE step (scripts/pilot_peer.py's `mae_loss` on PneumoniaMNIST,
batch 256, 2 epochs): augmentation, forward, backward (with zero_grad), clipping + AdamW, in ms per step
(the first 2 steps left out), to set beside `tpp --profile pretrain-backbone ...` (BENCHMARKS.md).

    python scripts/pilot_peer_steps.py [DATA_DIR=data] [--bf16]

--bf16 runs the forward under torch.autocast("cpu", bfloat16), as a script would.
"""
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pilot_peer as P  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
bf16 = "--bf16" in sys.argv
src = P.splits(os.path.join(args[0] if args else "data", "pneumoniamnist.npz"))
torch.manual_seed(0)
np.random.seed(0)
bb, dec = P.new_vit(), P.Decoder()
xs = src["train"][0]
params = list(bb.parameters()) + list(dec.parameters())
opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.05)
T = dict(augment=0.0, forward=0.0, backward=0.0, optimizer=0.0)
n = 0
for ep in range(2):
    for idx in torch.randperm(len(xs)).split(256):
        t0 = time.perf_counter()
        x = P.augment(xs[idx])
        t1 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = P.mae_loss(bb, dec, x).float()
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t4 = time.perf_counter()
        if n >= 2:
            for k, d in zip(T, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                T[k] += d
        n += 1
print({k: round(v / (n - 2) * 1e3, 1) for k, v in T.items()}, f"ms per step over {n - 2} steps; threads",
      torch.get_num_threads(), "bf16" if bf16 else "fp32")
