//! Self-supervised pretext tasks for the TPP stage (and backbone pre-training): MAE and DINO.
pub mod dino;
pub mod mae;

/// Parameters of the pretext heads that get no weight decay besides 1-D ones (MAE's mask token).
pub const NO_WEIGHT_DECAY: &[&str] = &["mask_token"];
