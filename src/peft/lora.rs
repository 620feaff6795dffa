//! LoRA (Hu et al. 2021) and its weight-decomposed variant DoRA (Liu et al. 2024), on any of the block
//! linears `qkv`, `proj`, `fc1`, `fc2`. A is Kaiming-uniform, B zero, so the model starts unchanged.
use super::{Method, PeftMethod, PeftSpec, block_linears, kaiming_uniform_a5};
use crate::backbone::Vit;
use crate::backbone::vit::Lora;
use anyhow::Result;
use tch::Tensor;
use tch::nn::{self, Init};

pub struct LoraMethod {
    pub spec: PeftSpec,
    pub dora: bool,
}

impl PeftMethod for LoraMethod {
    fn method(&self) -> Method {
        if self.dora { Method::Dora } else { Method::Lora }
    }

    fn attach(&self, vit: &mut Vit, p: &nn::Path) -> Result<i64> {
        let r = self.spec.lora_rank;
        for (i, blk) in vit.blocks.iter_mut().enumerate() {
            for (name, lin) in block_linears(blk) {
                let short = name.rsplit('.').next().unwrap_or(name);
                let has = |t: &str| self.spec.lora_targets.iter().any(|x| x == t);
                // q/k/v: LoRA on the fused qkv whose update is restricted to those thirds of the output. The
                // factors keep PEFT's qkv shapes (masked rows of B stay exactly zero), so the file is a
                // valid HF PEFT `qkv` adapter.
                let parts: Vec<usize> =
                    ["q", "k", "v"].iter().enumerate().filter(|(_, p)| has(p)).map(|(i, _)| i).collect();
                let row_mask = if short == "qkv" && !has("qkv") && !parts.is_empty() {
                    let d = lin.out_dim() / 3;
                    let mut m = vec![0f32; (3 * d) as usize];
                    for &i in &parts {
                        m[i * d as usize..(i + 1) * d as usize].fill(1.0);
                    }
                    Some(Tensor::from_slice(&m).reshape([3 * d, 1]).to_device(p.device()))
                } else {
                    None
                };
                if !has(short) && row_mask.is_none() {
                    continue;
                }
                let lp = super::sub_path(&(p / "blocks" / i), name);
                let (in_dim, out_dim) = (lin.in_dim(), lin.out_dim());
                let a = (&lp / "lora_A").var("weight", &[r, in_dim], kaiming_uniform_a5(in_dim));
                let b = (&lp / "lora_B").var("weight", &[out_dim, r], Init::Const(0.0));
                // DoRA's magnitude starts at the row norms of W (B = 0), so the output is unchanged.
                let magnitude = self.dora.then(|| {
                    let norm = tch::no_grad(|| {
                        lin.weight.to_kind(tch::Kind::Float).norm_scalaropt_dim(2, [1i64].as_slice(), false)
                    });
                    lp.var_copy("lora_magnitude_vector", &norm)
                });
                lin.lora = Some(Lora {
                    a,
                    b,
                    scale: self.spec.lora_alpha / r as f64,
                    dropout: self.spec.lora_dropout,
                    magnitude,
                    row_mask,
                });
            }
        }
        Ok(0)
    }

    /// W' = W + scale B A (LoRA), W' = m / ||W + scale B A||_row * (W + scale B A) (DoRA).
    fn merge(&self, vit: &mut Vit) -> Result<()> {
        let _g = tch::no_grad_guard();
        for blk in vit.blocks.iter_mut() {
            for (_, lin) in block_linears(blk) {
                if let Some(l) = lin.lora.take() {
                    let w = lin.weight.to_kind(tch::Kind::Float) + l.delta();
                    let w = match &l.magnitude {
                        None => w,
                        Some(m) => {
                            let n = w.norm_scalaropt_dim(2, [1i64].as_slice(), true);
                            w * (m.unsqueeze(1) / n)
                        }
                    };
                    lin.weight.copy_(&w.to_kind(lin.weight.kind()));
                }
            }
        }
        Ok(())
    }
}
