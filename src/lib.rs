//! tpp: parameter-efficient fine-tuning of vision transformers with Target Parameter Pre-training (TPP),
//! on libtorch through tch.
pub mod backbone;
pub mod bench;
pub mod cli;
pub mod data;
pub mod device;
pub mod eval;
pub mod experiment;
pub mod heads;
pub mod model;
pub mod peft;
pub mod pretext;
pub mod progress;
pub mod train;
