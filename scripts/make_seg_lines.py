"""Writes a synthetic segmentation set for scripts/device_check.sh: N grey images of noise crossed by one
horizontal and one vertical 1-px bright line at seeded positions, and the lines as masks (images/ and
masks/ folders of PNGs, tpp's image-folder segmentation layout). Usage: make_seg_lines.py OUT [N] [SIZE]"""
import sys
from pathlib import Path

import numpy as np
from PIL import Image

out = Path(sys.argv[1])
n = int(sys.argv[2]) if len(sys.argv) > 2 else 48
size = int(sys.argv[3]) if len(sys.argv) > 3 else 96
rng = np.random.default_rng(0)
for d in ("images", "masks"):
    (out / d).mkdir(parents=True, exist_ok=True)
for i in range(n):
    mask = np.zeros((size, size), bool)
    mask[rng.integers(3, size - 3), :] = True
    mask[:, rng.integers(3, size - 3)] = True
    img = np.where(mask, 230, rng.integers(0, 70, (size, size))).astype(np.uint8)
    Image.fromarray(img).save(out / "images" / f"{i}.png")
    Image.fromarray((mask * 255).astype(np.uint8)).save(out / "masks" / f"{i}.png")
