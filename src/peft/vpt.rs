//! Visual prompt tuning (Jia et al. 2022): learnable prompt tokens after the class/register tokens.
//! Shallow: one set before block 0 (`vpt.prompts` [1, L, D]); deep: a new set per block
//! (`vpt.prompts` [depth, L, D]). Prompts are dropped before pooling. Init as VPT: uniform with
//! bound sqrt(6 / (3 p^2 + D)).
use super::{Method, Options, PeftMethod};
use crate::backbone::{TokenHook, Vit};
use anyhow::{Result, anyhow};
use serde::{Deserialize, Serialize};
use tch::{Tensor, nn};

impl Method {
    /// VPT with prompts before the first block only.
    pub const VPT_SHALLOW: Method = Method("vpt-shallow");
    /// VPT with new prompts before every block.
    pub const VPT_DEEP: Method = Method("vpt-deep");
}

/// Options of VPT.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VptConfig {
    /// Prompt tokens (per block for vpt-deep).
    pub prompt_len: i64,
    /// Dropout on the prompts.
    pub prompt_dropout: f64,
}

impl Default for VptConfig {
    fn default() -> Self {
        VptConfig { prompt_len: 10, prompt_dropout: 0.0 }
    }
}

/// VPT, shallow or deep.
pub struct Vpt {
    /// New prompts before every block.
    pub deep: bool,
}

/// The prompts of a model.
#[derive(Debug)]
struct Prompts {
    /// [1 or depth, L, D]
    tokens: Tensor,
    deep: bool,
    dropout: f64,
}

impl TokenHook for Prompts {
    fn len(&self) -> i64 {
        self.tokens.size()[1]
    }
    fn tokens(&self, block: usize, train: bool) -> Option<Tensor> {
        let t = match (self.deep, block) {
            (true, i) => self.tokens.get(i as i64).unsqueeze(0),
            (false, 0) => self.tokens.shallow_clone(),
            (false, _) => return None,
        };
        Some(t.dropout(self.dropout, train))
    }
}

fn validate(opts: &Options) -> Result<()> {
    let c: VptConfig = opts.parse()?;
    crate::check::int("prompt_len", c.prompt_len, 1, 1 << 16)?;
    crate::check::float("prompt_dropout", c.prompt_dropout, crate::check::UNIT_OPEN_HIGH)
}

fn attach(vit: &mut Vit, p: &nn::Path, opts: &Options, deep: bool) -> Result<i64> {
    let o: VptConfig = opts.parse()?;
    let c = vit.config();
    let bound = (6.0 / (3 * c.patch_size * c.patch_size + c.embed_dim) as f64).sqrt();
    let n = if deep { c.depth } else { 1 };
    let tokens =
        (p / "vpt").var("prompts", &[n, o.prompt_len, c.embed_dim], nn::Init::Uniform { lo: -bound, up: bound });
    vit.set_extra_tokens(Box::new(Prompts { tokens, deep, dropout: o.prompt_dropout })).map_err(|e| anyhow!(e))?;
    Ok(0)
}

impl PeftMethod for Vpt {
    fn name(&self) -> &'static str {
        if self.deep { Method::VPT_DEEP.0 } else { Method::VPT_SHALLOW.0 }
    }
    fn options(&self, given: &Options) -> Result<Options> {
        given.normalised::<VptConfig>()
    }
    fn validate(&self, opts: &Options) -> Result<()> {
        validate(opts)
    }
    fn incompatible(&self) -> &'static [(&'static str, &'static str)] {
        if self.deep { &[] } else { &[("vpt-deep", "are two depths of one method; pick one")] }
    }
    fn no_weight_decay(&self) -> &'static [&'static str] {
        &["prompts"]
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path, opts: &Options) -> Result<i64> {
        attach(vit, p, opts, self.deep)
    }
}
