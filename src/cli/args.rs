//! Option groups shared by several subcommands.
use crate::data::transforms::{Augment, Normalization};
use crate::experiment::DataSource;
use crate::heads::segmentation::{HeadKind, SegConfig, SegLoss};
use crate::peft::adaptformer::AdaptFormerConfig;
use crate::peft::lora::LoraConfig;
use crate::peft::vpt::VptConfig;
use crate::peft::{Method, Options, PeftSpec};
use crate::pretext::dino::DinoConfig;
use crate::pretext::mae::{DecoderSource, MaeConfig};
use crate::train::pretrain::PretrainConfig;
use std::path::PathBuf;

/// PEFT method and its options (`--peft lora,vpt-deep --lora-rank 8 ...`).
#[derive(clap::Args, Debug, Clone)]
pub struct PeftArgs {
    /// PEFT method(s), comma-separated (linear: the head only; full: every weight)
    #[arg(long, value_delimiter = ',', default_value = "lora", value_parser = method_names())]
    pub peft: Vec<Method>,
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long, default_value_t = LoraConfig::default().lora_rank)]
    pub lora_rank: i64,
    #[arg(value_parser = crate::check::float_flag(crate::check::POSITIVE), long, default_value_t = LoraConfig::default().lora_alpha)]
    pub lora_alpha: f64,
    #[arg(value_parser = crate::check::float_flag(crate::check::UNIT_OPEN_HIGH), long, default_value_t = LoraConfig::default().lora_dropout)]
    pub lora_dropout: f64,
    /// Block linears LoRA/DoRA adapt: qkv, proj, fc1, fc2, or q, k, v inside the fused qkv
    #[arg(long, value_delimiter = ',', default_value = "qkv")]
    pub lora_targets: Vec<String>,
    /// Bottleneck width of AdaptFormer / Houlsby adapters
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long, default_value_t = AdaptFormerConfig::default().adapter_dim)]
    pub adapter_dim: i64,
    /// Output scale of AdaptFormer adapters
    #[arg(value_parser = crate::check::float_flag(crate::check::FINITE), long, default_value_t = AdaptFormerConfig::default().adapter_scale)]
    pub adapter_scale: f64,
    /// VPT prompt tokens (per block for vpt-deep)
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long, default_value_t = VptConfig::default().prompt_len)]
    pub prompt_len: i64,
    #[arg(value_parser = crate::check::float_flag(crate::check::UNIT_OPEN_HIGH), long, default_value_t = VptConfig::default().prompt_dropout)]
    pub prompt_dropout: f64,
    /// Any method option by its config name, NAME=VALUE (value as JSON, else a string); repeatable
    #[arg(long = "peft-option", value_name = "NAME=VALUE", value_parser = parse_option)]
    pub peft_options: Vec<(String, serde_json::Value)>,
}

/// `--peft`'s values: the registry's method names (listed in `--help`).
fn method_names() -> impl clap::builder::TypedValueParser<Value = Method> {
    use clap::builder::TypedValueParser;
    let names: Vec<&'static str> = Method::all().map(Method::name).collect();
    clap::builder::PossibleValuesParser::new(names).try_map(|s| s.parse::<Method>())
}

/// `NAME=VALUE`, the value read as JSON (`8`, `0.1`, `["qkv","fc2"]`) or else taken as a string.
fn parse_option(s: &str) -> Result<(String, serde_json::Value), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("'{s}': expected NAME=VALUE"))?;
    let value = serde_json::from_str(v).unwrap_or_else(|_| serde_json::Value::String(v.to_string()));
    Ok((k.trim().to_string(), value))
}

impl PeftArgs {
    /// The spec these flags describe.
    pub fn spec(&self) -> anyhow::Result<PeftSpec> {
        use serde_json::json;
        let mut o = Options::from_pairs([
            ("lora_rank", json!(self.lora_rank)),
            ("lora_alpha", json!(self.lora_alpha)),
            ("lora_dropout", json!(self.lora_dropout)),
            ("lora_targets", json!(self.lora_targets)),
            ("adapter_dim", json!(self.adapter_dim)),
            ("adapter_scale", json!(self.adapter_scale)),
            ("prompt_len", json!(self.prompt_len)),
            ("prompt_dropout", json!(self.prompt_dropout)),
        ]);
        for (k, v) in &self.peft_options {
            o.set(k, v.clone());
        }
        PeftSpec::new(self.peft.clone(), &o)
    }
}

