//! Parameter-efficient fine-tuning methods and the *target parameters* they create ([`Targets`]).
//!
//! A method is one file implementing [`PeftMethod`] plus one line in [`REGISTRY`]: it declares its
//! options (a config struct with serde defaults), its parameters and how they attach to the backbone's
//! hook points (`crate::backbone::hooks`), which of them get no weight decay, its merge rule and the
//! methods it cannot be combined with. Nothing else in the crate names a method.
//!
//! Target parameters live in their own `VarStore`, apart from the backbone's: the backbone is frozen
//! (no gradient, no optimiser slot) and the optimiser, TPP stage, saving and export all work on
//! `Targets` alone. Names follow timm paths (`blocks.3.attn.qkv.lora_A.weight`); on disk they use
//! HF PEFT's layout (`base_model.model.` prefix, and `adapter_config.json` where PEFT has the method).
pub mod adaptformer;
pub mod bitfit;
pub mod houlsby;
pub mod ia3;
pub mod io;
pub mod lora;
pub mod reference;
mod spec;
pub mod ssf;
pub mod vpt;

pub use spec::{Method, Options, PeftSpec};

use crate::backbone::Vit;
use anyhow::Result;
use tch::nn;

/// Every method, in the order their modules attach (the first wraps a layer innermost) and merge.
pub static REGISTRY: &[&dyn PeftMethod] = &[
    &lora::Lora { dora: false },
    &lora::Lora { dora: true },
    &adaptformer::AdaptFormer,
    &houlsby::Houlsby,
    &vpt::Vpt { deep: false },
    &vpt::Vpt { deep: true },
    &bitfit::BitFit,
    &ssf::Ssf,
    &ia3::Ia3,
    &reference::Linear,
    &reference::Full,
];

/// One PEFT method: its options, its target parameters and how they attach to a ViT.
pub trait PeftMethod: Sync {
    /// The name in `--peft`, configs and saved specs (kebab-case).
    fn name(&self) -> &'static str;

    /// The method's options: those of `given` it reads, with defaults for the rest (its config struct,
    /// serialised). Called with no options, it lists the option names the method knows.
    fn options(&self, given: &Options) -> Result<Options> {
        let _ = given;
        Ok(Options::default())
    }

    /// Checks option values (called with the method's own options).
    fn validate(&self, opts: &Options) -> Result<()> {
        let _ = opts;
        Ok(())
    }

    /// Methods it cannot be combined with, each with the reason (declared on one side suffices).
    fn incompatible(&self) -> &'static [(&'static str, &'static str)] {
        &[]
    }

    /// Why the method must be used alone, when it must.
    fn alone(&self) -> Option<&'static str> {
        None
    }

    /// Name fragments of its parameters that get no weight decay (beyond 1-D tensors, which never do).
    fn no_weight_decay(&self) -> &'static [&'static str] {
        &[]
    }

    /// Whether it trains the backbone's own weights (full fine-tuning).
    fn trains_backbone(&self) -> bool {
        false
    }

    /// Whether it adds target parameters besides a task head (false for the linear probe and full
    /// fine-tuning, which the TPP stage has nothing to pre-train for).
    fn adds_parameters(&self) -> bool {
        true
    }

    /// Creates the method's target parameters under `p` (the target store's root, timm paths) with their
    /// usual initialisation and attaches them to `vit`. Returns how many backbone parameters they
    /// replace (BitFit's bias copies), for honest parameter counts.
    fn attach(&self, vit: &mut Vit, p: &nn::Path, opts: &Options) -> Result<i64>;

    /// How many of the parameters it creates on `vit` never train (IA³'s query scales), for honest counts.
    fn fixed_parameters(&self, vit: &Vit) -> i64 {
        let _ = vit;
        0
    }

    /// Folds the method into the backbone weights (exact reparameterisations only) and detaches it.
    /// Methods merge in registry order, so the modules inside this one's are already folded.
    fn merge(&self, vit: &mut Vit) -> Result<()> {
        let _ = vit;
        let e = format!("'{}' adds modules to the network and cannot be merged into the backbone weights", self.name());
        Err(crate::Error::InvalidSpec(e).into())
    }

    /// HF PEFT's `adapter_config.json` for target parameters of this method alone, where PEFT has it.
    fn hf_peft_config(&self, opts: &Options, has_head: bool) -> Option<serde_json::Value> {
        let _ = (opts, has_head);
        None
    }

    /// The spec of an HF PEFT `adapter_config.json` of this method's `peft_type` (None: not this
    /// method's type).
    fn read_hf_peft_config(&self, cfg: &serde_json::Value) -> Option<Result<PeftSpec>> {
        let _ = cfg;
        None
    }
}

