"""Creates the parity fixtures in tests/fixtures (run once by a developer, not in CI).

Each fixture is a small random-weight model from the reference implementation (timm, Hugging Face
transformers) saved as safetensors, plus an `*_io.safetensors` file with an input batch and the reference
outputs. The Rust tests load the weights with tpp and must match those outputs (fp32, CPU).

    .venv/bin/pip install torch==2.11.0 timm transformers safetensors
    .venv/bin/python scripts/make_fixtures.py
"""
import json
import os

import torch
import timm
from timm.models.vision_transformer import VisionTransformer
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
os.makedirs(OUT, exist_ok=True)


def perturb(model, seed):
    # Random init leaves LayerNorms at 1/0 and LayerScale at a constant: perturb every parameter so that
    # each one influences the outputs the tests compare.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def save(name, tensors):
    save_file({k: v.detach().contiguous().float() for k, v in tensors.items()}, os.path.join(OUT, name))


def timm_fixture(name, seed, size, extra_sizes=(), **kw):
    torch.manual_seed(seed)
    m = VisionTransformer(**kw).eval()
    perturb(m, seed)
    save(f"{name}.safetensors", m.state_dict())
    x = torch.randn(2, kw.get("in_chans", 3), size, size)
    io = {"input": x}
    with torch.no_grad():
        feats = m.forward_features(x)
        io["features"] = feats
        io["pooled"] = m.forward_head(feats, pre_logits=True)
        if m.num_classes:
            io["logits"] = m.forward_head(feats)
        # Other input sizes: position embeddings resampled on the fly (timm dynamic_img_size).
        for s in extra_sizes:
            m2 = VisionTransformer(dynamic_img_size=True, **kw).eval()
            m2.load_state_dict(m.state_dict())
            xs = torch.randn(2, kw.get("in_chans", 3), s, s)
            io[f"input_{s}"] = xs
            io[f"pooled_{s}"] = m2.forward_head(m2.forward_features(xs), pre_logits=True)
    save(f"{name}_io.safetensors", io)


# 1. Classic ViT, patch 16, cls pooling, with head; other sizes up- and down-sample the 3x3 grid.
timm_fixture("timm_vit_p16", 1, 48, extra_sizes=(64, 32), img_size=48, patch_size=16, embed_dim=64, depth=2,
             num_heads=4, num_classes=5)
# 2. DINOv2-style: patch 14, LayerScale, 2 registers, position table without prefix tokens (no_embed_class).
timm_fixture("timm_dinov2_p14_reg", 2, 56, extra_sizes=(42,), img_size=56, patch_size=14, embed_dim=64, depth=2,
             num_heads=4, init_values=1e-5, reg_tokens=2, no_embed_class=True, num_classes=0)
# 3. MAE-style fine-tuning layout: mean pooling with fc_norm, no qkv bias, 1-channel input, MLP ratio 2.
timm_fixture("timm_vit_avg_fcnorm", 3, 32, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
             mlp_ratio=2.0, qkv_bias=False, global_pool="avg", fc_norm=True, in_chans=1, num_classes=3)

try:
    import transformers
    from transformers import Dinov2Config, Dinov2Model, ViTMAEConfig, ViTMAEForPreTraining
except ImportError:  # documented in the note: HF fixtures need transformers
    transformers = None

