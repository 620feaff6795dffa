//! LoRA (Hu et al. 2021) and its weight-decomposed variant DoRA (Liu et al. 2024), on any of the block
//! linears `qkv`, `proj`, `fc1`, `fc2`, or on the q, k, v parts of the fused `qkv`. A is Kaiming-uniform,
//! B zero, so the model starts unchanged. DoRA is a variant of the LoRA module, not a branch in it.
use super::{Method, Options, PeftMethod, PeftSpec, kaiming_uniform_a5};
use crate::backbone::{LayerHook, LayerWeights, Vit};
use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

impl Method {
    /// LoRA.
    pub const LORA: Method = Method("lora");
    /// DoRA.
    pub const DORA: Method = Method("dora");
}

/// Which linears of a block LoRA/DoRA adapt; `q`, `k`, `v` select parts of the fused `qkv` projection.
pub const LORA_TARGETS: &[&str] = &["qkv", "proj", "fc1", "fc2", "q", "k", "v"];

/// Options of LoRA and DoRA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// Rank r of the update.
    pub lora_rank: i64,
    /// Scale alpha (the update is multiplied by alpha / r).
    pub lora_alpha: f64,
    /// Dropout on the update's input.
    pub lora_dropout: f64,
    /// Layers adapted: some of [`LORA_TARGETS`].
    pub lora_targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { lora_rank: 8, lora_alpha: 16.0, lora_dropout: 0.0, lora_targets: vec!["qkv".into()] }
    }
}

/// LoRA: `W x + b + scale * B A dropout(x)`; with `dora`, DoRA:
/// `m / ||W + scale B A||_row * (W x + scale B A x) + b`, the norm detached as in the paper and HF PEFT.
pub struct Lora {
    /// The weight-decomposed variant.
    pub dora: bool,
}

/// The module on one linear.
#[derive(Debug)]
pub struct LoraHook {
    /// [r, in]
    a: Tensor,
    /// [out, r]
    b: Tensor,
    scale: f64,
    dropout: f64,
    /// DoRA's magnitude vector [out].
    magnitude: Option<Tensor>,
    /// [out, 1] of 0/1: which output rows the update may touch (q/k/v targeting inside a fused qkv).
    row_mask: Option<Tensor>,
}

impl LoraHook {
    /// B with the rows outside the mask zeroed (they then get no gradient either).
    fn b_eff(&self) -> Tensor {
        match &self.row_mask {
            Some(m) => &self.b * m,
            None => self.b.shallow_clone(),
        }
    }

    /// The dense update `scale * B A` [out, in].
    fn delta(&self) -> Tensor {
        self.b_eff().matmul(&self.a) * self.scale
    }
}

impl LayerHook for LoraHook {
    fn nesting(&self) -> usize {
        if self.magnitude.is_some() { Method::DORA.rank() } else { Method::LORA.rank() }
    }

    fn forward(&self, layer: LayerWeights<'_>, x: &Tensor, inner: &dyn Fn(&Tensor) -> Tensor, train: bool) -> Tensor {
        let xd = if train && self.dropout > 0.0 { x.dropout(self.dropout, true) } else { x.shallow_clone() };
        let up = xd.linear::<Tensor>(&self.a, None).linear::<Tensor>(&self.b_eff(), None) * self.scale;
        let Some(m) = &self.magnitude else { return inner(x) + up };
        // DoRA rescales the whole weight, so it computes the layer itself (it nests innermost).
        let w = &layer.weight.to_kind(self.a.kind());
        let norm = (w + self.delta()).norm_scalaropt_dim(2, [1i64].as_slice(), false).detach();
        let y = (x.linear::<Tensor>(layer.weight, None) + up) * (m / norm);
        match layer.bias {
            Some(b) => y + b,
            None => y,
        }
    }
}

fn config(opts: &Options) -> Result<LoraConfig> {
    opts.parse()
}

