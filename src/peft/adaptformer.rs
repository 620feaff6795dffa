//! AdaptFormer (Chen et al. 2022): a bottleneck (down, ReLU, up, scale) parallel to each block's MLP, fed
//! the residual stream; the up-projection starts at zero.
use super::{Method, PeftMethod, PeftSpec, kaiming_uniform_a5};
use crate::backbone::Vit;
use crate::backbone::vit::Adapter;
use anyhow::Result;
use tch::nn;

pub struct AdaptFormer {
    pub spec: PeftSpec,
}

/// A zero-output bottleneck adapter under `p` (`down_proj`, `up_proj`), shared with Houlsby.
pub fn bottleneck(p: &nn::Path, dim: i64, hidden: i64, scale: f64, gelu: bool) -> Adapter {
    let lin = |name: &str, i: i64, o: i64, init: nn::Init| {
        let q = p / name;
        crate::backbone::vit::Linear {
            weight: q.var("weight", &[o, i], init),
            bias: Some(q.var("bias", &[o], nn::Init::Const(0.0))),
            lora: None,
            ssf: None,
        }
    };
    Adapter {
        down: lin("down_proj", dim, hidden, kaiming_uniform_a5(dim)),
        up: lin("up_proj", hidden, dim, nn::Init::Const(0.0)),
        scale,
        gelu,
    }
}

impl PeftMethod for AdaptFormer {
    fn method(&self) -> Method {
        Method::Adaptformer
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path) -> Result<i64> {
        let d = vit.cfg.embed_dim;
        for (i, blk) in vit.blocks.iter_mut().enumerate() {
            let ap = p / "blocks" / i / "adaptmlp";
            blk.adapt_mlp = Some(bottleneck(&ap, d, self.spec.adapter_dim, self.spec.adapter_scale, false));
        }
        Ok(0)
    }
}