/// How a data set is read, beyond its path: shared by the training commands and `data cache`.
#[derive(clap::Args, Debug, Clone)]
pub struct ReadArgs {
    /// Force the dataset format: medmnist, folder, csv, segpairs, nifti
    #[arg(long)]
    pub format: Option<String>,
    /// Skip unreadable or inconsistent files (listed on stderr) instead of stopping
    #[arg(long)]
    pub skip_bad: bool,
    /// Segmentation masks: number of classes (2: binarised, at 127 or at 1 for 0/1 masks; more: class ids)
    #[arg(value_parser = crate::check::int_flag(2, 256), long, default_value_t = 2)]
    pub mask_classes: i64,
    /// NIfTI: the label volume giving each axial slice's mask
    #[arg(long)]
    pub labels: Option<PathBuf>,
}

impl ReadArgs {
    /// The data source of `data` read this way.
    pub fn source(&self, data: PathBuf) -> DataSource {
        DataSource {
            data,
            format: self.format.clone(),
            skip_bad: self.skip_bad,
            mask_classes: self.mask_classes,
            labels: self.labels.clone(),
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
    #[command(flatten)]
    pub read: ReadArgs,
    /// Pixel normalisation: imagenet (pre-trained RGB backbones), half ([-1, 1]) or dataset (the training
    /// split's own mean and std, recorded in the run)
    #[arg(long, value_enum, default_value = "imagenet")]
    pub norm: Normalization,
    #[arg(value_parser = crate::check::int_flag(1, crate::check::MAX_BATCH), long, default_value_t = 64)]
    pub batch_size: i64,
    /// Keep a stratified, seeded fraction of the training labels (low-data studies)
    #[arg(value_parser = crate::check::float_flag(crate::check::UNIT_OPEN_LOW), long, default_value_t = 1.0)]
    pub train_fraction: f64,
}

impl DataArgs {
    /// The data source these flags name.
    pub fn source(&self) -> DataSource {
        self.read.source(self.data.clone())
    }
}

/// Training-time augmentation, shared by the TPP stage, backbone pre-training and fine-tuning.
#[derive(clap::Args, Debug, Clone)]
pub struct AugArgs {
    /// Augmentation: random resized crop min area (1: none; default 0.8, or 1 with --pad-crop)
    #[arg(value_parser = crate::check::float_flag(crate::check::UNIT_OPEN_LOW), long)]
    pub crop_min_area: Option<f64>,
    /// Augmentation: reflect-pad N pixels and crop back at a random offset per batch (0: none), as the
    /// MedMNIST pilot protocol does
    #[arg(value_parser = crate::check::int_flag(0, crate::backbone::MAX_IMG_SIZE), long, default_value_t = 0)]
    pub pad_crop: i64,
    /// Augmentation: max rotation in degrees (0-180)
    #[arg(value_parser = crate::check::float_flag(crate::check::DEGREES), long, default_value_t = 0.0)]
    pub rotate: f64,
    /// Augmentation: brightness/contrast jitter (0-1)
    #[arg(value_parser = crate::check::float_flag(crate::check::UNIT), long, default_value_t = 0.0)]
    pub jitter: f64,
    #[arg(long)]
    pub no_hflip: bool,
}

impl AugArgs {
    /// The augmentation these flags describe.
    pub fn augment(&self) -> anyhow::Result<Augment> {
        Augment::training(self.crop_min_area, self.pad_crop, !self.no_hflip, self.rotate, self.jitter)
    }
}

/// Optimisation options shared by the TPP stage and fine-tuning.
#[derive(clap::Args, Debug, Clone)]
pub struct OptimArgs {
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long, default_value_t = 10)]
    pub epochs: i64,
    /// Peak learning rate
    #[arg(value_parser = crate::check::float_flag(crate::check::POSITIVE), long)]
    pub lr: Option<f64>,
    #[arg(value_parser = crate::check::float_flag(crate::check::NON_NEGATIVE), long, default_value_t = 0.0)]
    pub min_lr: f64,
    /// Linear warm-up, as a fraction of all steps
    #[arg(value_parser = crate::check::float_flag(crate::check::UNIT), long, default_value_t = 0.05)]
    pub warmup: f64,
    #[arg(value_parser = crate::check::float_flag(crate::check::NON_NEGATIVE), long, default_value_t = 0.05)]
    pub weight_decay: f64,
    /// Gradient-norm clipping (0: off)
    #[arg(value_parser = crate::check::float_flag(crate::check::NON_NEGATIVE), long, default_value_t = 1.0)]
    pub clip: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// bf16 autocast on the CPU: 2-3x faster matrix products on CPUs with bf16 instructions
    /// (AVX512-BF16, AMX), slower on others; results differ from fp32 by bf16 rounding (CUDA always
    /// uses bf16 autocast)
    #[arg(long)]
    pub cpu_bf16: bool,
}

