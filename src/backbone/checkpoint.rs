//! Checkpoint formats. Every supported layout is read from safetensors (never pickle), renamed to timm's
//! key names, and the architecture is inferred from tensor shapes.
//!
//! Formats, detected from key names:
//! - timm ViT (`patch_embed.proj.weight`, `blocks.N.attn.qkv.weight`, ...), with or without `head`;
//! - original MAE (timm encoder names plus `decoder_embed`, `mask_token`, `decoder_blocks.N`, ...);
//! - Hugging Face `ViTMAEForPreTraining` / `ViTMAEModel` (`vit.embeddings.*`, `decoder.decoder_layers.N.*`);
//! - Hugging Face `Dinov2Model` (`embeddings.*`, `encoder.layer.N.attention.attention.query`, `layer_scale1`).
use super::config::{Pool, VitConfig};
use crate::Error;
use anyhow::{Context, Result, anyhow, bail};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// A checkpoint layout tpp reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// timm's `VisionTransformer` names.
    Timm,
    /// The original MAE: timm encoder names plus its decoder.
    Mae,
    /// Hugging Face `ViTMAEForPreTraining` / `ViTMAEModel`.
    HfVitMae,
    /// Hugging Face `Dinov2Model`.
    HfDinov2,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Timm => "timm ViT",
            Format::Mae => "MAE (original, with decoder)",
            Format::HfVitMae => "Hugging Face ViTMAE",
            Format::HfDinov2 => "Hugging Face Dinov2",
        })
    }
}

/// Shape of the MAE decoder stored in a checkpoint, in the original MAE's names.
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderInfo {
    /// Decoder width.
    pub embed_dim: i64,
    /// Decoder blocks.
    pub depth: i64,
    /// Decoder attention heads.
    pub num_heads: i64,
    /// Decoder MLP width.
    pub mlp_hidden: i64,
    /// Output per patch: patch * patch * in_chans.
    pub pred_dim: i64,
}

/// A checkpoint read into memory with timm (and MAE-decoder) key names.
pub struct Checkpoint {
    /// The file read.
    pub path: PathBuf,
    /// Its detected layout.
    pub format: Format,
    /// Tensors in fp32 on CPU, keyed by timm / original-MAE names.
    pub tensors: BTreeMap<String, Tensor>,
    /// Keys of the file that no supported parameter uses (original names).
    pub unused: Vec<String>,
    /// The architecture inferred from the shapes (and config.json, and the options).
    pub config: VitConfig,
    /// The MAE decoder it holds, if any.
    pub decoder: Option<DecoderInfo>,
}

fn kind_of(d: Dtype) -> Option<Kind> {
    Some(match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Reads every tensor of a safetensors file (any float dtype becomes fp32). Errors name the file.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read file", path.display()))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::UnknownFormat {
        path: path.to_path_buf(),
        detail: format!("not a valid safetensors file ({e})"),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| anyhow!("{}: tensor '{name}' has unsupported dtype {:?}", path.display(), view.dtype()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&s| s as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| anyhow!("{}: tensor '{name}': {e}", path.display()))?;
        let t = if t.is_floating_point() { t.to_kind(Kind::Float) } else { t };
        out.insert(name, t);
    }
    Ok(out)
}

fn has(keys: &BTreeMap<String, Tensor>, k: &str) -> bool {
    keys.contains_key(k)
}

/// Number of `prefix.N.` entries.
fn count_layers(keys: &BTreeMap<String, Tensor>, prefix: &str) -> i64 {
    let mut seen = BTreeSet::new();
    for k in keys.keys() {
        if let Some(rest) = k.strip_prefix(prefix)
            && let Some(idx) = rest.split('.').next().and_then(|s| s.parse::<i64>().ok())
        {
            seen.insert(idx);
        }
    }
    seen.len() as i64
}

