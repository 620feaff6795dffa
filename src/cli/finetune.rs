//! `tpp finetune`: PEFT fine-tuning, optionally starting the target parameters from a TPP run.
use super::BackboneArgs;
use super::args::{AugArgs, DataArgs, OptimArgs, PeftArgs};
use super::run::{RunRecord, targets_dir};
use crate::data::Task;
use crate::data::loader::LoaderConfig;
use crate::data::transforms::Norm;
use crate::model::PeftModel;
use crate::peft;
use crate::train::finetune::{
    Evaluation, FinetuneConfig, RunStats, State, evaluate, finetune, load_model, write_evaluation,
};
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
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
    #[command(flatten)]
    pub aug: AugArgs,
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
    // The task and class count (no decoding); the data is read at the model's size in `execute`.
    let probe = crate::data::DataOptions {
        format: a.data.format.clone(),
        image_size: Some(16),
        grey: true,
        skip_bad: a.data.skip_bad,
        mask_classes: a.data.mask_classes,
        labels: a.data.labels.clone(),
    };
    let (task, num_classes) = crate::data::describe(&a.data.data, &probe)?;
    let select = a.select.clone().unwrap_or_else(|| default_select(task).into());
    let is_full = a.peft.peft.iter().any(|m| m.get().trains_backbone());
    let cfg = FinetuneConfig {
        epochs: a.optim.epochs,
        batch_size: a.data.batch_size,
        lr: a.optim.lr.unwrap_or(if is_full { 1e-4 } else { 1e-3 }),
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
        // The backbone's size unless --img-size; filled in by `execute`.
        image_size: 0,
        norm: Norm::parse(&a.data.norm)?,
        augment: a.aug.augment()?,
        select,
    };
    let record = RunRecord {
        backbone: a.backbone.backbone.clone(),
        heads: a.backbone.heads,
        img_size: a.backbone.img_size,
        pool: a.backbone.pool,
        peft: a.peft.spec()?,
        init_targets: a.init_targets.clone(),
        data: a.data.data.clone(),
        format: a.data.format.clone(),
        train_fraction: a.data.train_fraction,
        skip_bad: a.data.skip_bad,
        mask_classes: a.data.mask_classes,
        labels: a.data.labels.clone(),
        task,
        num_classes,
        config: cfg,
    };
    let (state, ev) = execute(&record, &a.out, a.resume, device)?;
    let show: Vec<String> = ev.metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
    eprintln!(
        "best epoch {} (val {} {:.4}{}); test: {}",
        state.best_epoch,
        record.config.select,
        state.best_value,
        if state.stopped_early { ", stopped early" } else { "" },
        show.join(", ")
    );
    Ok(())
}

pub fn default_select(task: Task) -> &'static str {
    match task {
        Task::Ordinal => "kappa",
        Task::Segmentation => "dice",
        _ => "auc",
    }
}

/// Runs (or resumes) one fine-tuning run described by `rec` in `out`: train with selection on
/// validation, then one evaluation of the best weights on the test split. Writes the run folder.
/// The model of a run before training: backbone, target parameters (from `init_targets` when given,
/// their usual init otherwise) and a fresh head; with the (label-subsetted) dataset.
#[allow(clippy::type_complexity)]
pub fn prepare(
    rec: &RunRecord,
    device: Device,
) -> Result<(PeftModel, crate::data::Dataset, crate::backbone::Checkpoint, Option<crate::data::SplitRecord>)> {
    let spec = &rec.peft;
    let (mut model, ck) = PeftModel::build(&rec.backbone, &rec.load_options(), spec, device, rec.config.seed)?;
    let (ds, files) = rec.open_data(&model, None)?;
    let ds = ds.with_train_fraction(rec.train_fraction, rec.config.seed)?;
    let img = model.bb.vit.cfg.img_size;
    model.bb.check_input(&[1, ds.channels(), img, img]).map_err(|e| anyhow!("{}: {e}", rec.data.display()))?;
    if let Some(init) = &rec.init_targets {
        let dir = targets_dir(init)?;
        let saved = peft::io::read_spec(&dir)?;
        if saved.methods != spec.methods {
            bail!("{}: target parameters of '{}', but --peft is '{}'", dir.display(), saved.label(), spec.label());
        }
        peft::io::load_values(&model.targets, &dir, false)?;
    }
    if ds.task == Task::Segmentation {
        model.add_seg_head(ds.num_classes);
    } else {
        model.add_head(ds.num_classes);
    }
    Ok((model, ds, ck, files))
}

