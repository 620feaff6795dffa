//! `tpp finetune`: PEFT fine-tuning, optionally starting the target parameters from a TPP run.
use super::BackboneArgs;
use super::args::{DataArgs, OptimArgs, PeftArgs};
use super::run::{RunRecord, targets_dir};
use crate::data::Task;
use crate::data::loader::LoaderConfig;
use crate::data::transforms::{Augment, Norm};
use crate::model::PeftModel;
use crate::peft;
use crate::train::finetune::{FinetuneConfig, evaluate, finetune, load_model, write_evaluation};
use anyhow::{Context, Result, anyhow, bail};
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[command(flatten)]
    pub peft: PeftArgs,
    /// Start the target parameters from a TPP run (`tpp pretrain-targets --out` folder) instead of their
    /// usual initialisation
    #[arg(long)]
    pub init_targets: Option<PathBuf>,
    #[command(flatten)]
    pub data: DataArgs,
    #[command(flatten)]
    pub optim: OptimArgs,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Mixup alpha (0: off)
    #[arg(long, default_value_t = 0.0)]
    pub mixup: f64,
    /// Early stopping: epochs without validation improvement (0: off)
    #[arg(long, default_value_t = 0)]
    pub patience: i64,
    /// Gradient accumulation steps
    #[arg(long, default_value_t = 1)]
    pub accum: i64,
    /// Layer-wise lr decay (full fine-tuning)
    #[arg(long, default_value_t = 1.0)]
    pub layer_decay: f64,
    /// Augmentation: random resized crop min area (1: none)
    #[arg(long, default_value_t = 0.8)]
    pub crop_min_area: f64,
    /// Augmentation: max rotation in degrees
    #[arg(long, default_value_t = 0.0)]
    pub rotate: f64,
    /// Augmentation: brightness/contrast jitter
    #[arg(long, default_value_t = 0.0)]
    pub jitter: f64,
    #[arg(long)]
    pub no_hflip: bool,
    /// Validation metric for best-epoch selection (default: auc; kappa for ordinal tasks)
    #[arg(long)]
    pub select: Option<String>,
    /// Run folder (run.json, adapter/, best/, checkpoint/, metrics.json, metrics.csv)
    #[arg(long)]
    pub out: PathBuf,
    /// Continue an interrupted run in --out (same arguments)
    #[arg(long)]
    pub resume: bool,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    let ds = crate::data::open(&a.data.data, a.data.format.as_deref())?.with_train_fraction(a.data.train_fraction, a.optim.seed)?;
    if ds.task == Task::Segmentation {
        bail!("{}: segmentation fine-tuning is not available yet in this version", a.data.data.display());
    }
    let spec = a.peft.spec();
    let (mut model, ck) = PeftModel::build(&a.backbone.backbone, &a.backbone.load_options(), &spec, device, a.optim.seed)?;
    let img = model.bb.vit.cfg.img_size;
    model.bb.check_input(&[1, ds.channels(), img, img]).map_err(|e| anyhow!("{}: {e}", a.data.data.display()))?;
    if let Some(init) = &a.init_targets {
        let dir = targets_dir(init)?;
        let saved = peft::io::read_spec(&dir)?;
        if saved.methods != spec.methods {
            bail!("{}: target parameters of '{}', but --peft is '{}'", dir.display(), saved.label(), spec.label());
        }
        peft::io::load_values(&model.targets, &dir, false)?;
    }
    model.add_head(ds.num_classes);
    let lr = a.optim.lr.unwrap_or(if model.is_full() { 1e-4 } else { 1e-3 });
    let select = a.select.clone().unwrap_or_else(|| if ds.task == Task::Ordinal { "kappa".into() } else { "auc".into() });
    let cfg = FinetuneConfig {
        epochs: a.optim.epochs,
        batch_size: a.data.batch_size,
        lr,
        min_lr: a.optim.min_lr,
        warmup: a.optim.warmup,
        weight_decay: a.optim.weight_decay,
        clip: a.optim.clip,
        seed: a.optim.seed,
        label_smoothing: a.label_smoothing,
        mixup: a.mixup,
        patience: a.patience,
        accum: a.accum.max(1),
        layer_decay: a.layer_decay,
        image_size: img,
        norm: Norm::parse(&a.data.norm)?,
        augment: Augment { hflip: !a.no_hflip, vflip: false, crop_min_area: a.crop_min_area, rotate_deg: a.rotate, jitter: a.jitter },
        select,
    };
    if cfg.epochs <= 0 || cfg.batch_size <= 0 {
        bail!("--epochs and --batch-size must be positive");
    }
    let record = RunRecord {
        backbone: a.backbone.backbone.clone(),
        heads: a.backbone.heads,
        img_size: a.backbone.img_size,
        pool: a.backbone.pool,
        peft: spec.clone(),
        init_targets: a.init_targets.clone(),
        data: a.data.data.clone(),
        format: a.data.format.clone(),
        train_fraction: a.data.train_fraction,
        task: ds.task,
        num_classes: ds.num_classes,
        config: cfg.clone(),
    };
    let exists = a.out.join(super::run::RUN_JSON).exists();
    if exists && !a.resume {
        bail!("{}: a run already exists here; pass --resume to continue it or choose another --out", a.out.display());
    }
    if a.resume && exists {
        let old = RunRecord::read(&a.out)?;
        if old != record {
            bail!("{}: --resume with arguments that differ from the recorded run (see run.json)", a.out.display());
        }
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create", a.out.display()))?;
    record.write(&a.out)?;
    let (trainable, total) = model.counts();
    eprintln!(
        "fine-tuning {} ({:?}, {} classes; train/val/test {}/{}/{}) from {} [{}]: {} {}{}",
        ds.name,
        ds.task,
        ds.num_classes,
        ds.train.len(),
        ds.val.len(),
        ds.test.len(),
        a.backbone.backbone.display(),
        ck.format,
        spec.label(),
        peft::count_line(trainable, total),
        if a.init_targets.is_some() { "; targets from TPP" } else { "" }
    );
    let state = finetune(&model, &ds, &cfg, &a.out, a.resume)?;
    // Model selection is over: the best-on-validation weights meet the test split once.
    load_model(&model, &a.out.join("best"))?;
    let loader = LoaderConfig { batch_size: 128, image_size: img, norm: cfg.norm, device, drop_last: false };
    let ev = evaluate(&model, &ds.test, ds.task, ds.num_classes, loader, "test")?;
    write_evaluation(&ev, &a.out)?;
    crate::train::finetune::save_model(&model, &a.out.join("adapter"))?;
    let show: Vec<String> = ev.metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
    eprintln!(
        "best epoch {} (val {} {:.4}{}); test: {}",
        state.best_epoch,
        cfg.select,
        state.best_value,
        if state.stopped_early { ", stopped early" } else { "" },
        show.join(", ")
    );
    Ok(())
}