/// Whether a target parameter name is one that its method exempts from weight decay.
pub fn no_weight_decay(name: &str) -> bool {
    REGISTRY.iter().flat_map(|m| m.no_weight_decay()).any(|n| name.contains(n))
}

/// The target parameters of a model: PEFT parameters plus the task head.
pub struct Targets {
    pub(crate) vs: nn::VarStore,
    pub(crate) spec: PeftSpec,
    /// Backbone parameters that target parameters stand in for (BitFit's biases).
    pub(crate) replaced: i64,
    /// Target parameters that never train (IA³'s query scales).
    fixed: i64,
}

impl Targets {
    /// Attaches every method of `spec` to `vit`; target parameters go to a fresh store on `device`. They
    /// are created in the order the spec names the methods (the order of their random draws); their
    /// modules nest by registry order whatever that order is.
    pub fn attach(vit: &mut Vit, spec: &PeftSpec, device: tch::Device) -> Result<Self> {
        spec.validate()?;
        let vs = nn::VarStore::new(device);
        let (mut replaced, mut fixed) = (0, 0);
        for &m in &spec.methods {
            replaced += m.get().attach(vit, &vs.root(), &spec.options)?;
            fixed += m.get().fixed_parameters(vit);
        }
        Ok(Targets { vs, spec: spec.clone(), replaced, fixed })
    }

    /// Adds a fresh classification head (`head.weight` [classes, D], `head.bias`) as a target parameter.
    pub fn add_head(&self, vit: &mut Vit, num_classes: i64) {
        let d = vit.config().embed_dim;
        vit.set_head(Some(crate::backbone::vit::Linear::new(self.vs.root() / "head", d, num_classes, true)));
    }

    /// The store holding the target parameters (timm paths).
    pub fn store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The store, mutably (to freeze it or copy values into it).
    pub fn store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    /// What the target parameters are.
    pub fn spec(&self) -> &PeftSpec {
        &self.spec
    }

    /// Number of trainable target parameters (those held fixed not counted).
    pub fn numel(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum::<i64>() - self.fixed
    }
}

/// `trainable / total (percent)` line for logs and reports.
pub fn count_line(trainable: i64, total: i64) -> String {
    format!("trainable {trainable} / total {total} parameters ({:.3}%)", 100.0 * trainable as f64 / total.max(1) as f64)
}

/// Kaiming-uniform with a = sqrt(5), PyTorch's nn.Linear default (HF PEFT's LoRA A init):
/// bound = 1 / sqrt(fan_in).
pub(crate) fn kaiming_uniform_a5(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

/// Folds every method of `spec` into the backbone weights, innermost first (registry order), leaving a
/// plain ViT. Methods that add modules (adapters, prompts) are refused.
pub fn merge(vit: &mut Vit, spec: &PeftSpec) -> Result<()> {
    for m in spec.in_registry_order() {
        m.get().merge(vit)?;
    }
    Ok(())
}

/// `p / "a" / "b"` for a dotted path "a.b" (tch's `Path::sub` takes one segment at a time).
pub(crate) fn sub_path<'a>(p: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(p.clone(), |q, part| &q / part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_constants_resolve() {
        let mut names: Vec<&str> = REGISTRY.iter().map(|m| m.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), REGISTRY.len());
        for m in [
            Method::LORA,
            Method::DORA,
            Method::ADAPTFORMER,
            Method::HOULSBY,
            Method::VPT_SHALLOW,
            Method::VPT_DEEP,
            Method::BITFIT,
            Method::SSF,
            Method::IA3,
            Method::LINEAR,
            Method::FULL,
        ] {
            assert_eq!(m.get().name(), m.name());
        }
    }

    #[test]
    fn options_shared_by_two_methods_agree_on_defaults() {
        let mut seen: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
        for m in REGISTRY {
            for (k, v) in m.options(&Options::default()).unwrap().iter() {
                if let Some(prev) = seen.insert(k.clone(), v.clone()) {
                    assert_eq!(prev, *v, "option '{k}' has two defaults");
                }
            }
        }
    }
}
