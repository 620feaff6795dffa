//! ViT backbone: architecture ([`config`]), model ([`vit`]), the points where PEFT methods attach
//! ([`hooks`]) and checkpoint formats ([`checkpoint`]).
pub mod checkpoint;
pub mod config;
pub mod hooks;
pub mod vit;

pub use checkpoint::{Checkpoint, Format, LoadOptions};
pub use config::{Pool, VitConfig};
pub use hooks::{LayerHook, LayerWeights, StreamHook, StreamPoint, TokenHook};
pub use vit::Vit;

use crate::error::bad_input;
use anyhow::{Result, bail};
use std::path::Path;
use tch::{Device, nn};

/// The largest input size accepted (`--img-size`, configs): a 4096 px ViT-B/16 input already has 65536
/// tokens; larger sizes would exhaust memory before any useful work.
pub const MAX_IMG_SIZE: i64 = 4096;

/// Parameters of the backbone that get no weight decay besides 1-D ones (timm's `no_weight_decay()`).
pub const NO_WEIGHT_DECAY: &[&str] = &["cls_token", "reg_token", "pos_embed"];

/// A backbone whose weights live in their own VarStore, so that freezing it (or storing it in bf16) never
/// touches the target parameters, which live elsewhere.
pub struct Backbone {
    /// The backbone's weights, frozen unless fully fine-tuned.
    pub vs: nn::VarStore,
    /// The model.
    pub vit: Vit,
}

impl Backbone {
    /// A freshly initialised backbone (timm init) for a config.
    pub fn fresh(cfg: &VitConfig, device: Device) -> Result<Self> {
        if let Err(e) = cfg.validate() {
            bail!("invalid ViT config: {e}");
        }
        let vs = nn::VarStore::new(device);
        let vit = Vit::new(&vs.root(), cfg);
        Ok(Backbone { vs, vit })
    }

    /// Loads a checkpoint file (any supported format) onto `device`.
    pub fn load(path: &Path, opts: &LoadOptions, device: Device) -> Result<(Self, Checkpoint)> {
        let ckpt = Checkpoint::open(path, opts)?;
        let bb = Self::from_checkpoint(&ckpt, device)?;
        Ok((bb, ckpt))
    }

    /// The backbone of a checkpoint already read, on `device`.
    pub fn from_checkpoint(ckpt: &Checkpoint, device: Device) -> Result<Self> {
        let bb = Self::fresh(&ckpt.config, device)?;
        checkpoint::load_into(&bb.vs, &ckpt.tensors, "", &ckpt.path)?;
        Ok(bb)
    }

    /// Removes the checkpoint's own classifier (`head.*`): tasks make their own heads, and a stale one would
    /// be counted, trained with full fine-tuning, and expected back when a checkpoint of it is reloaded.
    pub fn drop_head(&mut self) {
        self.vit.set_head(None);
        let mut vars = self.vs.variables_.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let gone: Vec<_> =
            vars.named_variables.iter().filter(|(k, _)| k.starts_with("head.")).map(|(_, t)| t.data_ptr()).collect();
        vars.named_variables.retain(|k, _| !k.starts_with("head."));
        vars.trainable_variables.retain(|v| !gone.contains(&v.tensor.data_ptr()));
    }

    /// Freezes every backbone weight (requires_grad false): they get no gradient and no optimiser slot.
    pub fn freeze(&mut self) {
        self.vs.freeze();
    }

    /// Checks an input batch shape before running the model, so bad input is an error, not a panic.
    pub fn check_input(&self, shape: &[i64]) -> Result<()> {
        let c = &self.vit.cfg;
        if shape.len() != 4 {
            return Err(bad_input!("expected images as [N, C, H, W], got shape {shape:?}"));
        }
        if shape[1] != c.in_chans && shape[1] != 1 {
            let takes = if c.in_chans == 1 { "1".to_string() } else { format!("{} (or 1)", c.in_chans) };
            return Err(bad_input!("images have {} channels; the backbone takes {takes}", shape[1]));
        }
        if shape[2] % c.patch_size != 0 || shape[3] % c.patch_size != 0 || shape[2] == 0 || shape[3] == 0 {
            let (h, w, p) = (shape[2], shape[3], c.patch_size);
            return Err(bad_input!("image size {h}x{w} is not a multiple of the patch size {p}"));
        }
        Ok(())
    }
}
