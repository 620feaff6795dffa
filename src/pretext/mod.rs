//! Self-supervised pretext tasks for the TPP stage (and backbone pre-training): MAE and DINO.
pub mod dino;
pub mod mae;

use serde::{Deserialize, Serialize};

/// The self-supervised task of a TPP stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pretext {
    /// Masked autoencoding ([`mae`]).
    Mae,
    /// Self-distillation with an EMA teacher ([`dino`]).
    Dino,
}

impl Pretext {
    /// The name in reports ("MAE", "DINO").
    pub fn title(self) -> &'static str {
        match self {
            Pretext::Mae => "MAE",
            Pretext::Dino => "DINO",
        }
    }
}

impl std::fmt::Display for Pretext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pretext::Mae => "mae",
            Pretext::Dino => "dino",
        })
    }
}

/// Parameters of the pretext heads that get no weight decay besides 1-D ones (MAE's mask token).
pub const NO_WEIGHT_DECAY: &[&str] = &["mask_token"];
