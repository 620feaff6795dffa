//! `tpp pretrain-targets` (the TPP stage) and `tpp pretrain-backbone` (MAE from scratch).
use super::BackboneArgs;
use super::args::{AugArgs, DataArgs, OptimArgs, PeftArgs};
use crate::backbone::{Backbone, Pool, VitConfig};
use crate::data::transforms::Norm;
use crate::model::PeftModel;
use crate::pretext::mae::{MaeConfig, MaeDecoder};
use crate::train::pretrain::{PretrainConfig, train_mae};
use anyhow::{Context, Result, bail};
use serde_json::json;
use std::path::{Path, PathBuf};
use tch::{Device, Tensor, nn};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pretext {
    Mae,
    Dino,
}

/// MAE pretext options.
#[derive(clap::Args, Debug, Clone)]
pub struct MaeArgs {
    #[arg(long, default_value_t = 0.75)]
    pub mask_ratio: f64,
    /// Decoder width (a fresh decoder; ignored when the checkpoint's decoder is used)
    #[arg(long, default_value_t = 512)]
    pub decoder_dim: i64,
    #[arg(long, default_value_t = 8)]
    pub decoder_depth: i64,
    #[arg(long, default_value_t = 16)]
    pub decoder_heads: i64,
    /// Decoder source: auto (the checkpoint's when it has one), checkpoint, or fresh
    #[arg(long, default_value = "auto")]
    pub decoder: String,
    /// Keep a loaded decoder frozen (only target parameters train)
    #[arg(long)]
    pub freeze_decoder: bool,
    /// Plain pixel targets instead of per-patch normalised ones
    #[arg(long)]
    pub no_norm_pix: bool,
    /// Write a reconstruction preview PNG every N epochs (0: only at the end)
    #[arg(long, default_value_t = 0)]
    pub preview_every: i64,
}

impl MaeArgs {
    fn config(&self) -> MaeConfig {
        MaeConfig {
            mask_ratio: self.mask_ratio,
            decoder_dim: self.decoder_dim,
            decoder_depth: self.decoder_depth,
            decoder_heads: self.decoder_heads,
            decoder_mlp_ratio: 4.0,
            norm_pix: !self.no_norm_pix,
        }
    }
}

/// DINO pretext options.
#[derive(clap::Args, Debug, Clone)]
pub struct DinoArgs {
    /// Prototypes of the DINO head
    #[arg(long, default_value_t = 4096)]
    pub dino_out_dim: i64,
    #[arg(long, default_value_t = 4)]
    pub dino_local_crops: i64,
    /// Local crop size in pixels (default: 0.43 x image size, a multiple of the patch size)
    #[arg(long, default_value_t = 0)]
    pub dino_local_size: i64,
    #[arg(long, default_value_t = 0.04)]
    pub dino_teacher_temp: f64,
    /// Teacher temperature at the start of the warm-up
    #[arg(long, default_value_t = 0.04)]
    pub dino_warmup_teacher_temp: f64,
    #[arg(long, default_value_t = 0)]
    pub dino_warmup_teacher_epochs: i64,
    /// EMA momentum at the start (cosine to 1)
    #[arg(long, default_value_t = 0.996)]
    pub dino_momentum: f64,
}

impl DinoArgs {
    fn config(&self) -> crate::pretext::dino::DinoConfig {
        crate::pretext::dino::DinoConfig {
            out_dim: self.dino_out_dim,
            local_crops: self.dino_local_crops,
            local_size: self.dino_local_size,
            teacher_temp: self.dino_teacher_temp,
            warmup_teacher_temp: self.dino_warmup_teacher_temp,
            warmup_teacher_epochs: self.dino_warmup_teacher_epochs,
            momentum: self.dino_momentum,
            ..Default::default()
        }
    }
}

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
    pub dino: DinoArgs,
    /// Output folder: targets/, pretext_head.safetensors, config.json, loss.csv, previews
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct BackboneTrainArgs {
    /// Architecture preset (vit_tiny_patch16_224, ...); the flags below override its fields
    #[arg(long, default_value = "vit_tiny_patch16_224")]
    pub arch: String,
    #[arg(long)]
    pub patch_size: Option<i64>,
    #[arg(long)]
    pub embed_dim: Option<i64>,
    #[arg(long)]
    pub depth: Option<i64>,
    #[arg(long)]
    pub heads: Option<i64>,
    /// Image size (default: the dataset's)
    #[arg(long)]
    pub img_size: Option<i64>,
    /// Input channels (default: the dataset's)
    #[arg(long)]
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
    #[arg(long)]
    pub out: PathBuf,
}

