//! `tpp pretrain-targets` (the TPP stage) and `tpp pretrain-backbone` (MAE from scratch).
use super::BackboneArgs;
use super::args::{AugArgs, DataArgs, DecoderArgs, DinoArgs, MaeArgs, OptimArgs, PeftArgs};
use crate::backbone::{Pool, VitConfig};
use crate::experiment::TppRecord;
use crate::experiment::tpp::{pretrain_backbone, pretrain_targets};
use crate::pretext::Pretext;
use crate::train::pretrain::PretrainConfig;
use anyhow::Result;
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct TargetsArgs {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[command(flatten)]
    pub peft: PeftArgs,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub aug: AugArgs,
    #[arg(long, value_enum, default_value = "mae")]
    pub pretext: Pretext,
    #[command(flatten)]
    pub mae: MaeArgs,
    #[command(flatten)]
    pub decoder: DecoderArgs,
    #[command(flatten)]
    pub dino: DinoArgs,
    /// Image/mask folders at their own resolution: this many random crops of the model's input size
    /// (--img-size) per image and epoch, as `finetune --seg-native` trains (0: whole images resized)
    #[arg(long, value_parser = crate::check::int_flag(0, 10_000), default_value_t = 0)]
    pub native_crops: i64,
    /// With --native-crops: store images at N x N instead of their own size
    #[arg(long, value_parser = crate::check::int_flag(0, crate::backbone::MAX_IMG_SIZE), default_value_t = 0)]
    pub native_size: i64,
    /// Output folder: targets/, pretext_head.safetensors, config.json, loss.csv, previews
    #[arg(long, value_parser = crate::check::out_path)]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct BackboneTrainArgs {
    /// Architecture preset (vit_tiny_patch16_224, ...); the flags below override its fields
    #[arg(long, default_value = "vit_tiny_patch16_224")]
    pub arch: String,
    #[arg(value_parser = crate::check::int_flag(1, 1024), long)]
    pub patch_size: Option<i64>,
    #[arg(value_parser = crate::check::int_flag(1, crate::backbone::config::MAX_WIDTH), long)]
    pub embed_dim: Option<i64>,
    #[arg(value_parser = crate::check::int_flag(1, crate::backbone::config::MAX_DEPTH), long)]
    pub depth: Option<i64>,
    #[arg(value_parser = crate::check::int_flag(1, 4096), long)]
    pub heads: Option<i64>,
    /// Image size (default: the dataset's)
    #[arg(value_parser = crate::check::int_flag(1, crate::backbone::MAX_IMG_SIZE), long)]
    pub img_size: Option<i64>,
    /// Input channels (default: the dataset's)
    #[arg(value_parser = crate::check::int_flag(1, 3), long)]
    pub in_chans: Option<i64>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[command(flatten)]
    pub aug: AugArgs,
    #[command(flatten)]
    pub mae: MaeArgs,
    /// Output folder: backbone.safetensors (timm encoder + MAE decoder), config.json, loss.csv, previews
    #[arg(long, value_parser = crate::check::out_path)]
    pub out: PathBuf,
}

/// The pre-training stages use every training image: a label fraction would be ignored.
fn check_no_fraction(data: &DataArgs) -> Result<()> {
    if data.train_fraction != 1.0 {
        return Err(crate::error::bad_input!(
            "--train-fraction thins the labels fine-tuning uses; pre-training uses every training image"
        ));
    }
    Ok(())
}

pub fn run_targets(a: TargetsArgs, device: Device) -> Result<()> {
    check_no_fraction(&a.data)?;
    let rec = TppRecord {
        backbone: a.backbone.source(),
        peft: a.peft.spec()?,
        data: a.data.source(),
        pretext: a.pretext,
        config: PretrainConfig {
            native_crops: a.native_crops,
            native_size: a.native_size,
            ..a.optim.pretrain(&a.data, &a.aug, &a.mae, 1.5e-3)?
        },
        decoder: a.decoder.decoder,
        freeze_decoder: a.decoder.freeze_decoder,
        dino: a.dino.config(),
        backbone_fingerprint: None,
    };
    pretrain_targets(&rec, &a.out, device)?;
    Ok(())
}

pub fn run_backbone(a: BackboneTrainArgs, device: Device) -> Result<()> {
    check_no_fraction(&a.data)?;
    let mut cfg = VitConfig::preset(&a.arch).ok_or_else(|| {
        let known = VitConfig::PRESETS.join(", ");
        crate::error::bad_input!("--arch '{}': unknown preset (known: {known})", a.arch)
    })?;
    let source = a.data.source();
    if a.img_size.is_none() || a.in_chans.is_none() {
        // The data's own size and channels (file-based formats: decoded at 224 px, RGB unless asked).
        let probe = VitConfig { img_size: a.img_size.unwrap_or(224), in_chans: a.in_chans.unwrap_or(3), ..cfg.clone() };
        let (ds, _) = source.open(&probe)?;
        cfg.img_size = a.img_size.unwrap_or(ds.image_size().0);
        cfg.in_chans = a.in_chans.unwrap_or(ds.channels());
    } else {
        (cfg.img_size, cfg.in_chans) = (a.img_size.unwrap_or(224), a.in_chans.unwrap_or(3));
    }
    cfg.patch_size = a.patch_size.unwrap_or(cfg.patch_size);
    if let Some(d) = a.embed_dim {
        cfg.embed_dim = d;
        cfg.mlp_hidden = 4 * d;
    }
    cfg.depth = a.depth.unwrap_or(cfg.depth);
    cfg.num_heads = a.heads.unwrap_or(cfg.num_heads);
    cfg.pool = Pool::Cls;
    cfg.validate().map_err(|e| crate::error::bad_input!("--arch/--patch-size/--embed-dim/--heads/--img-size: {e}"))?;
    let pcfg = a.optim.pretrain(&a.data, &a.aug, &a.mae, 1.5e-3)?;
    let pcfg = crate::train::pretrain::PretrainConfig { image_size: cfg.img_size, ..pcfg };
    pretrain_backbone(&cfg, &source, &pcfg, &a.out, device)?;
    Ok(())
}
