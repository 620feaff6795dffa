#!/usr/bin/env python3
"""The end-to-end peer of tpp: the PILOT protocol (RESULTS.md section 1) as the plain PyTorch + timm script
a user would write, for `scripts/bench_e2e.sh` to race against the same protocol in tpp.

    python scripts/pilot_peer.py DATA_DIR [--scale 1.0] [--seeds 3]

DATA_DIR holds pneumoniamnist.npz and breastmnist.npz (MedMNIST v2, 28 px). At --scale 1: MAE pre-training
of a ViT (patch 4, width 192, depth 6, 3 heads, class-token pooling) on PneumoniaMNIST for 200 epochs
(batch 256, mask 0.75, norm-pix loss, a 2 x 128 decoder with 4 heads); then on BreastMNIST, per seed:
linear probe, LoRA (r 8, alpha 16 on qkv), LoRA + TPP (LoRA and a fresh decoder MAE-trained on the
BreastMNIST training images for 300 epochs, batch 256, the backbone frozen) and full fine-tuning, each
fine-tuned 100 epochs (batch 64, lr 1e-3, full 1e-4). Epochs scale with --scale (at least 1). Pixels in
[-1, 1]; augmentation: horizontal flip, reflect-pad 2 and one random 28 x 28 crop offset per batch. AdamW
(betas 0.9, 0.95; weight decay 0.05), 5% linear warm-up then cosine per step, gradient-norm clip 1.0. The
model with the best validation AUC is kept and scored once on the test split. Prints a line per run and
`RESULT {json}` at the end. Needs numpy, torch, timm.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer

WIDTH, DEPTH, HEADS, PATCH, SIZE = 192, 6, 3, 4, 28
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def splits(path):
    z = np.load(path)
    out = {}
    for s in ("train", "val", "test"):
        x = torch.from_numpy(z[f"{s}_images"]).float().div(127.5).sub(1.0).unsqueeze(1)
        out[s] = (x.to(DEVICE), torch.from_numpy(z[f"{s}_labels"]).long().flatten().to(DEVICE))
    return out


def augment(x):
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    x = torch.where(flip, x.flip(3), x)
    dy, dx = np.random.randint(0, 5, size=2)
    return F.pad(x, (2, 2, 2, 2), mode="reflect")[:, :, dy:dy + SIZE, dx:dx + SIZE]


def new_vit():
    return VisionTransformer(img_size=SIZE, patch_size=PATCH, in_chans=1, embed_dim=WIDTH, depth=DEPTH,
                             num_heads=HEADS, num_classes=2, global_pool="token").to(DEVICE)


class LoraQkv(nn.Module):
    def __init__(self, base, rank=8, alpha=16.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.a = nn.Parameter(torch.empty(rank, base.in_features, device=DEVICE))
        self.b = nn.Parameter(torch.zeros(base.out_features, rank, device=DEVICE))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(x, self.a), self.b) * self.scale


class Decoder(nn.Module):
    def __init__(self, dim=128, depth=2, heads=4):
        super().__init__()
        n = (SIZE // PATCH) ** 2
        self.proj = nn.Linear(WIDTH, dim)
        self.mask = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, PATCH * PATCH)

    def forward(self, tokens, restore):
        x = self.proj(tokens)
        b, visible, d = x.shape
        hidden = self.mask.expand(b, restore.shape[1] + 1 - visible, d)
        patches = torch.cat([x[:, 1:], hidden], 1).gather(1, restore[..., None].expand(-1, -1, d))
        x = self.blocks(torch.cat([x[:, :1], patches], 1) + self.pos)
        return self.out(self.norm(x)[:, 1:])


def mae_loss(vit, dec, imgs, ratio=0.75):
    b = imgs.shape[0]
    x = vit.patch_embed(imgs) + vit.pos_embed[:, 1:]
    n = x.shape[1]
    keep = int(n * (1 - ratio))
    order = torch.rand(b, n, device=imgs.device).argsort(1)
    restore = order.argsort(1)
    x = x.gather(1, order[:, :keep, None].expand(-1, -1, WIDTH))
    x = torch.cat([(vit.cls_token + vit.pos_embed[:, :1]).expand(b, -1, -1), x], 1)
    pred = dec(vit.norm(vit.blocks(x)), restore)
    target = imgs.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).reshape(b, n, PATCH * PATCH)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    hidden = torch.ones(b, n, device=imgs.device)
    hidden[:, :keep] = 0
    hidden = hidden.gather(1, restore)
    return (((pred - target) ** 2).mean(-1) * hidden).sum() / hidden.sum()


def auc(p, y):
    p, y = p.cpu().numpy(), y.cpu().numpy()
    pos, neg = p[y == 1], p[y == 0]
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


@torch.no_grad()
def scores(model, split):
    model.eval()
    x, y = split
    p = torch.softmax(model(x), -1)[:, 1]
    model.train()
    return auc(p, y), float(((p > 0.5).long() == y).float().mean())


def train(params, epochs, n, batch, lr, loss_of, after_epoch=None):
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    total = epochs * math.ceil(n / batch)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / total)))
    loss = None
    for _ in range(epochs):
        for idx in torch.randperm(n, device=DEVICE).split(batch):
            loss = loss_of(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        if after_epoch:
            after_epoch()
    return float(loss)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir")
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    e_src, e_tpp, e_ft = (max(1, int(e * a.scale)) for e in (200, 300, 100))
    t0 = time.time()
    src = splits(os.path.join(a.data_dir, "pneumoniamnist.npz"))
    tgt = splits(os.path.join(a.data_dir, "breastmnist.npz"))
    torch.manual_seed(0)
    np.random.seed(0)
    backbone, dec = new_vit(), Decoder().to(DEVICE)
    xs = src["train"][0]
    loss = train(list(backbone.parameters()) + list(dec.parameters()), e_src, len(xs), 256, 1.5e-3,
                 lambda idx: mae_loss(backbone, dec, augment(xs[idx])))
    print(f"backbone: MAE {e_src} epochs, loss {loss:.3f} ({time.time() - t0:.0f} s)", flush=True)
    weights = {k: v.clone() for k, v in backbone.state_dict().items()}
    xt, yt = tgt["train"]
    results = {}
    for seed in range(a.seeds):
        for variant in ("linear", "lora", "lora+tpp", "full"):
            torch.manual_seed(seed)
            np.random.seed(seed)
            m = new_vit()
            m.load_state_dict(weights)
            m.head.reset_parameters()
            m.requires_grad_(variant == "full")
            lora = []
            if variant.startswith("lora"):
                for blk in m.blocks:
                    blk.attn.qkv = LoraQkv(blk.attn.qkv)
                    lora += [blk.attn.qkv.a, blk.attn.qkv.b]
            if variant == "lora+tpp":
                d = Decoder().to(DEVICE)
                train(lora + list(d.parameters()), e_tpp, len(xt), 256, 1.5e-3,
                      lambda idx: mae_loss(m, d, augment(xt[idx])))
            m.head.requires_grad_(True)
            best = {"val_auc": -1.0}

            def keep_best():
                v = scores(m, tgt["val"])[0]
                if v > best["val_auc"]:
                    best.update(val_auc=v, state={k: t.clone() for k, t in m.state_dict().items()})

            train(list(m.parameters()), e_ft, len(xt), 64, 1e-4 if variant == "full" else 1e-3,
                  lambda idx: F.cross_entropy(m(augment(xt[idx])), yt[idx]), keep_best)
            m.load_state_dict(best.pop("state"))
            best["test_auc"], best["test_acc"] = scores(m, tgt["test"])
            results.setdefault(variant, []).append(best)
            print(f"seed {seed} {variant:9s} val_auc {best['val_auc']:.3f} test_auc {best['test_auc']:.3f} "
                  f"test_acc {best['test_acc']:.3f} ({time.time() - t0:.0f} s)", flush=True)
    print("RESULT " + json.dumps({"seconds": round(time.time() - t0, 1), "results": results}))


if __name__ == "__main__":
    main()