fn pretrain_config(
    data: &DataArgs,
    optim: &OptimArgs,
    aug: &AugArgs,
    mae: &MaeArgs,
    image_size: i64,
    default_lr: f64,
) -> Result<PretrainConfig> {
    if optim.epochs <= 0 || data.batch_size <= 0 {
        bail!("--epochs and --batch-size must be positive");
    }
    Ok(PretrainConfig {
        epochs: optim.epochs,
        batch_size: data.batch_size,
        lr: optim.lr.unwrap_or(default_lr),
        min_lr: optim.min_lr,
        warmup: optim.warmup,
        weight_decay: optim.weight_decay,
        clip: optim.clip,
        seed: optim.seed,
        image_size,
        norm: Norm::parse(&data.norm)?,
        augment: aug.augment()?,
        mae: mae.config(),
        preview_every: mae.preview_every,
    })
}

fn create_out(out: &Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create output folder", out.display()))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    crate::peft::io::write_text_atomic(path, &text)
}

fn save_tensors(path: &Path, named: &[(String, Tensor)]) -> Result<()> {
    crate::peft::io::write_safetensors_atomic(path, named)
}

/// The decoder's tensors under the original MAE names, plus its (fixed) position table.
fn decoder_tensors(vs: &nn::VarStore, dec: &MaeDecoder) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    v.push(("decoder_pos_embed".into(), dec.pos.shallow_clone()));
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Everything a TPP stage needs; written as `config.json` with the run's results.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TppRecord {
    pub backbone: PathBuf,
    pub heads: Option<i64>,
    pub img_size: Option<i64>,
    pub pool: Option<Pool>,
    pub peft: crate::peft::PeftSpec,
    pub data: PathBuf,
    pub format: Option<String>,
    pub pretext: Pretext,
    pub config: PretrainConfig,
    /// auto, checkpoint or fresh
    pub decoder: String,
    pub freeze_decoder: bool,
    #[serde(default)]
    pub dino: crate::pretext::dino::DinoConfig,
}

pub fn run_targets(a: TargetsArgs, device: Device) -> Result<()> {
    let cfg = pretrain_config(&a.data, &a.optim, &a.aug, &a.mae, 0, 1.5e-3)?;
    let rec = TppRecord {
        backbone: a.backbone.backbone.clone(),
        heads: a.backbone.heads,
        img_size: a.backbone.img_size,
        pool: a.backbone.pool,
        peft: a.peft.spec()?,
        data: a.data.data.clone(),
        format: a.data.format.clone(),
        pretext: a.pretext,
        config: cfg,
        decoder: a.mae.decoder.clone(),
        freeze_decoder: a.mae.freeze_decoder,
        dino: a.dino.config(),
    };
    execute_targets(&rec, &a.out, device)
}

