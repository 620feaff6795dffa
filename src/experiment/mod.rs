//! Orchestration: the stages as a user runs them, each in its output folder, callable from Rust as the
//! command-line program calls them. A fine-tuning run ([`finetune::run`]), the TPP stage and backbone
//! pre-training ([`tpp`]), the comparison grid ([`compare::run`]), the demo ([`demo::run_pretrained`], [`demo::run_from_scratch`]), and the
//! use of finished runs ([`inference`]); what each stage records lives in [`records`].
pub mod compare;
pub mod demo;
pub mod finetune;
pub mod inference;
pub mod records;
pub mod sections;
pub mod tpp;

pub use compare::{CompareConfig, CompareResults};
pub use records::{BackboneSource, DataSource, RunRecord, TppRecord};