/// The layout of a file's tensors, from sentinel key names; None when none fits.
pub fn detect(keys: &BTreeMap<String, Tensor>) -> Option<Format> {
    let any = |p: &str| keys.keys().any(|k| k.starts_with(p));
    let hf = any("embeddings.patch_embeddings.") && (any("encoder.layer.") || any("layers."));
    if any("vit.embeddings.") || (hf && keys.keys().any(|k| k.contains(".layernorm_before."))) {
        Some(Format::HfVitMae)
    } else if hf {
        Some(Format::HfDinov2)
    } else if has(keys, "patch_embed.proj.weight") && (any("decoder_blocks.") || has(keys, "decoder_embed.weight")) {
        Some(Format::Mae)
    } else if has(keys, "patch_embed.proj.weight") && any("blocks.") {
        Some(Format::Timm)
    } else {
        None
    }
}

/// Renames the tensors of one transformer layer in HF layout (`{s}.`) to timm's (`{d}.`), fusing separate
/// query/key/value into `attn.qkv`. Both the hub layout that `save_pretrained` writes
/// (`attention.attention.query`, `attention.output.dense`) and transformers 5's module names (`q_proj`,
/// `o_proj`, `mlp.fc1`) are accepted. Used keys are recorded.
fn hf_layer(
    src: &BTreeMap<String, Tensor>,
    s: &str,
    d: &str,
    dinov2: bool,
    out: &mut BTreeMap<String, Tensor>,
    used: &mut BTreeSet<String>,
) -> Result<()> {
    // The first candidate name present wins; the error names the hub layout's key.
    let mut take = |names: &[&str], wb: &str| -> Result<Tensor> {
        for n in names {
            let key = format!("{s}.{n}.{wb}");
            if let Some(t) = src.get(&key) {
                used.insert(key);
                return Ok(t.shallow_clone());
            }
        }
        Err(anyhow!("missing key '{s}.{}.{wb}'", names[0]))
    };
    for wb in ["weight", "bias"] {
        let q = take(&["attention.attention.query", "attention.q_proj"], wb);
        let k = take(&["attention.attention.key", "attention.k_proj"], wb);
        let v = take(&["attention.attention.value", "attention.v_proj"], wb);
        match (q, k, v) {
            (Ok(q), Ok(k), Ok(v)) => {
                let (sq, sk, sv) = (q.size(), k.size(), v.size());
                let qkv = Tensor::f_cat(&[q, k, v], 0).map_err(|_| {
                    anyhow!("{s}: query, key and value {wb}s have shapes {sq:?}, {sk:?}, {sv:?}, which do not stack")
                })?;
                out.insert(format!("{d}.attn.qkv.{wb}"), qkv);
            }
            // Biases are optional (qkv_bias=False); weights are not.
            (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) if wb == "weight" => return Err(e),
            _ => {}
        }
    }
    let pairs: &[(&[&str], &str)] = if dinov2 {
        &[
            (&["norm1"], "norm1"),
            (&["attention.output.dense", "attention.o_proj"], "attn.proj"),
            (&["norm2"], "norm2"),
            (&["mlp.fc1"], "mlp.fc1"),
            (&["mlp.fc2"], "mlp.fc2"),
        ]
    } else {
        &[
            (&["layernorm_before"], "norm1"),
            (&["attention.output.dense", "attention.o_proj"], "attn.proj"),
            (&["layernorm_after"], "norm2"),
            (&["intermediate.dense", "mlp.fc1"], "mlp.fc1"),
            (&["output.dense", "mlp.fc2"], "mlp.fc2"),
        ]
    };
    for (a, b) in pairs {
        for wb in ["weight", "bias"] {
            out.insert(format!("{d}.{b}.{wb}"), take(a, wb)?);
        }
    }
    if dinov2 {
        for (a, b) in [("layer_scale1", "ls1"), ("layer_scale2", "ls2")] {
            if let Ok(t) = take(&[a], "lambda1") {
                out.insert(format!("{d}.{b}.gamma"), t);
            }
        }
        if src.contains_key(&format!("{s}.mlp.weights_in.weight")) {
            bail!("SwiGLU MLP (DINOv2 giant) is not supported");
        }
    }
    Ok(())
}

/// Prefix of the encoder layers: `encoder.layer.` (hub layout) or `layers.` (transformers 5 modules).
fn hf_layers_prefix(src: &BTreeMap<String, Tensor>, pre: &str) -> String {
    let legacy = format!("{pre}encoder.layer.");
    if src.keys().any(|k| k.starts_with(&legacy)) { legacy } else { format!("{pre}layers.") }
}