/// Runs the TPP stage of `rec` into `out` (targets/, pretext_head.safetensors, config.json, loss.csv).
pub fn execute_targets(rec: &TppRecord, out: &Path, device: Device) -> Result<()> {
    let spec = &rec.peft;
    if !spec.adds_parameters() {
        bail!(
            "--peft {}: the TPP stage pre-trains PEFT target parameters; 'linear' and 'full' have none",
            spec.label()
        );
    }
    let opts = crate::backbone::LoadOptions { num_heads: rec.heads, img_size: rec.img_size, pool: rec.pool };
    let seed = rec.config.seed;
    let (model, ck) = PeftModel::build(&rec.backbone, &opts, spec, device, seed)?;
    let img = model.bb.vit.cfg.img_size;
    // File-based data is decoded at the model's size and channels (labels are not used here).
    let data_opts = crate::data::DataOptions {
        format: rec.format.clone(),
        image_size: Some(img),
        grey: model.bb.vit.cfg.in_chans == 1,
        mask_classes: 2,
        ..Default::default()
    };
    let (ds, _) = crate::data::open_with(&rec.data, &data_opts)?;
    model.bb.check_input(&[1, ds.channels(), img, img]).map_err(|e| anyhow::anyhow!("{}: {e}", rec.data.display()))?;
    let cfg = PretrainConfig { image_size: img, norm: rec.config.norm.resolve(&ds.train.images), ..rec.config.clone() };
    create_out(out)?;
    if rec.pretext == Pretext::Dino {
        drop(model);
        return execute_dino(rec, &cfg, &ds, &opts, out, device);
    }
    // The pretext head: the checkpoint's MAE decoder when it has one (unless --decoder fresh), else new.
    let mut dec_vs = nn::VarStore::new(device);
    let use_ck = match rec.decoder.as_str() {
        "auto" => ck.decoder.is_some(),
        "checkpoint" => {
            if ck.decoder.is_none() {
                bail!("{}: --decoder checkpoint, but the checkpoint has no MAE decoder", ck.path.display());
            }
            true
        }
        "fresh" => false,
        other => bail!("--decoder: '{other}' (expected auto, checkpoint or fresh)"),
    };
    let (dec, mae_cfg) = if use_ck {
        let (d, mut c) = MaeDecoder::from_checkpoint(&dec_vs.root(), &ck, &dec_vs, "")?;
        c.mask_ratio = cfg.mae.mask_ratio;
        c.norm_pix = cfg.mae.norm_pix;
        (d, c)
    } else {
        tch::manual_seed(seed as i64 + 1);
        let d = MaeDecoder::new(&dec_vs.root(), &model.bb.vit.cfg, &cfg.mae, ds.channels())?;
        (d, cfg.mae.clone())
    };
    let cfg = PretrainConfig { mae: mae_cfg, ..cfg };
    let mut params: Vec<(String, Tensor)> = model.targets.vs.variables().into_iter().collect();
    if !(use_ck && rec.freeze_decoder) {
        params.extend(dec_vs.variables().into_iter().map(|(k, v)| (format!("pretext.{k}"), v)));
    } else {
        dec_vs.freeze();
    }
    params.sort_by(|x, y| x.0.cmp(&y.0));
    let (trainable, total) = model.counts();
    eprintln!(
        "TPP ({}) on {} ({} train images, labels unused): {} {}; decoder {} ({})",
        serde_json::to_value(rec.pretext)?.as_str().unwrap_or("?"),
        ds.name,
        ds.train.len(),
        spec.label(),
        crate::peft::count_line(trainable, total),
        if use_ck { "from checkpoint" } else { "fresh" },
        if use_ck && rec.freeze_decoder { "frozen" } else { "trained" }
    );
    let targets_dir = out.join("targets");
    let head_path = out.join("pretext_head.safetensors");
    let mut save = || -> Result<()> {
        crate::peft::io::save(&model.targets, &targets_dir)?;
        save_tensors(&head_path, &decoder_tensors(&dec_vs, &dec))
    };
    let summary = train_mae(&model.bb.vit, &dec, params, &ds.train, &cfg, device, out, &mut save)?;
    let run = TppRun { rec, cfg: &cfg, format: ck.format, ds: &ds, device, trainable, total };
    run.finish(out, &summary, ("decoder_used", if use_ck { "checkpoint" } else { "fresh" }))
}

/// What a finished TPP stage records in `config.json` and prints.
struct TppRun<'a> {
    rec: &'a TppRecord,
    cfg: &'a PretrainConfig,
    format: crate::backbone::Format,
    ds: &'a crate::data::Dataset,
    device: Device,
    trainable: i64,
    total: i64,
}

