//! Self-supervised pretext tasks for the TPP stage (and backbone pre-training): MAE and DINO.
pub mod dino;
pub mod mae;
