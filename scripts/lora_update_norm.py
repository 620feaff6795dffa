"""Size of the LoRA update a TPP stage leaves: sqrt(sum over adapted layers of ||B A||_F^2).

Needs the safetensors package (`.venv/bin/pip install safetensors`, or `make fixtures`, which installs it).
Usage: .venv/bin/python scripts/lora_update_norm.py runs/<compare>/tpp/lora/seed0 [...]
(reads <dir>/targets/adapter_model.safetensors; used for RESULTS.md, "Where TPP does not help").
"""
import sys

from safetensors.torch import load_file

for d in sys.argv[1:]:
    t = load_file(f"{d}/targets/adapter_model.safetensors")
    total = 0.0
    for k, a in t.items():
        if k.endswith("lora_A.weight"):
            b = t[k.replace("lora_A", "lora_B")]
            total += float((b @ a).norm() ** 2)
    print(f"{d}: ||B A|| = {total ** 0.5:.3f}")
