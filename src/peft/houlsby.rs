//! Houlsby adapters (Houlsby et al. 2019): serial bottlenecks (down, GELU, up, residual) on the output of
//! each block's attention and MLP, before the residual add; zero up-projection, so they start as identity.
use super::adaptformer::{Bottleneck, check_dim};
use super::{Method, Options, PeftMethod};
use crate::backbone::{StreamPoint, Vit};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::nn;

impl Method {
    /// Houlsby adapters.
    pub const HOULSBY: Method = Method("houlsby");
}

/// Options of Houlsby adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HoulsbyConfig {
    /// Bottleneck width.
    pub adapter_dim: i64,
}

impl Default for HoulsbyConfig {
    fn default() -> Self {
        HoulsbyConfig { adapter_dim: 64 }
    }
}

/// The method.
pub struct Houlsby;

impl PeftMethod for Houlsby {
    fn name(&self) -> &'static str {
        Method::HOULSBY.0
    }
    fn options(&self, given: &Options) -> Result<Options> {
        given.normalised::<HoulsbyConfig>()
    }
    fn validate(&self, opts: &Options) -> Result<()> {
        check_dim(opts.parse::<HoulsbyConfig>()?.adapter_dim)
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path, opts: &Options) -> Result<i64> {
        let h = opts.parse::<HoulsbyConfig>()?.adapter_dim;
        let d = vit.config().embed_dim;
        for (i, blk) in vit.blocks_mut().iter_mut().enumerate() {
            let bp = p / "blocks" / i;
            let attn = Bottleneck::new(&(&bp / "adapter_attn"), d, h, 1.0, true, true);
            blk.add_hook(StreamPoint::AfterAttention, Box::new(attn));
            let mlp = Bottleneck::new(&(&bp / "adapter_mlp"), d, h, 1.0, true, true);
            blk.add_hook(StreamPoint::AfterMlp, Box::new(mlp));
        }
        Ok(0)
    }
}