if transformers is not None:
    # 4. HF ViTMAEForPreTraining (encoder + decoder), config.json beside the weights.
    torch.manual_seed(4)
    cfg = ViTMAEConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                       image_size=32, patch_size=8, num_channels=3, decoder_hidden_size=32,
                       decoder_num_hidden_layers=1, decoder_num_attention_heads=4, decoder_intermediate_size=64,
                       mask_ratio=0.0, norm_pix_loss=True)
    m = ViTMAEForPreTraining(cfg).eval()
    perturb(m, 4)
    d = os.path.join(OUT, "hf_vitmae")
    os.makedirs(d, exist_ok=True)
    m.save_pretrained(d)  # the hub layout users have: model.safetensors + config.json
    x = torch.randn(2, 3, 32, 32)
    n = (32 // 8) ** 2
    # Increasing noise keeps the patch order, so mask ratio 0 gives the plain encoder.
    keep_order = torch.arange(n, dtype=torch.float32).unsqueeze(0).repeat(2, 1)
    io = {"input": x}
    with torch.no_grad():
        io["features"] = m.vit(x, noise=keep_order).last_hidden_state
        # The MAE pretext at ratio 0.75 with fixed noise, for the decoder.
        m.config.mask_ratio = 0.75
        noise = torch.rand(2, n)
        out = m(x, noise=noise)
        io.update(mae_noise=noise, mae_logits=out.logits, mae_mask=out.mask, mae_loss=out.loss.reshape(1))
    save("hf_vitmae_io.safetensors", io)

    # 5. HF Dinov2Model, config.json beside the weights.
    torch.manual_seed(5)
    cfg = Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=4, image_size=56,
                       patch_size=14, layerscale_value=1.0)
    m = Dinov2Model(cfg).eval()
    perturb(m, 5)
    d = os.path.join(OUT, "hf_dinov2")
    os.makedirs(d, exist_ok=True)
    m.save_pretrained(d)  # the hub layout users have: model.safetensors + config.json
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        out = m(x)
    save("hf_dinov2_io.safetensors", {"input": x, "features": out.last_hidden_state, "pooled": out.pooler_output})

print("torch", torch.__version__, "timm", timm.__version__,
      "transformers", transformers.__version__ if transformers else "absent")

# 6. An HF PEFT LoRA adapter on the timm ViT of fixture 1, as `save_pretrained` writes it, with non-zero
#    factors and a trained head (modules_to_save), and the adapted model's outputs.
try:
    import peft
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
except ImportError:
    peft = None
if peft is not None:
    torch.manual_seed(6)
    kw = dict(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    base = VisionTransformer(**kw).eval()
    base.load_state_dict(load_file(os.path.join(OUT, "timm_vit_p16.safetensors")))
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv", "fc1"], modules_to_save=["head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.eval()
    d = os.path.join(OUT, "peft_lora")
    pm.save_pretrained(d)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        save("peft_lora_io.safetensors", {"input": x, "logits": pm(x)})
    print("peft", peft.__version__)

# 7. An HF PEFT IA3 adapter on the timm ViT of fixture 1, as `save_pretrained` writes it: output scaling on
#    attn.qkv (the query third left at exactly 1, keys and values scaled), input scaling on mlp.fc2 (a
#    feedforward module), a trained head (modules_to_save), and the adapted model's outputs.
try:
    import peft
    from peft import IA3Config, PeftModel, get_peft_model
    from safetensors.torch import load_file
except ImportError:
    peft = None
if peft is not None:
    torch.manual_seed(7)
    kw = dict(img_size=48, patch_size=16, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    base = VisionTransformer(**kw).eval()
    base.load_state_dict(load_file(os.path.join(OUT, "timm_vit_p16.safetensors")))
    pm = get_peft_model(base, IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"],
                                        modules_to_save=["head"]))
    dim = kw["embed_dim"]
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "ia3_l" in n and ".attn.qkv." in n:
                assert p.shape == (3 * dim, 1), (n, p.shape)  # output scaling, one factor per output row
                p[dim:].add_(torch.randn_like(p[dim:]) * 0.1)  # queries stay exactly 1
            elif "ia3_l" in n:
                assert ".mlp.fc2." in n and p.shape == (1, 4 * dim), (n, p.shape)  # input scaling
                p.add_(torch.randn_like(p) * 0.1)
            elif "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    pm.eval()
    d = os.path.join(OUT, "peft_ia3")
    pm.save_pretrained(d)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        logits = pm(x)
    save("peft_ia3_io.safetensors", {"input": x, "logits": logits})
    # The saved adapter re-loads onto a fresh base and reproduces the outputs.
    base2 = VisionTransformer(**kw).eval()
    base2.load_state_dict(load_file(os.path.join(OUT, "timm_vit_p16.safetensors")))
    pm2 = PeftModel.from_pretrained(base2, d).eval()
    with torch.no_grad():
        torch.testing.assert_close(pm2(x), logits, rtol=0, atol=0)
    print("peft", peft.__version__, "(ia3)")