/// Maps any supported layout to timm / original-MAE names; returns (renamed, used original keys).
fn to_timm(src: &BTreeMap<String, Tensor>, format: Format) -> Result<(BTreeMap<String, Tensor>, BTreeSet<String>)> {
    let mut out = BTreeMap::new();
    let mut used = BTreeSet::new();
    match format {
        Format::Timm | Format::Mae => {
            for (k, v) in src {
                out.insert(k.clone(), v.shallow_clone());
                used.insert(k.clone());
            }
        }
        Format::HfVitMae | Format::HfDinov2 => {
            let dinov2 = format == Format::HfDinov2;
            let pre = if src.keys().any(|k| k.starts_with("vit.")) { "vit." } else { "" };
            let mut put = |from: &str, to: &str, out: &mut BTreeMap<String, Tensor>, required: bool| -> Result<()> {
                match src.get(&format!("{pre}{from}")) {
                    Some(t) => {
                        used.insert(format!("{pre}{from}"));
                        out.insert(to.to_string(), t.shallow_clone());
                        Ok(())
                    }
                    None if required => bail!("missing key '{pre}{from}'"),
                    None => Ok(()),
                }
            };
            put("embeddings.cls_token", "cls_token", &mut out, false)?;
            put("embeddings.register_tokens", "reg_token", &mut out, false)?;
            put("embeddings.position_embeddings", "pos_embed", &mut out, true)?;
            put("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight", &mut out, true)?;
            put("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias", &mut out, true)?;
            put("layernorm.weight", "norm.weight", &mut out, false)?;
            put("layernorm.bias", "norm.bias", &mut out, false)?;
            // Dinov2's mask token is for iBOT-style masking at pre-training; unused here but not an error.
            let layers = hf_layers_prefix(src, pre);
            for i in 0..count_layers(src, &layers) {
                hf_layer(src, &format!("{layers}{i}"), &format!("blocks.{i}"), dinov2, &mut out, &mut used)?;
            }
            if format == Format::HfVitMae {
                let mut dput = |from: &str, to: &str| {
                    if let Some(t) = src.get(&format!("decoder.{from}")) {
                        used.insert(format!("decoder.{from}"));
                        out.insert(to.to_string(), t.shallow_clone());
                    }
                };
                for (a, b) in [
                    ("decoder_embed.weight", "decoder_embed.weight"),
                    ("decoder_embed.bias", "decoder_embed.bias"),
                    ("mask_token", "mask_token"),
                    ("decoder_pos_embed", "decoder_pos_embed"),
                    ("decoder_norm.weight", "decoder_norm.weight"),
                    ("decoder_norm.bias", "decoder_norm.bias"),
                    ("decoder_pred.weight", "decoder_pred.weight"),
                    ("decoder_pred.bias", "decoder_pred.bias"),
                ] {
                    dput(a, b);
                }
                // transformers 5's save_pretrained writes `decoder_encoder.layer.N` for the hub's
                // `decoder_layers.N`; accept both.
                let layers = ["decoder.decoder_layers.", "decoder.decoder_encoder.layer."]
                    .into_iter()
                    .find(|p| src.keys().any(|k| k.starts_with(p)))
                    .unwrap_or("decoder.decoder_layers.");
                for i in 0..count_layers(src, layers) {
                    hf_layer(src, &format!("{layers}{i}"), &format!("decoder_blocks.{i}"), false, &mut out, &mut used)?;
                }
            }
        }
    }
    Ok((out, used))
}

/// Optional HF `config.json` beside the checkpoint: the one place where head count and LayerNorm eps are
/// written down (they cannot be inferred from shapes).
#[derive(Debug, Default, serde::Deserialize)]
struct HfConfig {
    num_attention_heads: Option<i64>,
    layer_norm_eps: Option<f64>,
    decoder_num_attention_heads: Option<i64>,
    hidden_act: Option<String>,
}

