//! BitFit (Ben Zaken et al. 2022): every bias of the blocks (linears and LayerNorms) and of the final norm
//! is trained. The target store holds copies under the backbone's own names; merging writes them back.
use super::{Method, Options, PeftMethod};
use crate::backbone::Vit;
use anyhow::Result;
use tch::{Kind, Tensor, nn};

impl Method {
    /// BitFit.
    pub const BITFIT: Method = Method("bitfit");
}

/// The method.
pub struct BitFit;

/// A trainable copy of `bias` under `<path>.bias` in the target store.
fn copy(p: &nn::Path, path: &str, bias: &Tensor, replaced: &mut i64) -> Tensor {
    let copy = tch::no_grad(|| bias.to_kind(Kind::Float).copy());
    *replaced += copy.numel() as i64;
    super::sub_path(p, path).var_copy("bias", &copy)
}

impl PeftMethod for BitFit {
    fn name(&self) -> &'static str {
        Method::BITFIT.0
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path, _opts: &Options) -> Result<i64> {
        let mut replaced = 0;
        for (path, n) in vit.norms_mut() {
            let b = copy(p, &path, n.bias(), &mut replaced);
            n.set_bias(b);
        }
        for (path, lin) in vit.linears_mut() {
            if let Some(b) = lin.bias() {
                let b = copy(p, &path, b, &mut replaced);
                lin.set_bias(b);
            }
        }
        Ok(replaced)
    }
    /// The trained biases become the backbone's: exact. (The merged model keeps the target tensors as its
    /// biases; exporting writes their values.)
    fn merge(&self, _vit: &mut Vit) -> Result<()> {
        Ok(())
    }
}
