//! Houlsby adapters (Houlsby et al. 2019): serial bottlenecks (down, GELU, up, residual) on the output of
//! each block's attention and MLP, before the residual add; zero up-projection, so they start as identity.
use super::adaptformer::bottleneck;
use super::{Method, PeftMethod, PeftSpec};
use crate::backbone::Vit;
use anyhow::Result;
use tch::nn;

pub struct Houlsby {
    pub spec: PeftSpec,
}

impl PeftMethod for Houlsby {
    fn method(&self) -> Method {
        Method::Houlsby
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path) -> Result<i64> {
        let d = vit.cfg.embed_dim;
        let h = self.spec.adapter_dim;
        for (i, blk) in vit.blocks.iter_mut().enumerate() {
            let bp = p / "blocks" / i;
            blk.houlsby_attn = Some(bottleneck(&(&bp / "adapter_attn"), d, h, 1.0, true));
            blk.houlsby_mlp = Some(bottleneck(&(&bp / "adapter_mlp"), d, h, 1.0, true));
        }
        Ok(0)
    }
}
