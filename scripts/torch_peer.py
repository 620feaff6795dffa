#!/usr/bin/env python3
"""The PyTorch peer of `tpp bench`: the same three training steps written the way a user of timm would
write them, timed the same way, so the two can be compared on one machine.

    python scripts/torch_peer.py [--model vit_base_patch16_224] [--batch 128] [--dtype bf16|fp32]
                                 [--steps 20] [--work lora_ft,tpp_mae,full_ft]

Work (as in src/bench.rs): random-weight timm ViT, random images at the model's size, 10 classes, AdamW
lr 1e-4 weight decay 0.05.
  lora_ft  LoRA r 8, alpha 16 on every block's qkv; backbone frozen; LoRA factors and the head trained.
  tpp_mae  the TPP stage with MAE: 75% of the patches hidden, the visible 25% (and the class token) through
           the frozen encoder with LoRA, an 8-block 512-wide decoder (16 heads), loss on the normalised
           pixels of the hidden patches; LoRA factors and decoder trained.
  full_ft  every parameter trained.
bf16 autocast on CUDA when --dtype bf16 (fp32 on CPU). Each work: 3 warm-up steps, then --steps timed
steps (synchronised on CUDA); the median is reported with the peak CUDA memory, one `RESULT {json}` line per
work. Needs torch and timm.
"""
import argparse
import json
import math
import time

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

RANK, ALPHA = 8, 16.0


class Lora(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (HF PEFT's initialisation: A Kaiming, B zero)."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.a = nn.Parameter(torch.empty(RANK, base.in_features))
        self.b = nn.Parameter(torch.zeros(base.out_features, RANK))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * (ALPHA / RANK)


def vit(name, device, lora, trainable_backbone):
    m = timm.create_model(name, pretrained=False, num_classes=10)
    m.requires_grad_(trainable_backbone)
    if lora:
        for blk in m.blocks:
            blk.attn.qkv = Lora(blk.attn.qkv)
    m.head.requires_grad_(True)
    return m.to(device).train()


class Decoder(nn.Module):
    """MAE's decoder: visible tokens projected, mask tokens put back in place, blocks, pixel prediction."""

    def __init__(self, width, patches, patch, chans, dim=512, depth=8, heads=16):
        super().__init__()
        self.proj = nn.Linear(width, dim)
        self.mask = nn.Parameter(torch.zeros(1, 1, dim))
        # Fixed positions (MAE uses sin-cos ones; their values do not change the cost).
        self.register_buffer("pos", torch.zeros(1, patches + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch * patch * chans)

    def forward(self, tokens, restore):
        x = self.proj(tokens)
        b, _, d = x.shape
        hidden = self.mask.expand(b, restore.shape[1] - (x.shape[1] - 1), d)
        patches = torch.cat([x[:, 1:], hidden], dim=1).gather(1, restore[..., None].expand(-1, -1, d))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x)[:, 1:])


def mae_loss(enc, dec, imgs, ratio=0.75):
    b, c = imgs.shape[:2]
    p = enc.patch_embed.patch_size[0]
    x = enc.patch_embed(imgs) + enc.pos_embed[:, 1:]
    n = x.shape[1]
    keep = int(n * (1 - ratio))
    order = torch.rand(b, n, device=imgs.device).argsort(dim=1)
    restore = order.argsort(dim=1)
    x = x.gather(1, order[:, :keep, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1), x], dim=1)
    pred = dec(enc.norm(enc.blocks(x)), restore)
    target = imgs.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 4, 5, 1).reshape(b, n, p * p * c)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    hidden = torch.ones(b, n, device=imgs.device)
    hidden[:, :keep] = 0
    hidden = hidden.gather(1, restore)
    return (((pred - target) ** 2).mean(-1) * hidden).sum() / hidden.sum()


def timed(args, device, params, loss_fn):
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    cast = device.type == "cuda" and args.dtype == "bf16"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.steps + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cast):
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return med, peak, sum(p.numel() for p in params)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--work", default="lora_ft,tpp_mae,full_ft")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"torch {torch.__version__} timm {timm.__version__} device {name}", flush=True)
    torch.manual_seed(0)
    probe = timm.create_model(args.model, pretrained=False)
    size = probe.patch_embed.img_size[0]
    imgs = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    for work in args.work.split(","):
        if work == "tpp_mae":
            enc = vit(args.model, device, lora=True, trainable_backbone=False)
            enc.head.requires_grad_(False)
            pe = enc.patch_embed
            dec = Decoder(enc.embed_dim, pe.num_patches, pe.patch_size[0], 3).to(device).train()
            params = list(enc.parameters()) + list(dec.parameters())
            result = timed(args, device, params, lambda: mae_loss(enc, dec, imgs))
            del enc, dec
        elif work in ("lora_ft", "full_ft"):
            m = vit(args.model, device, lora=work == "lora_ft", trainable_backbone=work == "full_ft")
            result = timed(args, device, m.parameters(), lambda: F.cross_entropy(m(imgs), labels))
            del m
        else:
            ap.error(f"--work: unknown '{work}' (expected lora_ft, tpp_mae, full_ft)")
        med, peak, trainable = result
        print("RESULT " + json.dumps({
            "work": work, "model": args.model, "batch": args.batch, "dtype": args.dtype,
            "step_ms": round(med * 1e3, 2), "img_per_s": round(args.batch / med, 1),
            "peak_gib": round(peak, 2), "trainable": trainable}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
