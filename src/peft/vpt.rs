//! Visual prompt tuning (Jia et al. 2022): learnable prompt tokens after the class/register tokens.
//! Shallow: one set before block 0 (`vpt.prompts` [1, L, D]); deep: a new set per block
//! (`vpt.prompts` [depth, L, D]). Prompts are dropped before pooling. Init as VPT: uniform with
//! bound sqrt(6 / (3 p^2 + D)).
use super::{Method, PeftMethod, PeftSpec};
use crate::backbone::Vit;
use crate::backbone::vit::Prompts;
use anyhow::Result;
use tch::nn;

pub struct Vpt {
    pub spec: PeftSpec,
    pub deep: bool,
}

impl PeftMethod for Vpt {
    fn method(&self) -> Method {
        if self.deep { Method::VptDeep } else { Method::VptShallow }
    }
    fn attach(&self, vit: &mut Vit, p: &nn::Path) -> Result<i64> {
        let c = &vit.cfg;
        let bound = (6.0 / (3 * c.patch_size * c.patch_size + c.embed_dim) as f64).sqrt();
        let n = if self.deep { c.depth } else { 1 };
        let tokens = (p / "vpt").var(
            "prompts",
            &[n, self.spec.prompt_len, c.embed_dim],
            nn::Init::Uniform { lo: -bound, up: bound },
        );
        vit.prompts = Some(Prompts { tokens, deep: self.deep, dropout: self.spec.prompt_dropout });
        Ok(0)
    }
}