impl TppRun<'_> {
    fn finish(&self, out: &Path, summary: &crate::train::pretrain::PretrainSummary, extra: (&str, &str)) -> Result<()> {
        let mut record = json!({
            "command": "pretrain-targets",
            "record": TppRecord { config: self.cfg.clone(), ..self.rec.clone() },
            "backbone_format": self.format.to_string(),
            "dataset": self.ds.name, "train_images": self.ds.train.len(),
            "device": format!("{:?}", self.device),
            "trainable_params": self.trainable, "total_params": self.total,
            "steps": summary.steps, "first_loss": summary.first_loss, "final_loss": summary.final_loss,
            "seconds": summary.seconds, "images_per_s": summary.images_per_s,
            "version": env!("CARGO_PKG_VERSION"),
        });
        record[extra.0] = extra.1.into();
        write_json(&out.join("config.json"), &record)?;
        eprintln!(
            "done: {} steps, loss {:.4} -> {:.4}, {:.0} img/s; target parameters in {}",
            summary.steps,
            summary.first_loss,
            summary.final_loss,
            summary.images_per_s,
            out.join("targets").display()
        );
        Ok(())
    }
}

/// The DINO variant of the TPP stage: the teacher's (EMA) target parameters are saved, as DINO evaluates
/// its teacher; the pretext head saved is the teacher's head.
fn execute_dino(
    rec: &TppRecord,
    cfg: &PretrainConfig,
    ds: &crate::data::Dataset,
    opts: &crate::backbone::LoadOptions,
    out: &Path,
    device: Device,
) -> Result<()> {
    use crate::pretext::dino::DinoHead;
    let spec = &rec.peft;
    let seed = cfg.seed;
    let (bb, ck) = Backbone::load(&rec.backbone, opts, device)?;
    let mut teacher = bb.vit.share_backbone();
    let student = PeftModel::from_backbone(bb, spec, device, seed)?;
    let mut t_targets = crate::peft::Targets::attach(&mut teacher, spec, device)?;
    t_targets.vs.copy(&student.targets.vs)?;
    t_targets.vs.freeze();
    let d = student.bb.vit.cfg.embed_dim;
    let s_head_vs = nn::VarStore::new(device);
    tch::manual_seed(seed as i64 + 1);
    let s_head = DinoHead::new(&s_head_vs.root(), d, &rec.dino);
    let mut t_head_vs = nn::VarStore::new(device);
    let t_head = DinoHead::new(&t_head_vs.root(), d, &rec.dino);
    t_head_vs.copy(&s_head_vs)?;
    t_head_vs.freeze();
    let mut params: Vec<(String, Tensor)> = student.targets.vs.variables().into_iter().collect();
    params.extend(s_head_vs.variables().into_iter().map(|(k, v)| (format!("pretext.{k}"), v)));
    params.sort_by(|x, y| x.0.cmp(&y.0));
    let (trainable, total) = student.counts();
    eprintln!(
        "TPP (dino) on {} ({} train images, labels unused): {} {}; DINO head {} prototypes, {} local crops",
        ds.name,
        ds.train.len(),
        spec.label(),
        crate::peft::count_line(trainable, total),
        rec.dino.out_dim,
        rec.dino.local_crops
    );
    let targets_dir = out.join("targets");
    let head_path = out.join("pretext_head.safetensors");
    let mut save = || -> Result<()> {
        crate::peft::io::save(&t_targets, &targets_dir)?;
        let mut named: Vec<(String, Tensor)> =
            t_head_vs.variables().into_iter().map(|(k, v)| (format!("dino_head.{k}"), v)).collect();
        named.sort_by(|x, y| x.0.cmp(&y.0));
        save_tensors(&head_path, &named)
    };
    let parts = crate::train::pretrain::DinoParts {
        student: &student.bb.vit,
        teacher: &teacher,
        s_head: &s_head,
        t_head: &t_head,
        ema: vec![(&t_targets.vs, &student.targets.vs), (&t_head_vs, &s_head_vs)],
    };
    let summary =
        crate::train::pretrain::train_dino(&parts, params, &ds.train, cfg, &rec.dino, device, out, &mut save)?;
    let run = TppRun { rec, cfg, format: ck.format, ds, device, trainable, total };
    run.finish(out, &summary, ("saved_targets", "teacher (EMA)"))
}

