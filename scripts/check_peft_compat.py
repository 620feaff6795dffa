# Usage (developer check, not CI): tpp finetune ... --peft lora --out /tmp/peft_compat on the timm fixture, then
#   .venv/bin/python scripts/check_peft_compat.py and tpp predict --run /tmp/peft_compat --input /tmp/peft_x.npy: same probabilities.
# One-off developer check: a LoRA adapter written by tpp loads in HF PEFT on the timm model and gives tpp's outputs.
import torch, json, numpy as np
from timm.models.vision_transformer import VisionTransformer
from safetensors.torch import load_file
from peft import PeftModel
m = VisionTransformer(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=2).eval()
sd = load_file("tests/fixtures/timm_vit_p16.safetensors"); sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
print(m.load_state_dict(sd, strict=False))
pm = PeftModel.from_pretrained(m, "/tmp/peft_compat/adapter").eval()
torch.manual_seed(0); x = torch.randn(3, 3, 48, 48)
np.save("/tmp/peft_x.npy", x.numpy())
with torch.no_grad(): y = pm(x)
np.save("/tmp/peft_y.npy", y.numpy())
print("peft logits", y[:, :2])
