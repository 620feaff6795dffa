//! BitFit (Ben Zaken et al. 2022): every bias of the blocks (linears and LayerNorms) and of the final norm
//! is trained. The target store holds copies under the backbone's own names; merging writes them back.
use super::{Method, PeftMethod};
use crate::backbone::Vit;
use anyhow::Result;
use tch::Tensor;
use tch::nn;

pub struct BitFit;

/// Every (timm path, bias handle) BitFit trains.
fn biases(vit: &mut Vit) -> Vec<(String, &mut Tensor)> {
    let mut out: Vec<(String, &mut Tensor)> = Vec::new();
    for (i, blk) in vit.blocks.iter_mut().enumerate() {
        let crate::backbone::vit::Block { norm1, norm2, attn, mlp, .. } = blk;
        out.push((format!("blocks.{i}.norm1.bias"), &mut norm1.bias));
        out.push((format!("blocks.{i}.norm2.bias"), &mut norm2.bias));
        let linears = [
            ("attn.qkv", &mut attn.qkv),
            ("attn.proj", &mut attn.proj),
            ("mlp.fc1", &mut mlp.fc1),
            ("mlp.fc2", &mut mlp.fc2),
        ];
        for (name, lin) in linears {
            if let Some(b) = lin.bias.as_mut() {
                out.push((format!("blocks.{i}.{name}.bias"), b));
            }
        }
    }
    if let Some(n) = vit.norm.as_mut() {
        out.push(("norm.bias".into(), &mut n.bias));
    }
    out
}

impl PeftMethod for BitFit {
    fn method(&self) -> Method {
        Method::Bitfit
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path) -> Result<i64> {
        let mut replaced = 0;
        for (name, b) in biases(vit) {
            let q = super::sub_path(p, name.trim_end_matches(".bias"));
            let copy = tch::no_grad(|| b.to_kind(tch::Kind::Float).copy());
            replaced += copy.numel() as i64;
            *b = q.var_copy("bias", &copy);
        }
        Ok(replaced)
    }
    /// The trained biases become the backbone's: exact. (The merged model keeps the target tensors as its
    /// biases; exporting writes their values.)
    fn merge(&self, _vit: &mut Vit) -> Result<()> {
        Ok(())
    }
}