/// MAE pretext options.
#[derive(clap::Args, Debug, Clone)]
pub struct MaeArgs {
    #[arg(value_parser = crate::check::float_flag(crate::check::OPEN_UNIT), long, default_value_t = MaeConfig::default().mask_ratio)]
    pub mask_ratio: f64,
    /// Decoder width (a fresh decoder; ignored when the checkpoint's decoder is used)
    #[arg(value_parser = crate::check::int_flag(4, 16384), long, default_value_t = MaeConfig::default().decoder_dim)]
    pub decoder_dim: i64,
    #[arg(value_parser = crate::check::int_flag(0, 64), long, default_value_t = MaeConfig::default().decoder_depth)]
    pub decoder_depth: i64,
    #[arg(value_parser = crate::check::int_flag(1, 4096), long, default_value_t = MaeConfig::default().decoder_heads)]
    pub decoder_heads: i64,
    /// Plain pixel targets instead of per-patch normalised ones
    #[arg(long)]
    pub no_norm_pix: bool,
    /// Write a reconstruction preview PNG every N epochs (0: only at the end)
    #[arg(value_parser = crate::check::int_flag(0, i64::MAX), long, default_value_t = 0)]
    pub preview_every: i64,
}

impl MaeArgs {
    /// The MAE options these flags describe.
    pub fn config(&self) -> MaeConfig {
        MaeConfig {
            mask_ratio: self.mask_ratio,
            decoder_dim: self.decoder_dim,
            decoder_depth: self.decoder_depth,
            decoder_heads: self.decoder_heads,
            norm_pix: !self.no_norm_pix,
            ..MaeConfig::default()
        }
    }
}

/// Where the TPP stage's MAE decoder comes from (a backbone trained from scratch always has a fresh one).
#[derive(clap::Args, Debug, Clone)]
pub struct DecoderArgs {
    /// Decoder source: auto (the checkpoint's when it has one), checkpoint, or fresh
    #[arg(long, value_enum, default_value = "auto")]
    pub decoder: DecoderSource,
    /// Keep a loaded decoder frozen (only target parameters train)
    #[arg(long)]
    pub freeze_decoder: bool,
}

/// DINO pretext options (the others keep their defaults).
#[derive(clap::Args, Debug, Clone)]
pub struct DinoArgs {
    /// Prototypes of the DINO head
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long, default_value_t = DinoConfig::default().out_dim)]
    pub dino_out_dim: i64,
    #[arg(value_parser = crate::check::int_flag(0, i64::MAX), long, default_value_t = DinoConfig::default().local_crops)]
    pub dino_local_crops: i64,
    /// Local crop size in pixels (default: 0.43 x image size, a multiple of the patch size)
    #[arg(value_parser = crate::check::int_flag(0, crate::backbone::MAX_IMG_SIZE), long, default_value_t = DinoConfig::default().local_size)]
    pub dino_local_size: i64,
    #[arg(value_parser = crate::check::float_flag(crate::check::POSITIVE), long, default_value_t = DinoConfig::default().teacher_temp)]
    pub dino_teacher_temp: f64,
    /// Teacher temperature at the start of the warm-up
    #[arg(value_parser = crate::check::float_flag(crate::check::POSITIVE), long, default_value_t = DinoConfig::default().warmup_teacher_temp)]
    pub dino_warmup_teacher_temp: f64,
    #[arg(value_parser = crate::check::int_flag(0, i64::MAX), long, default_value_t = DinoConfig::default().warmup_teacher_epochs)]
    pub dino_warmup_teacher_epochs: i64,
    /// EMA momentum at the start (cosine to 1)
    #[arg(value_parser = crate::check::float_flag(crate::check::UNIT), long, default_value_t = DinoConfig::default().momentum)]
    pub dino_momentum: f64,
    /// Teacher targets: sinkhorn-knopp (DINOv2; equal use of every prototype, resists collapse) or centre
    /// (DINO's running centre)
    #[arg(long, value_enum, default_value = "sinkhorn-knopp")]
    pub dino_centering: DinoCentering,
    /// Epochs at the start with the prototypes (the head's last layer) frozen
    #[arg(value_parser = crate::check::int_flag(0, i64::MAX), long, default_value_t = DinoConfig::default().freeze_last_layer)]
    pub dino_freeze_last_layer: i64,
    /// Weight of DINOv2's KoLeo term spreading the student's features (0: off; DINOv2 uses 0.1)
    #[arg(value_parser = crate::check::float_flag(crate::check::NON_NEGATIVE), long, default_value_t = DinoConfig::default().koleo)]
    pub dino_koleo: f64,
}