/// Runs (or resumes) one fine-tuning run described by `rec` in `out`: train with selection on
/// validation, then one evaluation of the best weights on the test split. Writes the run folder.
pub fn execute(rec: &RunRecord, out: &Path, resume: bool, device: Device) -> Result<(State, Evaluation)> {
    let (model, ds, ck, files) = prepare(rec, device)?;
    let spec = &rec.peft;
    let img = model.bb.vit.cfg.img_size;
    let mut rec = rec.clone();
    rec.config.image_size = img;
    rec.config.norm = rec.config.norm.resolve(&ds.train.images);
    let cfg = &rec.config;
    if cfg.epochs <= 0 || cfg.batch_size <= 0 {
        bail!("--epochs and --batch-size must be positive");
    }
    let exists = out.join(super::run::RUN_JSON).exists();
    if exists && !resume {
        bail!("{}: a run already exists here; pass --resume to continue it or choose another --out", out.display());
    }
    if resume && exists {
        let old = RunRecord::read(out)?;
        if old != rec {
            bail!("{}: --resume with arguments that differ from the recorded run (see run.json)", out.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    rec.write(out)?;
    if let Some((f, parts)) = &files {
        crate::data::folder::write_splits(&out.join("splits.csv"), f, parts)?;
    }
    let (trainable, total) = model.counts();
    eprintln!(
        "fine-tuning {} ({:?}, {} classes; train/val/test {}/{}/{}) from {} [{}]: {} {}{}",
        ds.name,
        ds.task,
        ds.num_classes,
        ds.train.len(),
        ds.val.len(),
        ds.test.len(),
        rec.backbone.display(),
        ck.format,
        spec.label(),
        peft::count_line(trainable, total),
        if rec.init_targets.is_some() { "; targets from TPP" } else { "" }
    );
    crate::device::reset_peak_memory(device);
    let state = finetune(&model, &ds, cfg, out, resume)?;
    // Model selection is over: the best-on-validation weights meet the test split once.
    load_model(&model, &out.join("best"))?;
    let loader = LoaderConfig { batch_size: 128, image_size: img, norm: cfg.norm, device, drop_last: false };
    let ev = evaluate(&model, &ds.test, ds.task, ds.num_classes, loader, "test")?;
    crate::train::finetune::save_model(&model, &out.join("adapter"))?;
    let extra = RunStats {
        trainable_params: trainable,
        total_params: total,
        seconds: state.history.iter().map(|r| r.seconds).sum(),
        images_per_s: {
            let h = &state.history;
            h.iter().map(|r| r.images_per_s).sum::<f64>() / h.len().max(1) as f64
        },
        peak_memory_bytes: crate::device::peak_memory(device),
        best_epoch: state.best_epoch,
        best_val: state.best_value,
    };
    write_evaluation(&ev, out, &extra)?;
    // Training curves and the confusion matrix as pictures.
    let loss: Vec<(f64, f64)> = state.history.iter().map(|r| (r.epoch as f64, r.train_loss)).collect();
    let val: Vec<(f64, f64)> =
        state.history.iter().filter_map(|r| Some((r.epoch as f64, *r.val.get(&cfg.select)?))).collect();
    crate::eval::plots::lines(
        &out.join("curves.png"),
        "training loss and validation metric",
        "epoch",
        "value",
        &[("train loss".to_string(), loss), (format!("val {}", cfg.select), val)],
    )?;
    if let Some(cm) = &ev.confusion {
        crate::eval::plots::confusion(&out.join("confusion.png"), cm)?;
    }
    Ok((state, ev))
}
