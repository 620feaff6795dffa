"""Reference values for tpp's DINO functions (tests/pretext.rs), computed in PyTorch with the formulas of
the DINO (facebookresearch/dino, DINOLoss) and DINOv2 (facebookresearch/dinov2, DINOLoss.sinkhorn_knopp_teacher,
KoLeoLoss) papers' code, written out here. Run once:  .venv/bin/python scripts/make_dino_fixtures.py
Writes tests/fixtures/dino_reference.safetensors."""
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
B, K, D = 6, 16, 8
STUDENT_TEMP, TEACHER_TEMP, ITERS = 0.1, 0.04, 3

# Cosine-like logits in [-1, 1], as DINO's weight-normalised head gives.
student = [torch.tanh(torch.randn(B, K)) for _ in range(4)]  # 2 global + 2 local crops
teacher = [torch.tanh(torch.randn(B, K)) for _ in range(2)]
center = 0.1 * torch.randn(1, K)


def cross_entropy(student, targets):
    total, n = 0.0, 0
    for i, q in enumerate(targets):
        for j, s in enumerate(student):
            if i == j:
                continue
            total = total + torch.sum(-q * F.log_softmax(s / STUDENT_TEMP, dim=-1), dim=-1).mean()
            n += 1
    return total / n


# DINO: centred, sharpened teacher.
centred = [F.softmax((t - center) / TEACHER_TEMP, dim=-1) for t in teacher]
dino_loss = cross_entropy(student, centred)

# DINOv2: Sinkhorn-Knopp over both global crops' teacher outputs together.
def sinkhorn_knopp(t, temp, iters):
    q = torch.exp(t / temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(iters):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


sk = sinkhorn_knopp(torch.cat(teacher), TEACHER_TEMP, ITERS)
sk_loss = cross_entropy(student, list(sk.chunk(2)))

# DINOv2's KoLeo: nearest neighbour of each normalised feature, minus the mean log distance.
feats = torch.randn(B, D)
x = F.normalize(feats, eps=1e-8, p=2, dim=-1)
dots = x @ x.t()
n = x.shape[0]
dots.view(-1)[:: n + 1].fill_(-1)
nn_idx = torch.max(dots, dim=1).indices
dist = F.pairwise_distance(x, x[nn_idx], p=2, eps=1e-8)
koleo = -torch.log(dist + 1e-8).mean()

entropy = -(sk * torch.log(sk)).sum(-1).mean()

tensors = {f"student{i}": s for i, s in enumerate(student)}
tensors.update({f"teacher{i}": t for i, t in enumerate(teacher)})
tensors.update(
    center=center,
    dino_loss=dino_loss.reshape(1),
    sk_targets=sk.contiguous(),
    sk_loss=sk_loss.reshape(1),
    features=feats,
    koleo=koleo.reshape(1),
    sk_entropy=entropy.reshape(1),
    ln_k=torch.tensor([math.log(K)]),
)
out = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "dino_reference.safetensors"
save_file({k: v.float().contiguous() for k, v in tensors.items()}, str(out))
print(f"wrote {out}: DINO loss {dino_loss.item():.6f}, SK loss {sk_loss.item():.6f}, KoLeo {koleo.item():.6f}")