/// `--dino-centering`'s values.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
pub enum DinoCentering {
    SinkhornKnopp,
    Centre,
}

impl DinoArgs {
    /// The DINO options these flags describe.
    pub fn config(&self) -> DinoConfig {
        DinoConfig {
            out_dim: self.dino_out_dim,
            local_crops: self.dino_local_crops,
            local_size: self.dino_local_size,
            teacher_temp: self.dino_teacher_temp,
            warmup_teacher_temp: self.dino_warmup_teacher_temp,
            warmup_teacher_epochs: self.dino_warmup_teacher_epochs,
            momentum: self.dino_momentum,
            centering: match self.dino_centering {
                DinoCentering::SinkhornKnopp => crate::pretext::dino::Centering::SinkhornKnopp,
                DinoCentering::Centre => crate::pretext::dino::Centering::Centre,
            },
            freeze_last_layer: self.dino_freeze_last_layer,
            koleo: self.dino_koleo,
            ..DinoConfig::default()
        }
    }
}

impl OptimArgs {
    /// The self-supervised stage's config from these flags (image size 0: the model's).
    pub fn pretrain(
        &self,
        data: &DataArgs,
        aug: &AugArgs,
        mae: &MaeArgs,
        default_lr: f64,
    ) -> anyhow::Result<PretrainConfig> {
        let cfg = PretrainConfig {
            epochs: self.epochs,
            batch_size: data.batch_size,
            lr: self.lr.unwrap_or(default_lr),
            min_lr: self.min_lr,
            warmup: self.warmup,
            weight_decay: self.weight_decay,
            clip: self.clip,
            seed: self.seed,
            image_size: 0,
            norm: data.norm.norm(),
            augment: aug.augment()?,
            mae: mae.config(),
            preview_every: mae.preview_every,
            native_crops: 0,
            native_size: 0,
            cpu_bf16: self.cpu_bf16,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Segmentation: head, native-resolution crops and sliding windows, loss.
#[derive(clap::Args, Debug, Clone)]
pub struct SegArgs {
    /// Segmentation head: pup (ViT tokens only; blob-like targets) or unetr (fused with a full-resolution
    /// convolutional stem; thin structures such as vessels)
    #[arg(long, default_value = "pup")]
    pub seg_head: HeadKind,
    /// Segmentation at the images' own resolution: train on random crops of the model's input size
    /// (--img-size), evaluate and predict with overlapping sliding windows over whole images
    #[arg(long)]
    pub seg_native: bool,
    /// With --seg-native: store images at N x N instead of their own size (needed when sizes differ)
    #[arg(long, value_parser = crate::check::int_flag(0, crate::backbone::MAX_IMG_SIZE), default_value_t = 0)]
    pub seg_data_size: i64,
    /// With --seg-native: training crops per image and epoch
    #[arg(long, value_parser = crate::check::int_flag(1, 10_000), default_value_t = 1)]
    pub seg_crops_per_image: i64,
    /// With --seg-native: overlap of neighbouring sliding windows, a fraction of the window
    #[arg(long, value_parser = crate::check::float_flag(crate::check::OVERLAP), default_value_t = 0.5)]
    pub seg_overlap: f64,
    /// Segmentation loss: ce-dice, focal-dice, or cldice (adds a soft-skeleton Dice for thin structures)
    #[arg(long, default_value = "ce-dice")]
    pub seg_loss: SegLoss,
}

impl SegArgs {
    /// The segmentation settings these flags describe.
    pub fn config(&self) -> anyhow::Result<SegConfig> {
        let c = SegConfig {
            head: self.seg_head,
            native: self.seg_native,
            data_size: self.seg_data_size,
            crops_per_image: self.seg_crops_per_image,
            overlap: self.seg_overlap,
            loss: self.seg_loss,
        };
        c.validate()?;
        Ok(c)
    }
}