fn validate(opts: &Options) -> Result<()> {
    let c = config(opts)?;
    crate::check::int("lora_rank", c.lora_rank, 1, 1 << 16)?;
    crate::check::float("lora_alpha", c.lora_alpha, crate::check::POSITIVE)?;
    crate::check::float("lora_dropout", c.lora_dropout, crate::check::UNIT_OPEN_HIGH)?;
    for t in &c.lora_targets {
        if !LORA_TARGETS.contains(&t.as_str()) {
            bail!("lora_targets (--lora-targets): unknown layer '{t}' (expected some of {})", LORA_TARGETS.join(", "));
        }
    }
    let has = |t: &str| c.lora_targets.iter().any(|x| x == t);
    if has("qkv") && ["q", "k", "v"].iter().any(|t| has(t)) {
        bail!("lora_targets (--lora-targets): 'qkv' already covers q, k and v; give either qkv or some of q, k, v");
    }
    Ok(())
}

/// Rows of the fused qkv output that q/k/v targeting lets the update touch, when it restricts them.
fn qkv_row_mask(c: &LoraConfig, out_dim: i64, device: tch::Device) -> Option<Tensor> {
    let has = |t: &str| c.lora_targets.iter().any(|x| x == t);
    let parts: Vec<usize> = ["q", "k", "v"].iter().enumerate().filter(|(_, p)| has(p)).map(|(i, _)| i).collect();
    if has("qkv") || parts.is_empty() {
        return None;
    }
    let d = (out_dim / 3) as usize;
    let mut m = vec![0f32; 3 * d];
    for &i in &parts {
        m[i * d..(i + 1) * d].fill(1.0);
    }
    Some(Tensor::from_slice(&m).reshape([3 * d as i64, 1]).to_device(device))
}

fn attach(vit: &mut Vit, p: &nn::Path, opts: &Options, dora: bool) -> Result<i64> {
    let c = config(opts)?;
    let r = c.lora_rank;
    for (path, lin) in vit.linears_mut() {
        let short = path.rsplit('.').next().unwrap_or(&path);
        // q/k/v: LoRA on the fused qkv whose update is restricted to those thirds of the output. The
        // factors keep PEFT's qkv shapes (masked rows of B stay exactly zero), so the file is a valid
        // HF PEFT `qkv` adapter.
        let row_mask = if short == "qkv" { qkv_row_mask(&c, lin.out_dim(), p.device()) } else { None };
        if !c.lora_targets.iter().any(|t| t == short) && row_mask.is_none() {
            continue;
        }
        let lp = super::sub_path(p, &path);
        let (in_dim, out_dim) = (lin.in_dim(), lin.out_dim());
        let a = (&lp / "lora_A").var("weight", &[r, in_dim], kaiming_uniform_a5(in_dim));
        let b = (&lp / "lora_B").var("weight", &[out_dim, r], Init::Const(0.0));
        // DoRA's magnitude starts at the row norms of W (B = 0), so the output is unchanged.
        let magnitude = dora.then(|| {
            let norm =
                tch::no_grad(|| lin.weight().to_kind(Kind::Float).norm_scalaropt_dim(2, [1i64].as_slice(), false));
            lp.var_copy("lora_magnitude_vector", &norm)
        });
        let scale = c.lora_alpha / r as f64;
        lin.add_hook(Box::new(LoraHook { a, b, scale, dropout: c.lora_dropout, magnitude, row_mask }));
    }
    Ok(0)
}

/// W' = W + scale B A (LoRA), W' = m / ||W + scale B A||_row * (W + scale B A) (DoRA).
fn merge(vit: &mut Vit) -> Result<()> {
    let _g = tch::no_grad_guard();
    for (_, lin) in vit.linears_mut() {
        for l in lin.take_hooks::<LoraHook>() {
            let w = lin.weight().to_kind(Kind::Float) + l.delta();
            let w = match &l.magnitude {
                None => w,
                Some(m) => {
                    let n = w.norm_scalaropt_dim(2, [1i64].as_slice(), true);
                    w * (m.unsqueeze(1) / n)
                }
            };
            lin.weight().shallow_clone().copy_(&w.to_kind(lin.weight().kind()));
        }
    }
    Ok(())
}

