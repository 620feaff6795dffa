//! Parameter-efficient fine-tuning methods, each one file behind [`PeftMethod`], and the *target
//! parameters* they create as one first-class object ([`Targets`]).
//!
//! Target parameters live in their own `VarStore`, apart from the backbone's: the backbone is frozen
//! (no gradient, no optimiser slot) and the optimiser, TPP stage, saving and export all work on
//! `Targets` alone. Names follow timm paths (`blocks.3.attn.qkv.lora_A.weight`); on disk LoRA uses
//! HF PEFT's layout (`base_model.model.` prefix and `adapter_config.json`).
pub mod adaptformer;
pub mod bitfit;
pub mod houlsby;
pub mod io;
pub mod lora;
pub mod ssf;
pub mod vpt;

use crate::backbone::Vit;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::fmt;
use tch::nn;

/// The methods `--peft` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    Lora,
    Dora,
    Adaptformer,
    Houlsby,
    VptShallow,
    VptDeep,
    Bitfit,
    Ssf,
    /// Linear probe: the head alone.
    Linear,
    /// Full fine-tuning: every backbone weight.
    Full,
}

impl Method {
    pub const ALL: &'static [Method] = &[
        Method::Lora,
        Method::Dora,
        Method::Adaptformer,
        Method::Houlsby,
        Method::VptShallow,
        Method::VptDeep,
        Method::Bitfit,
        Method::Ssf,
        Method::Linear,
        Method::Full,
    ];
    pub fn name(self) -> &'static str {
        match self {
            Method::Lora => "lora",
            Method::Dora => "dora",
            Method::Adaptformer => "adaptformer",
            Method::Houlsby => "houlsby",
            Method::VptShallow => "vpt-shallow",
            Method::VptDeep => "vpt-deep",
            Method::Bitfit => "bitfit",
            Method::Ssf => "ssf",
            Method::Linear => "linear",
            Method::Full => "full",
        }
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Method::ALL.iter().copied().find(|m| m.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Method::ALL.iter().map(|m| m.name()).collect();
            format!("unknown PEFT method '{s}' (expected one of: {})", names.join(", "))
        })
    }
}

/// Which linears of a block LoRA/DoRA adapt; `q`, `k`, `v` select parts of the fused `qkv` projection.
pub const LORA_TARGETS: &[&str] = &["qkv", "proj", "fc1", "fc2", "q", "k", "v"];

/// Everything that defines the target parameters: methods and their options. Saved with them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeftSpec {
    pub methods: Vec<Method>,
    pub lora_rank: i64,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub lora_targets: Vec<String>,
    pub adapter_dim: i64,
    pub adapter_scale: f64,
    pub prompt_len: i64,
    pub prompt_dropout: f64,
}

impl Default for PeftSpec {
    fn default() -> Self {
        PeftSpec {
            methods: vec![Method::Lora],
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_dropout: 0.0,
            lora_targets: vec!["qkv".into()],
            adapter_dim: 64,
            adapter_scale: 0.1,
            prompt_len: 10,
            prompt_dropout: 0.0,
        }
    }
}

impl PeftSpec {
    pub fn with_methods(methods: &[Method]) -> Self {
        PeftSpec { methods: methods.to_vec(), ..Default::default() }
    }

    pub fn has(&self, m: Method) -> bool {
        self.methods.contains(&m)
    }

    /// Short label for reports, e.g. `lora+vpt-deep`.
    pub fn label(&self) -> String {
        self.methods.iter().map(|m| m.name()).collect::<Vec<_>>().join("+")
    }

