//! AdamW (decoupled weight decay, PyTorch's formula) over an explicit list of named tensors, with
//! per-parameter decay (none on biases, norms, prompts, LoRA magnitudes, tokens) and a state that can be
//! saved and restored exactly (for `--resume`). Frozen tensors are never handed to it.
use anyhow::{Result, anyhow};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Tensor};

/// AdamW's settings.
#[derive(Debug, Clone, Copy)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay (on the parameters that decay).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.05 }
    }
}

struct Param {
    name: String,
    t: Tensor,
    decay: bool,
    lr_scale: f64,
    m: Tensor,
    v: Tensor,
}

/// AdamW over a list of named tensors.
pub struct AdamW {
    /// Its settings.
    pub cfg: AdamWConfig,
    params: Vec<Param>,
    /// Updates done.
    pub step: i64,
}

/// Whether a parameter gets weight decay: only matrices (and conv kernels) of weights, as timm's
/// `param_groups_weight_decay` and MAE do; no decay on 1-D tensors (biases, norms, LayerScale, DoRA
/// magnitudes, SSF factors), nor on what the backbone, the pretext heads and the PEFT methods declare
/// (tokens, position embeddings, the MAE mask token, prompts, IA³ vectors).
pub fn decays(name: &str, t: &Tensor) -> bool {
    t.dim() >= 2
        && !crate::backbone::NO_WEIGHT_DECAY.iter().any(|n| name.contains(n))
        && !crate::pretext::NO_WEIGHT_DECAY.iter().any(|n| name.contains(n))
        && !crate::peft::no_weight_decay(name)
}

impl AdamW {
    /// AdamW over `named` (weight decay as [`decays`] decides).
    pub fn new(named: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Self {
        let params = named
            .into_iter()
            .map(|(name, t)| {
                let decay = decays(&name, &t);
                let m = t.zeros_like().to_kind(Kind::Float);
                let v = t.zeros_like().to_kind(Kind::Float);
                Param { name, t, decay, lr_scale: 1.0, m, v }
            })
            .collect();
        AdamW { cfg, params, step: 0 }
    }

    /// Per-parameter learning-rate multipliers (layer-wise decay).
    pub fn set_lr_scales(&mut self, f: impl Fn(&str) -> f64) {
        for p in &mut self.params {
            p.lr_scale = f(&p.name);
        }
    }

    /// The optimised tensors (their gradients are what data-parallel training averages).
    pub fn tensors(&self) -> impl Iterator<Item = &Tensor> {
        self.params.iter().map(|p| &p.t)
    }

    /// Zeroes the gradients.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.t.grad();
            if g.defined() {
                let _ = g.detach_();
                let _ = g.zero_();
            }
        }
    }

    /// Scales gradients so their global L2 norm is at most `max_norm`; returns the norm before clipping
    /// (a 0-dim tensor: no host synchronisation).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        let _g = tch::no_grad_guard();
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.t.grad()).filter(|g| g.defined()).collect();
        if grads.is_empty() {
            return Tensor::from(0f32);
        }
        let norms: Vec<Tensor> = grads.iter().map(|g| g.to_kind(Kind::Float).norm().unsqueeze(0)).collect();
        let total = Tensor::cat(&norms, 0).norm();
        let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
        for mut g in grads {
            let _ = g.g_mul_(&coef.to_kind(g.kind()));
        }
        total
    }

    /// One AdamW step at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for p in &mut self.params {
            let g = p.t.grad();
            if !g.defined() {
                continue;
            }
            let g = g.to_kind(Kind::Float);
            let lr = lr * p.lr_scale;
            if p.decay && c.weight_decay > 0.0 {
                let _ = p.t.g_mul_scalar_(1.0 - lr * c.weight_decay);
            }
            let _ = p.m.lerp_(&g, 1.0 - c.beta1);
            let _ = p.v.g_mul_scalar_(c.beta2);
            let _ = p.v.addcmul_(&(&g * (1.0 - c.beta2)), &g);
            let denom = p.v.sqrt() / bc2.sqrt() + c.eps;
            let upd = (&p.m / denom) * (lr / bc1);
            let _ = p.t.g_sub_(&upd.to_kind(p.t.kind()));
        }
    }

    /// Optimiser state (moments and step) as named tensors, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("step".to_string(), Tensor::from(self.step))];
        for p in &self.params {
            out.push((format!("m.{}", p.name), p.m.to_device(tch::Device::Cpu)));
            out.push((format!("v.{}", p.name), p.v.to_device(tch::Device::Cpu)));
        }
        out
    }

    /// Restores what [`AdamW::state`] saved; `file` names the source in errors.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, file: &Path) -> Result<()> {
        let step = state.get("step").ok_or_else(|| anyhow!("{}: optimiser step missing", file.display()))?;
        for p in &self.params {
            for (prefix, dst) in [("m", &p.m), ("v", &p.v)] {
                let k = format!("{prefix}.{}", p.name);
                let src = state.get(&k).ok_or_else(|| anyhow!("{}: optimiser state '{k}' missing", file.display()))?;
                crate::backbone::checkpoint::copy_checked(dst, src, file, &format!("optimiser state '{k}'"))?;
            }
        }
        self.step = step.int64_value(&[]);
        Ok(())
    }
}
