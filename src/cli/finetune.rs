//! `tpp finetune`: PEFT fine-tuning, optionally starting the target parameters from a TPP run.
use super::BackboneArgs;
use super::args::{AugArgs, DataArgs, OptimArgs, PeftArgs, SegArgs};
use crate::eval::metrics::Metric;
use crate::experiment::RunRecord;
use crate::train::finetune::FinetuneConfig;
use anyhow::Result;
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
    #[arg(value_parser = crate::check::float_flag(crate::check::UNIT_OPEN_HIGH), long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    /// Mixup alpha (0: off)
    #[arg(value_parser = crate::check::float_flag(crate::check::NON_NEGATIVE), long, default_value_t = 0.0)]
    pub mixup: f64,
    /// Early stopping: epochs without validation improvement (0: off)
    #[arg(value_parser = crate::check::int_flag(0, i64::MAX), long, default_value_t = 0)]
    pub patience: i64,
    /// Gradient accumulation steps
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i64).range(1..))]
    pub accum: i64,
    /// Layer-wise lr decay (full fine-tuning)
    #[arg(value_parser = crate::check::float_flag(crate::check::UNIT_OPEN_LOW), long, default_value_t = 1.0)]
    pub layer_decay: f64,
    #[command(flatten)]
    pub aug: AugArgs,
    #[command(flatten)]
    pub seg: SegArgs,
    /// Validation metric for best-epoch selection (default: auc; kappa for ordinal tasks, dice for
    /// segmentation)
    #[arg(long)]
    pub select: Option<Metric>,
    /// Linear probe (--peft linear): train the head on features computed once per image, without
    /// augmentation (the way benchmark papers probe; seconds instead of minutes)
    #[arg(long)]
    pub cached_features: bool,
    /// Run folder (run.json, adapter/, best/, checkpoint/, metrics.json, metrics.csv)
    #[arg(long, value_parser = crate::check::out_path)]
    pub out: PathBuf,
    /// Continue an interrupted run in --out (same arguments)
    #[arg(long)]
    pub resume: bool,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    let data = a.data.source();
    // The task and class count (no decoding); the data is read at the model's size by the run.
    let (task, num_classes) = data.describe()?;
    let peft = a.peft.spec()?;
    let o = &a.optim;
    let config = FinetuneConfig {
        epochs: o.epochs,
        batch_size: a.data.batch_size,
        lr: o.lr.unwrap_or(if peft.trains_backbone() { 1e-4 } else { 1e-3 }),
        min_lr: o.min_lr,
        warmup: o.warmup,
        weight_decay: o.weight_decay,
        clip: o.clip,
        seed: o.seed,
        label_smoothing: a.label_smoothing,
        mixup: a.mixup,
        patience: a.patience,
        accum: a.accum,
        layer_decay: a.layer_decay,
        // The backbone's size unless --img-size; filled in by the run.
        image_size: 0,
        norm: a.data.norm.norm(),
        augment: a.aug.augment()?,
        select: a.select.unwrap_or(Metric::default_for(task)),
        seg: a.seg.config()?,
        cached_features: a.cached_features,
        cpu_bf16: o.cpu_bf16,
    };
    let record = RunRecord {
        backbone: a.backbone.source(),
        peft,
        init_targets: a.init_targets.clone(),
        data,
        train_fraction: a.data.train_fraction,
        task,
        num_classes,
        config,
        fingerprints: Default::default(),
    };
    let out = crate::experiment::finetune::run(&record, &a.out, a.resume, device)?;
    let (state, ev) = (&out.state, &out.evaluation);
    let show: Vec<String> = ev.metrics.iter().map(|(k, v)| format!("{k} {v:.4}")).collect();
    tracing::info!(
        "best epoch {} (val {} {:.4}{}); test: {}",
        state.best_epoch,
        record.config.select,
        state.best_value,
        if state.stopped_early { ", stopped early" } else { "" },
        show.join(", ")
    );
    Ok(())
}
