//! The two reference "methods" of every comparison: the linear probe (a task head on the frozen backbone)
//! and full fine-tuning (every backbone weight trains). Neither adds target parameters.
use super::{Method, Options, PeftMethod};
use crate::backbone::Vit;
use anyhow::Result;
use tch::nn;

impl Method {
    /// Linear probe: the head alone.
    pub const LINEAR: Method = Method("linear");
    /// Full fine-tuning: every backbone weight.
    pub const FULL: Method = Method("full");
}

/// The linear probe.
pub struct Linear;
/// Full fine-tuning.
pub struct Full;

impl PeftMethod for Linear {
    fn name(&self) -> &'static str {
        Method::LINEAR.0
    }
    fn alone(&self) -> Option<&'static str> {
        Some("a linear probe trains the head alone")
    }
    fn adds_parameters(&self) -> bool {
        false
    }
    fn attach(&self, _vit: &mut Vit, _p: &nn::Path, _opts: &Options) -> Result<i64> {
        Ok(0)
    }
}

impl PeftMethod for Full {
    fn name(&self) -> &'static str {
        Method::FULL.0
    }
    fn alone(&self) -> Option<&'static str> {
        Some("full fine-tuning already trains every weight")
    }
    fn adds_parameters(&self) -> bool {
        false
    }
    fn trains_backbone(&self) -> bool {
        true
    }
    fn attach(&self, _vit: &mut Vit, _p: &nn::Path, _opts: &Options) -> Result<i64> {
        Ok(0)
    }
}
