//! tpp: parameter-efficient fine-tuning (PEFT) of vision transformers on medical images, built around
//! Target Parameter Pre-training (TPP): a PEFT method's new parameters are pre-trained with a
//! self-supervised pretext (MAE or DINO) on the downstream images, backbone frozen, before fine-tuning.
//! On libtorch through tch.
//!
//! The layers, bottom up: [`backbone`] (a timm-named ViT with hook points, checkpoint formats), [`peft`]
//! (one file per method, a registry), [`model`] (backbone + target parameters + head), [`data`],
//! [`pretext`] (MAE, DINO), [`train`] (one loop and the pieces it calls), [`eval`] (metrics, reports),
//! [`experiment`] (the stages in their folders: fine-tuning runs, TPP stages, the comparison grid). The
//! command-line program ([`cli`]) only parses arguments and calls them.
//!
//! ```no_run
//! use tpp::{BackboneSource, Method, PeftSpec};
//! # fn main() -> tpp::Result<()> {
//! let backbone = BackboneSource::new("vit_small.safetensors");
//! let (model, _checkpoint) = backbone.model(&PeftSpec::with_methods(&[Method::LORA]), tch::Device::Cpu, 0)?;
//! println!("{}", tpp::peft::count_line(model.counts().0, model.counts().1));
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod backbone;
pub mod bench;
mod check;
pub mod cli;
pub mod data;
pub mod device;
pub mod dist;
mod error;
pub mod eval;
pub mod experiment;
pub mod heads;
pub mod hub;
pub mod model;
pub mod peft;
pub mod pretext;
pub mod profile;
pub mod progress;
pub mod train;

pub use backbone::{Backbone, Checkpoint, LoadOptions, Pool, Vit, VitConfig};
pub use data::{Dataset, Split, Task};
pub use error::{Error, Result, panic_is_guarded};
pub use eval::metrics::Metric;
pub use experiment::{BackboneSource, CompareConfig, CompareResults, DataSource, RunRecord, TppRecord};
pub use model::PeftModel;
pub use peft::{Method, Options, PeftMethod, PeftSpec, Targets};
pub use pretext::Pretext;
pub use train::finetune::FinetuneConfig;
pub use train::pretrain::PretrainConfig;
pub use train::trainer::{Callback, TrainStep, Trainer};
