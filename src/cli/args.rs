//! Option groups shared by several subcommands.
use crate::data::transforms::Augment;
use crate::peft::{Method, PeftSpec};
use std::path::PathBuf;

/// PEFT method and its options (`--peft lora,vpt-deep --lora-rank 8 ...`).
#[derive(clap::Args, Debug, Clone)]
pub struct PeftArgs {
    /// PEFT method(s), comma-separated: lora, dora, adaptformer, houlsby, vpt-shallow, vpt-deep, bitfit,
    /// ssf, linear (head only), full (everything)
    #[arg(long, value_delimiter = ',', default_value = "lora")]
    pub peft: Vec<Method>,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: i64,
    #[arg(long, default_value_t = 16.0)]
    pub lora_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Block linears LoRA/DoRA adapt: qkv, proj, fc1, fc2, or q, k, v inside the fused qkv
    #[arg(long, value_delimiter = ',', default_value = "qkv")]
    pub lora_targets: Vec<String>,
    /// Bottleneck width of AdaptFormer / Houlsby adapters
    #[arg(long, default_value_t = 64)]
    pub adapter_dim: i64,
    /// Output scale of AdaptFormer adapters
    #[arg(long, default_value_t = 0.1)]
    pub adapter_scale: f64,
    /// VPT prompt tokens (per block for vpt-deep)
    #[arg(long, default_value_t = 10)]
    pub prompt_len: i64,
    #[arg(long, default_value_t = 0.0)]
    pub prompt_dropout: f64,
}

impl PeftArgs {
    pub fn spec(&self) -> PeftSpec {
        PeftSpec {
            methods: self.peft.clone(),
            lora_rank: self.lora_rank,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            lora_targets: self.lora_targets.clone(),
            adapter_dim: self.adapter_dim,
            adapter_scale: self.adapter_scale,
            prompt_len: self.prompt_len,
            prompt_dropout: self.prompt_dropout,
        }
    }
}

/// Dataset and how batches are made.
#[derive(clap::Args, Debug, Clone)]
pub struct DataArgs {
    /// Dataset: a MedMNIST .npz, an image folder (root/<class>/*), a CSV manifest (path,label...), or a
    /// segmentation folder (images/ + masks/); the format is inferred from the path
    #[arg(long)]
    pub data: PathBuf,
    /// Force the dataset format: medmnist, folder, csv, segpairs, nifti
    #[arg(long)]
    pub format: Option<String>,
    /// Pixel normalisation: imagenet (pre-trained RGB backbones), half ([-1, 1]) or dataset (the training
    /// split's own mean and std, recorded in the run)
    #[arg(long, default_value = "imagenet")]
    pub norm: String,
    #[arg(long, default_value_t = 64)]
    pub batch_size: i64,
    /// Keep a stratified, seeded fraction of the training labels (low-data studies)
    #[arg(long, default_value_t = 1.0)]
    pub train_fraction: f64,
    /// Skip unreadable or inconsistent files (listed on stderr) instead of stopping
    #[arg(long)]
    pub skip_bad: bool,
    /// Segmentation masks: number of classes (2: binarised at 127; more: pixel values are class ids)
    #[arg(long, default_value_t = 2)]
    pub mask_classes: i64,
    /// NIfTI: the label volume giving each axial slice's mask
    #[arg(long)]
    pub labels: Option<PathBuf>,
}

/// Training-time augmentation, shared by the TPP stage, backbone pre-training and fine-tuning.
#[derive(clap::Args, Debug, Clone)]
pub struct AugArgs {
    /// Augmentation: random resized crop min area (1: none; default 0.8, or 1 with --pad-crop)
    #[arg(long)]
    pub crop_min_area: Option<f64>,
    /// Augmentation: reflect-pad N pixels and crop back at a random offset per batch (0: none), as the
    /// MedMNIST pilot protocol does
    #[arg(long, default_value_t = 0)]
    pub pad_crop: i64,
    /// Augmentation: max rotation in degrees
    #[arg(long, default_value_t = 0.0)]
    pub rotate: f64,
    /// Augmentation: brightness/contrast jitter
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,
    #[arg(long)]
    pub no_hflip: bool,
}

impl AugArgs {
    pub fn augment(&self) -> anyhow::Result<Augment> {
        augment(self.crop_min_area, self.pad_crop, !self.no_hflip, self.rotate, self.jitter)
    }
}

/// Builds a training augmentation; `crop_min_area` defaults to 0.8 without a pad-crop and to 1 (none) with
/// one, so the two crops are not stacked by accident.
pub fn augment(
    crop_min_area: Option<f64>,
    pad_crop: i64,
    hflip: bool,
    rotate: f64,
    jitter: f64,
) -> anyhow::Result<Augment> {
    let crop = crop_min_area.unwrap_or(if pad_crop > 0 { 1.0 } else { 0.8 });
    if !(crop > 0.0 && crop <= 1.0) {
        anyhow::bail!("crop_min_area must be in (0, 1], got {crop}");
    }
    if pad_crop < 0 {
        anyhow::bail!("pad_crop must be >= 0, got {pad_crop}");
    }
    if rotate < 0.0 || jitter < 0.0 {
        anyhow::bail!("rotate and jitter must be >= 0");
    }
    Ok(Augment { hflip, vflip: false, crop_min_area: crop, crop_max_area: 1.0, rotate_deg: rotate, jitter, pad_crop })
}

/// Optimisation options shared by the TPP stage and fine-tuning.
#[derive(clap::Args, Debug, Clone)]
pub struct OptimArgs {
    #[arg(long, default_value_t = 10)]
    pub epochs: i64,
    /// Peak learning rate
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    pub min_lr: f64,
    /// Linear warm-up, as a fraction of all steps
    #[arg(long, default_value_t = 0.05)]
    pub warmup: f64,
    #[arg(long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Gradient-norm clipping (0: off)
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}
