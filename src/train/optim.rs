//! AdamW (decoupled weight decay, PyTorch's formula) over an explicit list of named tensors, with
//! per-parameter decay (none on biases, norms, prompts, LoRA magnitudes, tokens) and a state that can be
//! saved and restored exactly (for `--resume`). Frozen tensors are never handed to it.
use anyhow::{Result, anyhow};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void};
use std::path::Path;
use tch::{Kind, Tensor};

unsafe extern "C" {
    fn tpp_grad_reset(tensor: *mut c_void) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn tpp_fused_adamw(
        params: *mut *mut c_void,
        grads: *mut *mut c_void,
        exp_avgs: *mut *mut c_void,
        exp_avg_sqs: *mut *mut c_void,
        n: usize,
        lr: f64,
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        eps: f64,
        step: i64,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
}

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

    /// Clears the gradients (undefined, as PyTorch's `zero_grad(set_to_none=True)`): the next backward
    /// writes them afresh instead of adding into zeroed tensors, which saves a fill and an add per
    /// parameter per step.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            // SAFETY: the shim takes an at::Tensor* and catches every C++ exception.
            let rc = unsafe { tpp_grad_reset(p.t.as_ptr() as *mut c_void) };
            assert_eq!(rc, 0, "libtorch could not reset the gradient of '{}'", p.name);
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

    /// One AdamW step at learning rate `lr`: libtorch's fused kernel over each group of parameters that
    /// share a learning rate and a weight decay (fp32 parameters; others take the per-tensor path, the
    /// same formula).
    pub fn step(&mut self, lr: f64) {
        let _g = tch::no_grad_guard();
        self.step += 1;
        let c = self.cfg;
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.t.grad()).collect();
        // Groups by (decay, lr scale): the fused kernel takes one learning rate and one decay per call.
        let mut groups: Vec<(bool, f64, Vec<usize>)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            if p.t.kind() != Kind::Float || !grads[i].defined() {
                continue;
            }
            match groups.iter_mut().find(|(d, s, _)| *d == p.decay && *s == p.lr_scale) {
                Some(g) => g.2.push(i),
                None => groups.push((p.decay, p.lr_scale, vec![i])),
            }
        }
        for (decay, scale, idx) in &groups {
            let ptr = |t: &Tensor| t.as_ptr() as *mut c_void;
            let mut pp: Vec<*mut c_void> = idx.iter().map(|&i| ptr(&self.params[i].t)).collect();
            let mut gp: Vec<*mut c_void> = idx.iter().map(|&i| ptr(&grads[i])).collect();
            let mut mp: Vec<*mut c_void> = idx.iter().map(|&i| ptr(&self.params[i].m)).collect();
            let mut vp: Vec<*mut c_void> = idx.iter().map(|&i| ptr(&self.params[i].v)).collect();
            let wd = if *decay { c.weight_decay } else { 0.0 };
            let mut err = vec![0u8; 512];
            // SAFETY: every pointer is an at::Tensor* alive for the call (`self.params`, `grads`); the
            // shim catches every C++ exception.
            let rc = unsafe {
                tpp_fused_adamw(
                    pp.as_mut_ptr(),
                    gp.as_mut_ptr(),
                    mp.as_mut_ptr(),
                    vp.as_mut_ptr(),
                    idx.len(),
                    lr * scale,
                    c.beta1,
                    c.beta2,
                    wd,
                    c.eps,
                    self.step,
                    err.as_mut_ptr().cast(),
                    err.len(),
                )
            };
            let msg = String::from_utf8_lossy(&err[..err.iter().position(|&b| b == 0).unwrap_or(err.len())]);
            assert_eq!(rc, 0, "libtorch's fused AdamW failed: {msg}");
        }
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for (p, g) in self.params.iter_mut().zip(&grads) {
            if !g.defined() || p.t.kind() == Kind::Float {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// PyTorch's AdamW (torch.optim.AdamW, decoupled decay) on one scalar, in f64.
    fn reference(mut p: f64, grads: &[f64], lr: f64, c: AdamWConfig, decay: bool) -> f64 {
        let (mut m, mut v) = (0.0, 0.0);
        for (t, g) in grads.iter().enumerate() {
            let t = t as i32 + 1;
            if decay {
                p *= 1.0 - lr * c.weight_decay;
            }
            m = c.beta1 * m + (1.0 - c.beta1) * g;
            v = c.beta2 * v + (1.0 - c.beta2) * g * g;
            let denom = (v / (1.0 - c.beta2.powi(t))).sqrt() + c.eps;
            p -= lr / (1.0 - c.beta1.powi(t)) * m / denom;
        }
        p
    }

    /// The fused groups (decayed matrix, undecayed bias, a scaled learning rate) and the per-tensor path
    /// (a bf16 parameter) follow PyTorch's formula step for step; cleared gradients are undefined.
    #[test]
    fn fused_adamw_matches_the_formula() {
        let c = AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.05 };
        let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).reshape([2, 2]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.1f32, -0.2]).set_requires_grad(true);
        let s = Tensor::from_slice(&[1.0f32, 3.0]).set_requires_grad(true);
        let h = Tensor::from_slice(&[0.5f32, 1.5]).to_kind(Kind::BFloat16).set_requires_grad(true);
        let named = vec![
            ("blocks.0.attn.qkv.weight".to_string(), w.shallow_clone()),
            ("blocks.0.attn.qkv.bias".to_string(), b.shallow_clone()),
            ("blocks.1.norm1.weight".to_string(), s.shallow_clone()),
            ("head.bias".to_string(), h.shallow_clone()),
        ];
        let mut opt = AdamW::new(named, c);
        opt.set_lr_scales(|n| if n.starts_with("blocks.1") { 0.5 } else { 1.0 });
        let x = Tensor::from_slice(&[1.0f32, -2.0]);
        let start: Vec<Vec<f32>> = [&w, &b, &s, &h]
            .iter()
            .map(|t| Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap())
            .collect();
        let mut grads: Vec<Vec<Vec<f32>>> = vec![Vec::new(); 4];
        let lr = 1e-2;
        for step in 0..5 {
            // Gradients that change from step to step: d/dp of sum(p * x * k).
            let k = 1.0 + step as f64;
            let loss = (w.matmul(&x) * k).sum(Kind::Float)
                + (&b * (2.0 * k)).sum(Kind::Float)
                + (&s * &s).sum(Kind::Float)
                + (h.to_kind(Kind::Float) * k).sum(Kind::Float);
            loss.backward();
            for (i, t) in [&w, &b, &s, &h].iter().enumerate() {
                grads[i].push(Vec::<f32>::try_from(t.grad().to_kind(Kind::Float).flatten(0, -1)).unwrap());
            }
            opt.step(lr);
            opt.zero_grad();
            assert!(!w.grad().defined() && !h.grad().defined(), "gradients cleared to undefined");
        }
        for (i, (t, decay, scale, tol)) in
            [(&w, true, 1.0, 1e-6), (&b, false, 1.0, 1e-6), (&s, false, 0.5, 1e-6), (&h, false, 1.0, 1e-2)]
                .into_iter()
                .enumerate()
        {
            let got = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap();
            for (j, g) in got.iter().enumerate() {
                let gs: Vec<f64> = grads[i].iter().map(|s| f64::from(s[j])).collect();
                let want = reference(f64::from(start[i][j]), &gs, lr * scale, c, decay);
                assert!((f64::from(*g) - want).abs() < tol * want.abs().max(1.0), "tensor {i}[{j}]: {g} vs {want}");
            }
        }
        assert_eq!(opt.step, 5);
    }
}
