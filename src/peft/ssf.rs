//! SSF (Lian et al. 2022): a learnable per-channel scale (init 1) and shift (init 0) after every linear and
//! LayerNorm of the blocks and after the final norm. Folds exactly into the preceding op's weight and bias.
use super::{Method, Options, PeftMethod};
use crate::backbone::{LayerHook, LayerWeights, Vit};
use anyhow::Result;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

impl Method {
    /// SSF.
    pub const SSF: Method = Method("ssf");
}

/// The method.
pub struct Ssf;

/// Scale and shift of one layer's output.
#[derive(Debug)]
struct SsfHook {
    scale: Tensor,
    shift: Tensor,
}

impl LayerHook for SsfHook {
    fn nesting(&self) -> usize {
        Method::SSF.rank()
    }

    fn forward(&self, _layer: LayerWeights<'_>, x: &Tensor, inner: &dyn Fn(&Tensor) -> Tensor, _train: bool) -> Tensor {
        inner(x) * &self.scale + &self.shift
    }
}

fn make(p: &nn::Path, path: &str, dim: i64) -> Box<SsfHook> {
    let q = super::sub_path(p, path);
    Box::new(SsfHook {
        scale: q.var("ssf_scale", &[dim], Init::Const(1.0)),
        shift: q.var("ssf_shift", &[dim], Init::Const(0.0)),
    })
}

/// `t.copy_(v)` in `t`'s dtype.
fn assign(t: &Tensor, v: &Tensor) {
    t.shallow_clone().copy_(&v.to_kind(t.kind()));
}

impl PeftMethod for Ssf {
    fn name(&self) -> &'static str {
        Method::SSF.0
    }
    fn no_weight_decay(&self) -> &'static [&'static str] {
        &["ssf_"]
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path, _opts: &Options) -> Result<i64> {
        for (path, n) in vit.norms_mut() {
            let dim = n.dim();
            n.add_hook(make(p, &path, dim));
        }
        for (path, lin) in vit.linears_mut() {
            let dim = lin.out_dim();
            lin.add_hook(make(p, &path, dim));
        }
        Ok(0)
    }

    /// W' = diag(s) W, b' = s b + t for linears; LayerNorm weight and bias likewise.
    fn merge(&self, vit: &mut Vit) -> Result<()> {
        let _g = tch::no_grad_guard();
        for (_, n) in vit.norms_mut() {
            for s in n.take_hooks::<SsfHook>() {
                assign(n.weight(), &(n.weight() * &s.scale));
                assign(n.bias(), &(n.bias() * &s.scale + &s.shift));
            }
        }
        for (_, lin) in vit.linears_mut() {
            for s in lin.take_hooks::<SsfHook>() {
                assign(lin.weight(), &(lin.weight() * s.scale.unsqueeze(1)));
                match lin.bias() {
                    Some(b) => assign(b, &(b * &s.scale + &s.shift)),
                    // A bias-free linear gains the shift as its bias.
                    None => lin.set_bias(s.shift.detach().to_kind(Kind::Float).copy()),
                }
            }
        }
        Ok(())
    }
}