pub fn run_backbone(a: BackboneTrainArgs, device: Device) -> Result<()> {
    let ds = crate::data::open(&a.data.data, a.data.format.as_deref())?;
    let mut cfg = VitConfig::preset(&a.arch).ok_or_else(|| {
        anyhow::anyhow!("--arch '{}': unknown preset (known: {})", a.arch, VitConfig::PRESETS.join(", "))
    })?;
    let (h, _) = ds.image_size();
    cfg.patch_size = a.patch_size.unwrap_or(cfg.patch_size);
    if let Some(d) = a.embed_dim {
        cfg.embed_dim = d;
        cfg.mlp_hidden = 4 * d;
    }
    cfg.depth = a.depth.unwrap_or(cfg.depth);
    cfg.num_heads = a.heads.unwrap_or(cfg.num_heads);
    cfg.img_size = a.img_size.unwrap_or(h);
    cfg.in_chans = a.in_chans.unwrap_or(ds.channels());
    cfg.pool = Pool::Cls;
    cfg.validate().map_err(|e| anyhow::anyhow!("--arch/--patch-size/...: {e}"))?;
    let pcfg = pretrain_config(&a.data, &a.optim, &a.aug, &a.mae, cfg.img_size, 1.5e-3)?;
    drop(ds);
    execute_backbone(&cfg, &a.data.data, a.data.format.as_deref(), &pcfg, &a.out, device)
}

/// MAE pre-training of a fresh ViT of `cfg` on the training images of `data`; writes
/// `<out>/backbone.safetensors` (original MAE layout: timm encoder + decoder) and `<out>/config.json`.
pub fn execute_backbone(
    cfg: &VitConfig,
    data: &Path,
    format: Option<&str>,
    pcfg: &PretrainConfig,
    out: &Path,
    device: Device,
) -> Result<()> {
    let ds = crate::data::open(data, format)?;
    create_out(out)?;
    tch::manual_seed(pcfg.seed as i64);
    let bb = Backbone::fresh(cfg, device)?;
    let dec_vs = nn::VarStore::new(device);
    let dec = MaeDecoder::new(&dec_vs.root(), cfg, &pcfg.mae, cfg.in_chans)?;
    let mut params: Vec<(String, Tensor)> = bb.vs.variables().into_iter().collect();
    params.extend(dec_vs.variables().into_iter().map(|(k, v)| (format!("pretext.{k}"), v)));
    params.sort_by(|x, y| x.0.cmp(&y.0));
    let total: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
    eprintln!(
        "MAE pre-training of a ViT (width {}, depth {}, heads {}, patch {}, {} px, {} ch) on {} ({} images): {total} parameters",
        cfg.embed_dim,
        cfg.depth,
        cfg.num_heads,
        cfg.patch_size,
        cfg.img_size,
        cfg.in_chans,
        ds.name,
        ds.train.len()
    );
    let path = out.join("backbone.safetensors");
    let mut save = || -> Result<()> {
        // Original MAE layout: timm encoder names plus the decoder, so `--backbone` reads it and the TPP
        // stage can reuse the decoder.
        let mut named = bb.vit.state_dict().map_err(|e| anyhow::anyhow!(e))?;
        named.extend(decoder_tensors(&dec_vs, &dec));
        save_tensors(&path, &named)
    };
    let summary = train_mae(&bb.vit, &dec, params, &ds.train, pcfg, device, out, &mut save)?;
    let record = json!({
        "command": "pretrain-backbone", "arch": cfg,
        // Read back by the checkpoint loader (HF config.json keys): heads cannot be inferred from shapes.
        "num_attention_heads": cfg.num_heads, "decoder_num_attention_heads": pcfg.mae.decoder_heads, "data": data, "dataset": ds.name,
        "config": pcfg, "steps": summary.steps, "first_loss": summary.first_loss, "final_loss": summary.final_loss,
        "seconds": summary.seconds, "images_per_s": summary.images_per_s, "version": env!("CARGO_PKG_VERSION"),
    });
    write_json(&out.join("config.json"), &record)?;
    eprintln!(
        "done: {} steps, loss {:.4} -> {:.4}; backbone in {}",
        summary.steps,
        summary.first_loss,
        summary.final_loss,
        path.display()
    );
    Ok(())
}
