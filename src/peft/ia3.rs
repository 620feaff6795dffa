//! IA³ (Liu et al. 2022): learned vectors that rescale the keys and values of attention and the MLP's
//! hidden activations; initialised at 1, so the model starts unchanged, and folded exactly into the
//! weights by a merge.
//!
//! Stored as HF PEFT's IA³ adapter for timm's module names (`target_modules = ["qkv", "fc2"]`,
//! `feedforward_modules = ["fc2"]`): `blocks.N.attn.qkv.ia3_l` [3D, 1] scales the fused qkv output (bias
//! included), and `blocks.N.mlp.fc2.ia3_l` [1, H] scales fc2's input, the MLP's hidden activations. Of the
//! qkv vector only the key and value thirds train; the query third starts at 1 and gets no gradient, and
//! is applied as stored, so an adapter written by PEFT that scales queries too gives PEFT's outputs.
use super::{Method, Options, PeftMethod, PeftSpec};
use crate::backbone::{LayerHook, LayerWeights, Vit};
use anyhow::Result;
use serde_json::{Value, json};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

impl Method {
    /// IA³.
    pub const IA3: Method = Method("ia3");
}

/// The method.
pub struct Ia3;

/// A scaling vector on one linear: of its output ([out, 1], `mask` selecting the rows that train) or, for
/// a feed-forward layer, of its input ([1, in]).
#[derive(Debug)]
struct Ia3Hook {
    l: Tensor,
    /// [out, 1] of 0/1: rows whose scale trains (keys and values of the fused qkv).
    mask: Option<Tensor>,
    feedforward: bool,
}

impl Ia3Hook {
    /// The vector, flattened, with the gradient kept off the rows outside the mask.
    fn scale(&self) -> Tensor {
        let l = match &self.mask {
            Some(m) => &self.l * m + self.l.detach() * (1.0 - m),
            None => self.l.shallow_clone(),
        };
        l.flatten(0, -1)
    }
}

impl LayerHook for Ia3Hook {
    fn nesting(&self) -> usize {
        Method::IA3.rank()
    }

    fn forward(&self, _layer: LayerWeights<'_>, x: &Tensor, inner: &dyn Fn(&Tensor) -> Tensor, _train: bool) -> Tensor {
        if self.feedforward { inner(&(x * self.scale())) } else { inner(x) * self.scale() }
    }
}

impl PeftMethod for Ia3 {
    fn name(&self) -> &'static str {
        Method::IA3.0
    }

    fn no_weight_decay(&self) -> &'static [&'static str] {
        &["ia3_l"]
    }

    fn attach(&self, vit: &mut Vit, p: &nn::Path, _opts: &Options) -> Result<i64> {
        for (path, lin) in vit.linears_mut() {
            let q = super::sub_path(p, &path);
            let hook = if path.ends_with("attn.qkv") {
                let out = lin.out_dim();
                let mut m = vec![1f32; out as usize];
                m[..(out / 3) as usize].fill(0.0);
                let mask = Tensor::from_slice(&m).reshape([out, 1]).to_device(p.device());
                Ia3Hook { l: q.var("ia3_l", &[out, 1], Init::Const(1.0)), mask: Some(mask), feedforward: false }
            } else if path.ends_with("mlp.fc2") {
                Ia3Hook { l: q.var("ia3_l", &[1, lin.in_dim()], Init::Const(1.0)), mask: None, feedforward: true }
            } else {
                continue;
            };
            lin.add_hook(Box::new(hook));
        }
        Ok(0)
    }

    fn fixed_parameters(&self, vit: &Vit) -> i64 {
        vit.depth() as i64 * vit.config().embed_dim
    }

    /// Output scaling: W' = diag(l) W, b' = l b; input scaling: W' = W diag(l).
    fn merge(&self, vit: &mut Vit) -> Result<()> {
        let _g = tch::no_grad_guard();
        for (_, lin) in vit.linears_mut() {
            for h in lin.take_hooks::<Ia3Hook>() {
                let w = lin.weight();
                let l = h.l.to_kind(Kind::Float);
                w.shallow_clone().copy_(&(w.to_kind(Kind::Float) * &l).to_kind(w.kind()));
                if let (false, Some(b)) = (h.feedforward, lin.bias()) {
                    b.shallow_clone().copy_(&(b.to_kind(Kind::Float) * l.flatten(0, -1)).to_kind(b.kind()));
                }
            }
        }
        Ok(())
    }

    fn hf_peft_config(&self, _opts: &Options, has_head: bool) -> Option<Value> {
        Some(json!({
            "peft_type": "IA3",
            "target_modules": ["fc2", "qkv"],
            "feedforward_modules": ["fc2"],
            "fan_in_fan_out": false,
            "init_ia3_weights": true,
            "inference_mode": true,
            "modules_to_save": if has_head { json!(["head"]) } else { json!(null) },
            "task_type": null,
            "base_model_name_or_path": null,
            "revision": null,
        }))
    }

    fn read_hf_peft_config(&self, cfg: &Value) -> Option<Result<PeftSpec>> {
        if cfg["peft_type"] != "IA3" {
            return None;
        }
        // Module names as PEFT accepts them: leaf names or paths, a list or one string.
        let leaves = |k: &str| -> Vec<String> {
            let mut v: Vec<String> = match &cfg[k] {
                Value::String(s) => vec![s.clone()],
                Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect(),
                _ => vec![],
            };
            v = v.iter().map(|t| t.rsplit('.').next().unwrap_or(t).to_string()).collect();
            v.sort();
            v
        };
        if leaves("target_modules") != ["fc2", "qkv"] || leaves("feedforward_modules") != ["fc2"] {
            return Some(Err(anyhow::anyhow!(
                "IA3 with target_modules {:?} and feedforward_modules {:?} is not supported (tpp's IA³ scales \
                 qkv's output and fc2's input: target_modules [\"qkv\", \"fc2\"], feedforward_modules [\"fc2\"])",
                leaves("target_modules"),
                leaves("feedforward_modules")
            )));
        }
        if cfg["fan_in_fan_out"].as_bool().unwrap_or(false) {
            return Some(Err(anyhow::anyhow!("IA3 with fan_in_fan_out is not supported")));
        }
        Some(PeftSpec::new(vec![Method::IA3], &Options::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_configs_other_than_qkv_and_fc2_are_refused() {
        let ok = json!({"peft_type": "IA3", "target_modules": ["qkv", "attn.fc2"], "feedforward_modules": "fc2"});
        assert_eq!(Ia3.read_hf_peft_config(&ok).unwrap().unwrap().methods, [Method::IA3]);
        let other = json!({"peft_type": "IA3", "target_modules": ["qkv", "fc1"], "feedforward_modules": ["fc1"]});
        let e = Ia3.read_hf_peft_config(&other).unwrap().unwrap_err().to_string();
        assert!(e.contains("not supported") && e.contains("fc1"), "{e}");
    }
}
