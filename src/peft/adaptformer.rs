//! AdaptFormer (Chen et al. 2022): a bottleneck (down, ReLU, up, scale) parallel to each block's MLP, fed
//! the residual stream; the up-projection starts at zero.
use super::{Method, Options, PeftMethod, kaiming_uniform_a5};
use crate::backbone::vit::Linear;
use crate::backbone::{StreamHook, StreamPoint, Vit};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

impl Method {
    /// AdaptFormer.
    pub const ADAPTFORMER: Method = Method("adaptformer");
}

/// Options of AdaptFormer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaptFormerConfig {
    /// Bottleneck width.
    pub adapter_dim: i64,
    /// Output scale.
    pub adapter_scale: f64,
}

impl Default for AdaptFormerConfig {
    fn default() -> Self {
        AdaptFormerConfig { adapter_dim: 64, adapter_scale: 0.1 }
    }
}

/// The method.
pub struct AdaptFormer;

/// Bottleneck adapter `scale * up(act(down(x)))` (plus `x` when `residual`), the up-projection
/// zero-initialised so it starts as a no-op. Shared with Houlsby.
#[derive(Debug)]
pub struct Bottleneck {
    down: Linear,
    up: Linear,
    scale: f64,
    /// GELU (Houlsby) or ReLU (AdaptFormer).
    gelu: bool,
    residual: bool,
}

impl Bottleneck {
    /// A fresh adapter under `p` (`down_proj`, `up_proj`).
    pub fn new(p: &nn::Path, dim: i64, hidden: i64, scale: f64, gelu: bool, residual: bool) -> Self {
        let lin = |name: &str, i: i64, o: i64, init: nn::Init| {
            let q = p / name;
            Linear::from_tensors(q.var("weight", &[o, i], init), Some(q.var("bias", &[o], nn::Init::Const(0.0))))
        };
        Bottleneck {
            down: lin("down_proj", dim, hidden, kaiming_uniform_a5(dim)),
            up: lin("up_proj", hidden, dim, nn::Init::Const(0.0)),
            scale,
            gelu,
            residual,
        }
    }
}

impl StreamHook for Bottleneck {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let h = self.down.forward(x, train);
        let h = if self.gelu { h.gelu("none") } else { h.relu() };
        let y = self.up.forward(&h, train) * self.scale;
        if self.residual { y + x } else { y }
    }
}

/// Checks a bottleneck width option.
pub(crate) fn check_dim(dim: i64) -> Result<()> {
    crate::check::int("adapter_dim", dim, 1, 1 << 16)
}

impl PeftMethod for AdaptFormer {
    fn name(&self) -> &'static str {
        Method::ADAPTFORMER.0
    }
    fn options(&self, given: &Options) -> Result<Options> {
        given.normalised::<AdaptFormerConfig>()
    }
    fn validate(&self, opts: &Options) -> Result<()> {
        let c: AdaptFormerConfig = opts.parse()?;
        crate::check::float("adapter_scale", c.adapter_scale, crate::check::FINITE)?;
        check_dim(c.adapter_dim)
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path, opts: &Options) -> Result<i64> {
        let c: AdaptFormerConfig = opts.parse()?;
        let d = vit.config().embed_dim;
        for (i, blk) in vit.blocks_mut().iter_mut().enumerate() {
            let ap = p / "blocks" / i / "adaptmlp";
            let hook = Bottleneck::new(&ap, d, c.adapter_dim, c.adapter_scale, false, false);
            blk.add_hook(StreamPoint::ParallelMlp, Box::new(hook));
        }
        Ok(0)
    }
}