fn read_hf_config(path: &Path) -> Result<HfConfig> {
    let cfg_path = path.with_file_name("config.json");
    if !cfg_path.exists() {
        return Ok(HfConfig::default());
    }
    let text = std::fs::read_to_string(&cfg_path).with_context(|| format!("{}: cannot read", cfg_path.display()))?;
    let cfg: HfConfig =
        serde_json::from_str(&text).with_context(|| format!("{}: not a valid config.json", cfg_path.display()))?;
    for (key, v) in [
        ("num_attention_heads", cfg.num_attention_heads),
        ("decoder_num_attention_heads", cfg.decoder_num_attention_heads),
    ] {
        if let Some(v) = v.filter(|v| !(1..=4096).contains(v)) {
            bail!("{}: {key} must be in 1..=4096, got {v}", cfg_path.display());
        }
    }
    if let Some(eps) = cfg.layer_norm_eps.filter(|e| !(e.is_finite() && *e > 0.0 && *e < 1.0)) {
        bail!("{}: layer_norm_eps must be in (0, 1), got {eps}", cfg_path.display());
    }
    Ok(cfg)
}

fn dims(t: &Tensor) -> Vec<i64> {
    t.size()
}

/// The rank a model tensor's timm name implies.
fn expected_rank(k: &str) -> usize {
    match k {
        "cls_token" | "reg_token" | "pos_embed" | "mask_token" | "decoder_pos_embed" => 3,
        "patch_embed.proj.weight" => 4,
        _ if k.ends_with(".bias") || k.ends_with(".gamma") => 1,
        _ if ["norm.weight", "norm1.weight", "norm2.weight"].iter().any(|n| k.ends_with(n)) => 1,
        _ => 2,
    }
}

/// Every model tensor has the rank its name implies (before shapes are read to infer the architecture).
fn check_ranks(t: &BTreeMap<String, Tensor>) -> Result<()> {
    for (k, v) in t.iter().filter(|(k, _)| is_model_key(k)) {
        let want = expected_rank(k);
        if v.dim() != want {
            bail!("tensor '{k}' has shape {:?}; a tensor of that name has {want} dimensions", v.size());
        }
    }
    Ok(())
}

/// Infers the encoder architecture from timm-named tensors.
fn infer_config(t: &BTreeMap<String, Tensor>, heads: Option<i64>, eps: f64) -> Result<VitConfig> {
    let get = |k: &str| t.get(k).ok_or_else(|| anyhow!("missing key '{k}'"));
    let pw = dims(get("patch_embed.proj.weight")?);
    if pw.len() != 4 || pw[2] != pw[3] {
        bail!("patch_embed.proj.weight has shape {pw:?}, expected [D, C, p, p]");
    }
    let (embed_dim, in_chans, patch_size) = (pw[0], pw[1], pw[2]);
    let depth = count_layers(t, "blocks.");
    if depth == 0 {
        bail!("no transformer blocks ('blocks.N.*') in checkpoint");
    }
    let fc1 = dims(get("blocks.0.mlp.fc1.weight")?);
    let class_token = t.contains_key("cls_token");
    let reg_tokens = t.get("reg_token").map(|r| r.size()[1]).unwrap_or(0);
    let prefix = i64::from(class_token) + reg_tokens;
    let pos = dims(get("pos_embed")?);
    if pos.len() != 3 || pos[2] != embed_dim {
        bail!("pos_embed has shape {pos:?}, expected [1, N, {embed_dim}]");
    }
    // The position table covers the patch grid plus 0, 1 or all prefix tokens.
    let is_square = |n: i64| n > 0 && ((n as f64).sqrt().round() as i64).pow(2) == n;
    let pos_prefix = [prefix, 1, 0]
        .into_iter()
        .filter(|&k| k <= prefix)
        .find(|&k| is_square(pos[1] - k))
        .ok_or_else(|| anyhow!("pos_embed length {} is not a square patch grid plus prefix tokens", pos[1]))?;
    let grid = ((pos[1] - pos_prefix) as f64).sqrt().round() as i64;
    let has_norm = t.contains_key("norm.weight");
    let has_fc_norm = t.contains_key("fc_norm.weight");
    let num_heads = heads.unwrap_or(embed_dim / 64).max(1);
    let cfg = VitConfig {
        img_size: grid * patch_size,
        patch_size,
        in_chans,
        embed_dim,
        depth,
        num_heads,
        mlp_hidden: fc1[0],
        qkv_bias: t.contains_key("blocks.0.attn.qkv.bias"),
        layer_scale: t.contains_key("blocks.0.ls1.gamma").then_some(1e-5),
        class_token,
        reg_tokens,
        pos_prefix,
        // timm: an fc_norm means global average pooling with the final norm replaced by fc_norm.
        pool: if has_fc_norm || !class_token { Pool::Mean } else { Pool::Cls },
        final_norm: has_norm,
        fc_norm: has_fc_norm,
        norm_eps: eps,
        num_classes: t.get("head.weight").map(|h| h.size()[0]).unwrap_or(0),
    };
    cfg.validate().map_err(|e| anyhow!(e))?;
    Ok(cfg)
}