    /// Rejects combinations and options that make no sense, with the reason.
    pub fn validate(&self) -> Result<()> {
        if self.methods.is_empty() {
            bail!("--peft: no method given");
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.methods {
            if !seen.insert(*m) {
                bail!("--peft: '{m}' given twice");
            }
        }
        let alone = |m: Method, why: &str| -> Result<()> {
            if self.has(m) && self.methods.len() > 1 {
                bail!("--peft: '{m}' cannot be combined with other methods ({why})");
            }
            Ok(())
        };
        alone(Method::Linear, "a linear probe trains the head alone")?;
        alone(Method::Full, "full fine-tuning already trains every weight")?;
        if self.has(Method::Lora) && self.has(Method::Dora) {
            bail!("--peft: 'lora' and 'dora' both adapt the same weights; DoRA is a LoRA variant, pick one");
        }
        if self.has(Method::VptShallow) && self.has(Method::VptDeep) {
            bail!("--peft: pick one of 'vpt-shallow' and 'vpt-deep'");
        }
        if (self.has(Method::Lora) || self.has(Method::Dora)) && self.lora_rank <= 0 {
            bail!("--lora-rank must be positive");
        }
        if !(0.0..1.0).contains(&self.lora_dropout) || !(0.0..1.0).contains(&self.prompt_dropout) {
            bail!("dropout must be in [0, 1)");
        }
        for t in &self.lora_targets {
            if !LORA_TARGETS.contains(&t.as_str()) {
                bail!("--lora-targets: unknown layer '{t}' (expected some of {})", LORA_TARGETS.join(", "));
            }
        }
        if self.lora_targets.iter().any(|t| t == "qkv")
            && self.lora_targets.iter().any(|t| matches!(t.as_str(), "q" | "k" | "v"))
        {
            bail!("--lora-targets: 'qkv' already covers q, k and v; give either qkv or some of q, k, v");
        }
        if (self.has(Method::Adaptformer) || self.has(Method::Houlsby)) && self.adapter_dim <= 0 {
            bail!("--adapter-dim must be positive");
        }
        if (self.has(Method::VptShallow) || self.has(Method::VptDeep)) && self.prompt_len <= 0 {
            bail!("--prompt-len must be positive");
        }
        Ok(())
    }

    /// The method implementations, in a fixed order.
    pub fn implementations(&self) -> Vec<Box<dyn PeftMethod>> {
        self.methods
            .iter()
            .filter_map(|m| -> Option<Box<dyn PeftMethod>> {
                Some(match m {
                    Method::Lora => Box::new(lora::LoraMethod { spec: self.clone(), dora: false }),
                    Method::Dora => Box::new(lora::LoraMethod { spec: self.clone(), dora: true }),
                    Method::Adaptformer => Box::new(adaptformer::AdaptFormer { spec: self.clone() }),
                    Method::Houlsby => Box::new(houlsby::Houlsby { spec: self.clone() }),
                    Method::VptShallow => Box::new(vpt::Vpt { spec: self.clone(), deep: false }),
                    Method::VptDeep => Box::new(vpt::Vpt { spec: self.clone(), deep: true }),
                    Method::Bitfit => Box::new(bitfit::BitFit),
                    Method::Ssf => Box::new(ssf::SsfMethod),
                    Method::Linear | Method::Full => return None,
                })
            })
            .collect()
    }
}

/// One PEFT method: creates its target parameters and hooks them into the ViT.
pub trait PeftMethod {
    fn method(&self) -> Method;
    /// Creates the method's target parameters under `p` (the target store's root, timm paths) with their
    /// usual initialisation and attaches them to `vit`. Returns how many backbone parameters they
    /// replace (BitFit's bias copies), for honest parameter counts.
    fn attach(&self, vit: &mut Vit, p: &nn::Path) -> Result<i64>;
    /// Folds the method into the backbone weights (exact reparameterisations only) and detaches it.
    fn merge(&self, vit: &mut Vit) -> Result<()> {
        let _ = vit;
        bail!("'{}' adds modules to the network and cannot be merged into the backbone weights", self.method())
    }
}

/// The target parameters of a model: PEFT parameters plus the task head.
pub struct Targets {
    pub vs: nn::VarStore,
    pub spec: PeftSpec,
    /// Backbone parameters that target parameters stand in for (BitFit's biases).
    pub replaced: i64,
}

impl Targets {
    /// Attaches every method of `spec` to `vit`; target parameters go to a fresh store on `device`.
    pub fn attach(vit: &mut Vit, spec: &PeftSpec, device: tch::Device) -> Result<Self> {
        spec.validate()?;
        let vs = nn::VarStore::new(device);
        let mut replaced = 0;
        for m in spec.implementations() {
            replaced += m.attach(vit, &vs.root())?;
        }
        Ok(Targets { vs, spec: spec.clone(), replaced })
    }

    /// Adds a fresh classification head (`head.weight` [classes, D], `head.bias`) as a target parameter.
    pub fn add_head(&self, vit: &mut Vit, num_classes: i64) {
        let d = vit.cfg.embed_dim;
        vit.head = Some(crate::backbone::vit::Linear::new(self.vs.root() / "head", d, num_classes, true));
    }

    pub fn numel(&self) -> i64 {
        self.vs.trainable_variables().iter().map(|t| t.numel() as i64).sum()
    }

    /// Names of the PEFT parameters (head excluded).
    pub fn peft_names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.vs.variables().into_keys().filter(|k| !k.starts_with("head.")).collect();
        n.sort();
        n
    }
}

/// `trainable / total (percent)` line for logs and reports.
pub fn count_line(trainable: i64, total: i64) -> String {
    format!("trainable {trainable} / total {total} parameters ({:.3}%)", 100.0 * trainable as f64 / total.max(1) as f64)
}

/// Every `Linear` of the blocks that LoRA may target, by timm path relative to the block.
pub fn block_linears(b: &mut crate::backbone::vit::Block) -> [(&'static str, &mut crate::backbone::vit::Linear); 4] {
    [
        ("attn.qkv", &mut b.attn.qkv),
        ("attn.proj", &mut b.attn.proj),
        ("mlp.fc1", &mut b.mlp.fc1),
        ("mlp.fc2", &mut b.mlp.fc2),
    ]
}

/// Kaiming-uniform with a = sqrt(5), PyTorch's nn.Linear default (HF PEFT's LoRA A init):
/// bound = 1 / sqrt(fan_in).
pub fn kaiming_uniform_a5(fan_in: i64) -> nn::Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -bound, up: bound }
}

/// Folds every method of `spec` into the backbone weights (LoRA/DoRA first, then SSF, which scales the
/// merged weights), leaving a plain ViT. Methods that add modules (adapters, prompts) are refused.
pub fn merge(vit: &mut Vit, spec: &PeftSpec) -> Result<()> {
    let mut impls = spec.implementations();
    impls.sort_by_key(|m| m.method() == Method::Ssf);
    for m in impls {
        m.merge(vit)?;
    }
    Ok(())
}

/// `p / "a" / "b"` for a dotted path "a.b" (tch's `Path::sub` takes one segment at a time).
pub fn sub_path<'a>(p: &nn::Path<'a>, dotted: &str) -> nn::Path<'a> {
    dotted.split('.').fold(p.clone(), |q, part| &q / part)
}
