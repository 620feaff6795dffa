//! SSF (Lian et al. 2022): a learnable per-channel scale (init 1) and shift (init 0) after every linear and
//! LayerNorm of the blocks and after the final norm. Folds exactly into the preceding op's weight and bias.
use super::{Method, PeftMethod, block_linears};
use crate::backbone::Vit;
use crate::backbone::vit::{LayerNorm, Ssf};
use anyhow::Result;
use tch::nn::{self, Init};

pub struct SsfMethod;

fn make(p: &nn::Path, dim: i64) -> Ssf {
    Ssf { scale: p.var("ssf_scale", &[dim], Init::Const(1.0)), shift: p.var("ssf_shift", &[dim], Init::Const(0.0)) }
}

fn fold_norm(n: &mut LayerNorm) {
    if let Some(s) = n.ssf.take() {
        let w = &n.weight * &s.scale;
        let b = &n.bias * &s.scale + &s.shift;
        n.weight.copy_(&w.to_kind(n.weight.kind()));
        n.bias.copy_(&b.to_kind(n.bias.kind()));
    }
}

impl PeftMethod for SsfMethod {
    fn method(&self) -> Method {
        Method::Ssf
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path) -> Result<i64> {
        let d = vit.cfg.embed_dim;
        for (i, blk) in vit.blocks.iter_mut().enumerate() {
            let bp = p / "blocks" / i;
            blk.norm1.ssf = Some(make(&(&bp / "norm1"), d));
            blk.norm2.ssf = Some(make(&(&bp / "norm2"), d));
            for (name, lin) in block_linears(blk) {
                lin.ssf = Some(make(&super::sub_path(&bp, name), lin.out_dim()));
            }
        }
        if let Some(n) = vit.norm.as_mut() {
            n.ssf = Some(make(&(p / "norm"), d));
        }
        Ok(0)
    }

    /// W' = diag(s) W, b' = s b + t for linears; LayerNorm weight and bias likewise.
    fn merge(&self, vit: &mut Vit) -> Result<()> {
        let _g = tch::no_grad_guard();
        for blk in vit.blocks.iter_mut() {
            fold_norm(&mut blk.norm1);
            fold_norm(&mut blk.norm2);
            for (_, lin) in block_linears(blk) {
                if let Some(s) = lin.ssf.take() {
                    let w = &lin.weight * s.scale.unsqueeze(1);
                    lin.weight.copy_(&w.to_kind(lin.weight.kind()));
                    match lin.bias.as_mut() {
                        Some(b) => {
                            let nb = &*b * &s.scale + &s.shift;
                            b.copy_(&nb.to_kind(b.kind()));
                        }
                        // A bias-free linear gains the shift as its bias.
                        None => lin.bias = Some(s.shift.detach().copy()),
                    }
                }
            }
        }
        if let Some(n) = vit.norm.as_mut() {
            fold_norm(n);
        }
        Ok(())
    }
}