/// The MAE decoder's geometry, when the checkpoint has one; `heads` from config.json must divide its width.
fn infer_decoder(t: &BTreeMap<String, Tensor>, heads: Option<i64>) -> Result<Option<DecoderInfo>> {
    let (Some(embed), Some(pred)) = (t.get("decoder_embed.weight"), t.get("decoder_pred.weight")) else {
        return Ok(None);
    };
    let (embed, pred) = (embed.size()[0], pred.size()[0]);
    let depth = count_layers(t, "decoder_blocks.");
    let mlp_hidden = t.get("decoder_blocks.0.mlp.fc1.weight").map(|w| w.size()[0]).unwrap_or(embed * 4);
    let num_heads = match heads {
        Some(h) if embed % h != 0 => {
            bail!("config.json: decoder_num_attention_heads {h} does not divide the decoder width {embed}")
        }
        Some(h) => h,
        // MAE's decoders use 32-wide heads; else the largest head count below that divides the width.
        None => (1..=(embed / 32).max(1)).rev().find(|h| embed % h == 0).unwrap_or(1),
    };
    Ok(Some(DecoderInfo { embed_dim: embed, depth, num_heads, mlp_hidden, pred_dim: pred }))
}

/// Keys a ViT encoder of config `cfg` (and its MAE decoder) uses, to list the rest as unused.
fn is_model_key(k: &str) -> bool {
    const TOP: &[&str] = &["cls_token", "reg_token", "pos_embed", "mask_token", "decoder_pos_embed"];
    TOP.contains(&k)
        || [
            "patch_embed.",
            "blocks.",
            "norm.",
            "fc_norm.",
            "head.",
            "decoder_embed.",
            "decoder_blocks.",
            "decoder_norm.",
            "decoder_pred.",
        ]
        .iter()
        .any(|p| k.starts_with(p))
}

/// Overrides the user may give where shapes cannot tell (heads) or where they want another geometry.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// Attention heads (default: config.json beside the file, else head dim 64).
    pub num_heads: Option<i64>,
    /// Input size; position embeddings are resampled to it.
    pub img_size: Option<i64>,
    /// Pooling (default: as the checkpoint implies).
    pub pool: Option<Pool>,
}