/// HF PEFT's LoRA config (q/k/v targeting is stored as PEFT's fused `qkv`; the other rows of B are zero).
fn peft_config(opts: &Options, dora: bool, has_head: bool) -> Option<Value> {
    let c = config(opts).ok()?;
    let mut modules: Vec<String> = Vec::new();
    for t in &c.lora_targets {
        let m = if matches!(t.as_str(), "q" | "k" | "v") { "qkv".to_string() } else { t.clone() };
        if !modules.contains(&m) {
            modules.push(m);
        }
    }
    Some(json!({
        "peft_type": "LORA",
        "r": c.lora_rank,
        "lora_alpha": c.lora_alpha,
        "lora_dropout": c.lora_dropout,
        "target_modules": modules,
        "use_dora": dora,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "use_rslora": false,
        "inference_mode": true,
        "modules_to_save": if has_head { json!(["head"]) } else { json!(null) },
        "task_type": null,
        "base_model_name_or_path": null,
        "revision": null,
    }))
}

/// The spec of an HF PEFT LoRA adapter_config.json.
fn from_peft_config(v: &Value) -> Option<Result<PeftSpec>> {
    if v["peft_type"] != "LORA" {
        return None;
    }
    Some((|| {
        let targets: Vec<String> = match &v["target_modules"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
            _ => bail!("target_modules missing"),
        };
        // PEFT accepts module paths ("attn.qkv") as well as leaf names ("qkv").
        let targets: Vec<String> = targets.iter().map(|t| t.rsplit('.').next().unwrap_or(t).to_string()).collect();
        let nonempty = |k: &str| v[k].as_object().is_some_and(|o| !o.is_empty());
        if v["use_rslora"].as_bool().unwrap_or(false) || nonempty("rank_pattern") || nonempty("alpha_pattern") {
            bail!("rsLoRA and per-layer rank/alpha patterns are not supported");
        }
        let method = if v["use_dora"].as_bool().unwrap_or(false) { Method::DORA } else { Method::LORA };
        let opts = Options::from_pairs([
            ("lora_rank", json!(v["r"].as_i64().ok_or_else(|| anyhow!("'r' missing"))?)),
            ("lora_alpha", json!(v["lora_alpha"].as_f64().unwrap_or(8.0))),
            ("lora_dropout", json!(v["lora_dropout"].as_f64().unwrap_or(0.0))),
            ("lora_targets", json!(targets)),
        ]);
        PeftSpec::new(vec![method], &opts)
    })())
}

impl PeftMethod for Lora {
    fn name(&self) -> &'static str {
        if self.dora { Method::DORA.0 } else { Method::LORA.0 }
    }
    fn options(&self, given: &Options) -> Result<Options> {
        given.normalised::<LoraConfig>()
    }
    fn validate(&self, opts: &Options) -> Result<()> {
        validate(opts)
    }
    fn incompatible(&self) -> &'static [(&'static str, &'static str)] {
        if self.dora { &[] } else { &[("dora", "both adapt the same weights; DoRA is a LoRA variant, pick one")] }
    }
    fn no_weight_decay(&self) -> &'static [&'static str] {
        &["lora_magnitude_vector"]
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path, opts: &Options) -> Result<i64> {
        attach(vit, p, opts, self.dora)
    }
    fn merge(&self, vit: &mut Vit) -> Result<()> {
        merge(vit)
    }
    fn hf_peft_config(&self, opts: &Options, has_head: bool) -> Option<Value> {
        peft_config(opts, self.dora, has_head)
    }
    fn read_hf_peft_config(&self, cfg: &Value) -> Option<Result<PeftSpec>> {
        from_peft_config(cfg)
    }
}