impl Checkpoint {
    /// Reads a checkpoint file of any supported layout under timm names, and its architecture.
    pub fn open(path: &Path, opts: &LoadOptions) -> Result<Self> {
        // Every failure here is a problem with the input named.
        crate::error::input((|| -> Result<Self> {
            let src = read_safetensors(path)?;
            let ctx = || path.display().to_string();
            // Tolerate the usual wrapper prefixes of training frameworks.
            let src: BTreeMap<String, Tensor> =
                src.into_iter().map(|(k, v)| (k.strip_prefix("module.").map(str::to_string).unwrap_or(k), v)).collect();
            let format = detect(&src).ok_or_else(|| {
            let sample: Vec<&str> = src.keys().take(5).map(String::as_str).collect();
            Error::UnknownFormat {
                path: path.to_path_buf(),
                detail: format!("not a ViT checkpoint of a supported format (timm, MAE, HF ViTMAE, HF Dinov2); first keys: {sample:?}"),
            }
        })?;
            let hf = read_hf_config(path)?;
            if let Some(act) = &hf.hidden_act
                && act != "gelu"
            {
                bail!("{}: activation '{act}' is not supported (only exact GELU)", ctx());
            }
            let (mut tensors, used) =
                to_timm(&src, format).with_context(|| format!("{}: {format} checkpoint", ctx()))?;
            check_ranks(&tensors).with_context(|| format!("{}: {format} checkpoint", ctx()))?;
            let default_eps = if format == Format::HfVitMae { 1e-12 } else { 1e-6 };
            let mut config = infer_config(
                &tensors,
                opts.num_heads.or(hf.num_attention_heads),
                hf.layer_norm_eps.unwrap_or(default_eps),
            )
            .with_context(|| format!("{}: {format} checkpoint", ctx()))?;
            if let Some(p) = opts.pool {
                config.pool = p;
                config.validate().map_err(|e| anyhow!("{}: {e}", ctx()))?;
            }
            if let Some(size) = opts.img_size
                && size != config.img_size
            {
                let mut c = config.clone();
                c.img_size = size;
                c.validate().map_err(|e| anyhow!("{}: --img-size: {e}", ctx()))?;
                let g = c.grid();
                let pos = &tensors["pos_embed"];
                tensors.insert("pos_embed".into(), resample(pos, config.pos_prefix, g));
                config = c;
            }
            let mut unused: Vec<String> = src.keys().filter(|k| !used.contains(*k)).cloned().collect();
            unused.extend(tensors.keys().filter(|k| !is_model_key(k)).cloned());
            unused.sort();
            unused.dedup();
            let decoder = infer_decoder(&tensors, hf.decoder_num_attention_heads).with_context(ctx)?;
            Ok(Checkpoint { path: path.to_path_buf(), format, tensors, unused, config, decoder })
        })())
    }

    /// Number of encoder parameters stored (decoder and unused keys excluded).
    pub fn encoder_param_count(&self) -> i64 {
        self.tensors
            .iter()
            .filter(|(k, _)| is_model_key(k) && !k.starts_with("decoder") && *k != "mask_token")
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }
}

fn resample(pos: &Tensor, prefix: i64, grid: i64) -> Tensor {
    super::vit::resample_pos_embed(pos, prefix, grid, grid)
}

/// Copies `tensors` into the variables of a VarStore (names relative to the store's root, optionally
/// under `prefix`). Every variable must be present with its exact shape: a missing or mis-shaped key is
/// an error naming the key and both shapes.
pub fn load_into(vs: &tch::nn::VarStore, tensors: &BTreeMap<String, Tensor>, prefix: &str, file: &Path) -> Result<()> {
    let vars = vs.variables();
    let mut names: Vec<&String> = vars.keys().filter(|k| k.starts_with(prefix)).collect();
    names.sort();
    for name in names {
        let key = &name[prefix.len()..];
        let var = &vars[name];
        let src = tensors.get(key).ok_or_else(|| Error::MissingKey {
            file: file.to_path_buf(),
            what: "key",
            key: key.to_string(),
            expected: var.size(),
        })?;
        copy_checked(var, src, file, &format!("key '{key}'"))?;
    }
    Ok(())
}

/// Copies a stored tensor into a model tensor (its dtype and device) after checking the shape; the one
/// place every loader (backbone, adapters, optimiser state) reports a mismatch, naming file and tensor.
pub fn copy_checked(dst: &Tensor, src: &Tensor, file: &Path, what: &str) -> Result<()> {
    if src.size() != dst.size() {
        let (found, expected) = (src.size(), dst.size());
        return Err(Error::ShapeMismatch { file: file.to_path_buf(), what: what.to_string(), found, expected }.into());
    }
    // Integer or boolean values would be cast unscaled, and non-finite ones poison every output.
    if dst.is_floating_point() && !src.is_floating_point() {
        let kind = src.kind();
        let detail = format!(
            "{what} has dtype {kind:?}; weights must be floating point (quantised or integer checkpoints are \
             not supported)"
        );
        return Err(Error::UnknownFormat { path: file.to_path_buf(), detail }.into());
    }
    if src.is_floating_point() && src.isfinite().all().int64_value(&[]) == 0 {
        return Err(crate::error::bad_input!("{}: {what} holds non-finite values (NaN or infinity)", file.display()));
    }
    let _guard = tch::no_grad_guard();
    let mut d = dst.shallow_clone();
    d.copy_(&src.to_kind(dst.kind()).to_device(dst.device()));
    Ok(())
}
