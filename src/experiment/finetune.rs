//! A fine-tuning run in its folder: build the model (target parameters from a TPP stage when asked),
//! train with selection on validation, then score the best weights once on the test split and write the
//! run folder (`run.json`, `adapter/`, `best/`, `checkpoint/`, `metrics.json`, `metrics.csv`, plots).
use super::records::{RUN_JSON, RunRecord, targets_dir};
use crate::backbone::Checkpoint;
use crate::data::loader::LoaderConfig;
use crate::data::{Dataset, SplitRecord};
use crate::eval::evaluate::{Evaluation, RunStats, evaluate, write_evaluation};
use crate::model::PeftModel;
use crate::peft;
use crate::train::callbacks::Checkpointable;
use crate::train::finetune::finetune;
use crate::train::trainer::TrainState;
use anyhow::{Context, Result};
use std::path::Path;
use tch::Device;

/// The model and data of a run before training.
pub struct Prepared {
    /// Backbone, target parameters (from the TPP stage when the run names one) and a fresh task head.
    pub model: PeftModel,
    /// The data, with the training labels thinned to the run's fraction.
    pub ds: Dataset,
    /// The backbone checkpoint.
    pub checkpoint: Checkpoint,
    /// Files and split of file-based data (for `splits.csv`).
    pub files: Option<SplitRecord>,
}

/// What a finished run gives.
pub struct Outcome {
    /// The training run's final state (history, best epoch).
    pub state: TrainState,
    /// The test-split evaluation of the best weights.
    pub evaluation: Evaluation,
}

/// The model of a run before training: backbone, target parameters (from `init_targets` when given,
/// their usual init otherwise) and a fresh head; with the (label-subsetted) dataset.
pub fn prepare(rec: &RunRecord, device: Device) -> Result<Prepared> {
    let spec = &rec.peft;
    let (mut model, checkpoint) = rec.backbone.model(spec, device, rec.config.seed)?;
    let (ds, files) = rec.open_data(&model, None)?;
    let ds = ds.with_train_fraction(rec.train_fraction, rec.config.seed)?;
    let img = model.bb.vit.config().img_size;
    let data = rec.data.data.display();
    model.bb.check_input(&[1, ds.channels(), img, img]).map_err(|e| crate::error::bad_input!("{data}: {e}"))?;
    rec.config.select.check_for(ds.task, ds.num_classes).map_err(|e| crate::error::bad_input!("--select: {e}"))?;
    check_usable(rec, &ds)?;
    if let Some(init) = &rec.init_targets {
        check_same_backbone(rec, init)?;
        let dir = targets_dir(init)?;
        let saved = peft::io::read_spec(&dir)?;
        if saved.methods != spec.methods {
            let (s, p) = (saved.label(), spec.label());
            return Err(crate::error::bad_input!("{}: target parameters of '{s}', but --peft is '{p}'", dir.display()));
        }
        // Options that change no shape (LoRA's alpha, ...) would otherwise load silently.
        if let Some(d) = saved.option_differences(spec).first() {
            return Err(crate::error::bad_input!(
                "{}: target parameters made with {d}; use the same PEFT options",
                dir.display()
            ));
        }
        peft::io::load_values(&model.targets, &dir, false)?;
    }
    model.add_task_head(ds.task, ds.num_classes, rec.config.seg.head);
    Ok(Prepared { model, ds, checkpoint, files })
}

/// Options the data cannot use, refused before training rather than ignored or failing at the end.
fn check_usable(rec: &RunRecord, ds: &Dataset) -> Result<()> {
    if rec.config.mixup > 0.0 && ds.task == crate::data::Task::Segmentation {
        return Err(crate::error::bad_input!("--mixup: mixes labels of whole images; segmentation has none to mix"));
    }
    if rec.config.cached_features {
        let spec = &rec.peft;
        if spec.adds_parameters() || spec.trains_backbone() {
            let e = "--cached-features: trains the head on fixed features, so only a linear probe (--peft linear)";
            return Err(crate::error::bad_input!("{e}, not '{}'", spec.label()));
        }
        if ds.task == crate::data::Task::Segmentation || rec.config.mixup > 0.0 {
            let e = "--cached-features: a linear probe of classification labels without mixup";
            return Err(crate::error::bad_input!("{}: {e}", rec.data.data.display()));
        }
    }
    if ds.task != crate::data::Task::Segmentation && rec.config.seg != Default::default() {
        return Err(crate::error::bad_input!(
            "{}: --seg-* options ([finetune.seg]) apply to segmentation data (images/ + masks/), not {:?} labels",
            rec.data.data.display(),
            ds.task
        ));
    }
    // Selection by AUC needs both outcomes in the validation split (some label with both, for
    // multi-label data).
    if rec.config.select == crate::eval::metrics::Metric::Auc {
        let v = &ds.val.labels;
        let both = if ds.task == crate::data::Task::Multilabel {
            let (lo, hi) = (v.amin([0], false), v.amax([0], false));
            lo.lt_tensor(&hi).any().int64_value(&[]) != 0
        } else {
            v.amin([0], false).int64_value(&[]) != v.amax([0], false).int64_value(&[])
        };
        if !both {
            return Err(crate::error::bad_input!(
                "{}: the validation split has a single class, so its AUC is undefined; select by another metric \
                 (--select accuracy) or use more data",
                rec.data.data.display()
            ));
        }
    }
    Ok(())
}

/// Checks the run folder: a run already there continues only with `resume` and the same record (the same
/// inputs too: their fingerprints).
fn claim_folder(rec: &RunRecord, out: &Path, resume: bool) -> Result<()> {
    let exists = out.join(RUN_JSON).exists();
    if exists && !resume {
        let e = "a run already exists here; pass --resume to continue it or choose another --out";
        return Err(crate::error::bad_input!("{}: {e}", out.display()));
    }
    if resume && exists {
        let old = RunRecord::read(out)?.normalised_like(rec);
        if old != *rec {
            let changes = super::compare::changes(&old, rec)?.join(", ");
            let e = "--resume with arguments (or inputs) that differ from the recorded run (see run.json)";
            return Err(crate::error::bad_input!("{}: {e}: {changes}", out.display()));
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))
}

/// An error when the TPP stage that made `init`'s target parameters ran on another backbone than `rec`'s.
fn check_same_backbone(rec: &RunRecord, init: &Path) -> Result<()> {
    let Some(tpp) = super::records::TppRecord::of_output(init)? else { return Ok(()) };
    let same = match (&tpp.backbone_fingerprint, &rec.fingerprints.backbone) {
        (Some(a), Some(b)) => a == b,
        _ => super::records::absolute(&tpp.backbone.path) == super::records::absolute(&rec.backbone.path),
    };
    if !same {
        return Err(crate::error::bad_input!(
            "{}: these target parameters were pre-trained on {}, not on this run's backbone {}",
            init.display(),
            tpp.backbone.path.display(),
            rec.backbone.path.display()
        ));
    }
    Ok(())
}

/// Runs (or resumes) the fine-tuning run of `rec` in `out`: train with selection on validation, then one
/// evaluation of the best weights on the test split. Writes the run folder. A run trained by
/// [`train_untested`] is finished by this with `resume` (no epoch is trained again).
pub fn run(rec: &RunRecord, out: &Path, resume: bool, device: Device) -> Result<Outcome> {
    // Data-parallel: the other processes write into scratch folders, removed at the end.
    let dir = crate::dist::OutDir::for_rank(out)?;
    let out = dir.path();
    let (model, ds, rec, state) = train(rec, out, resume, device)?;
    let evaluation = crate::profile::time("test and run files", || finish(&model, &ds, &rec, &state, out))?;
    Ok(Outcome { state, evaluation })
}

/// The file of a run trained without reading the test split ([`train_untested`]).
pub const VALIDATION_JSON: &str = "validation.json";

/// What [`train_untested`] records: the run's selection on validation.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ValidationRecord {
    /// The selection metric.
    pub select: String,
    /// Its best validation value (null: none was finite).
    pub best_val: Option<f64>,
    /// The epoch it was reached at.
    pub best_epoch: i64,
    /// Epochs trained.
    pub epochs: i64,
    /// Peak device memory while training (CUDA), kept for the report of a run tested later.
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
}

impl ValidationRecord {
    /// Reads `<dir>/validation.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        super::records::read_json(&dir.join(VALIDATION_JSON), "a validation record")
    }
}

/// Trains (or resumes) the run of `rec` in `out` with selection on validation, and stops before the test
/// split: writes `validation.json` (best value and epoch) instead of `metrics.json`. A candidate of a
/// comparison's TPP sweep; [`run`] with `resume` later tests the one picked.
pub fn train_untested(rec: &RunRecord, out: &Path, resume: bool, device: Device) -> Result<ValidationRecord> {
    let dir = crate::dist::OutDir::for_rank(out)?;
    let out = dir.path();
    let (_, _, rec, state) = train(rec, out, resume, device)?;
    let v = ValidationRecord {
        select: rec.config.select.name(),
        best_val: state.best_value.is_finite().then_some(state.best_value),
        best_epoch: state.best_epoch,
        epochs: state.epochs_done,
        peak_memory_bytes: crate::device::peak_memory(device),
    };
    if crate::dist::is_writer() {
        crate::peft::io::write_text_atomic(&out.join(VALIDATION_JSON), &serde_json::to_string_pretty(&v)?)?;
    }
    Ok(v)
}

/// The training part of a run: prepare, claim the folder, write the record, fine-tune.
fn train(
    rec: &RunRecord,
    out: &Path,
    resume: bool,
    device: Device,
) -> Result<(PeftModel, Dataset, RunRecord, TrainState)> {
    rec.validate()?;
    let rec = &rec.resolved()?;
    let Prepared { model, ds, checkpoint, files } =
        crate::profile::time("load model and data", || prepare(rec, device))?;
    let mut rec = rec.clone();
    rec.config.image_size = model.bb.vit.config().img_size;
    rec.config.norm = rec.config.norm.resolve(&ds.train.images);
    rec.config.validate()?;
    claim_folder(&rec, out, resume)?;
    rec.write(out)?;
    crate::device::set_cpu_bf16(rec.config.cpu_bf16);
    if let Some((f, parts)) = &files {
        crate::data::folder::write_splits(&out.join("splits.csv"), f, parts)?;
    }
    let (trainable, total) = model.counts();
    tracing::info!(
        "fine-tuning {} ({:?}, {} classes; train/val/test {}/{}/{}) from {} [{}]: {} {}{}",
        ds.name,
        ds.task,
        ds.num_classes,
        ds.train.len(),
        ds.val.len(),
        ds.test.len(),
        rec.backbone.path.display(),
        checkpoint.format,
        rec.peft.label(),
        peft::count_line(trainable, total),
        if rec.init_targets.is_some() { "; targets from TPP" } else { "" }
    );
    crate::device::reset_peak_memory(device);
    let state = crate::profile::time("fine-tuning", || finetune(&model, &ds, &rec.config, out, resume))?;
    Ok((model, ds, rec, state))
}

/// Loads the best epoch's weights; in a data-parallel run rank 0's (the others' scratch folders lack an
/// epoch that was best before a resume).
fn load_best(model: &PeftModel, best: &Path) -> Result<()> {
    if crate::dist::is_writer() {
        model.load(best)?;
    }
    if let Some(g) = crate::dist::current() {
        let ts: Vec<tch::Tensor> = model.trainable().into_iter().map(|(_, t)| t).collect();
        g.broadcast_in_place(&ts)?;
    }
    Ok(())
}

/// After training: the best-on-validation weights meet the test split once; `adapter/`, `metrics.json`,
/// curves and the confusion matrix are written.
fn finish(model: &PeftModel, ds: &Dataset, rec: &RunRecord, state: &TrainState, out: &Path) -> Result<Evaluation> {
    let cfg = &rec.config;
    load_best(model, &out.join("best"))?;
    let loader = LoaderConfig {
        batch_size: 128,
        image_size: cfg.image_size,
        norm: cfg.norm,
        device: model.device,
        drop_last: false,
        tiles: cfg.seg.tiles(cfg.image_size),
    };
    let ev = evaluate(model, &ds.test, ds.task, ds.num_classes, loader, "test")?;
    model.save(&out.join("adapter"))?;
    let (trainable, total) = model.counts();
    let h = &state.history;
    let stats = RunStats {
        trainable_params: trainable,
        total_params: total,
        seconds: state.setup_seconds + h.iter().map(|r| r.seconds).sum::<f64>(),
        images_per_s: h.iter().map(|r| r.images_per_s).sum::<f64>() / h.len().max(1) as f64,
        // A run trained earlier without its test (a sweep's pick) reports the peak of its training.
        peak_memory_bytes: crate::device::peak_memory(model.device)
            .max(ValidationRecord::read(out).ok().and_then(|v| v.peak_memory_bytes)),
        best_epoch: state.best_epoch,
        best_val: state.best_value,
    };
    write_evaluation(&ev, out, &stats)?;
    let select = cfg.select.name();
    let select = select.as_str();
    let loss: Vec<(f64, f64)> = h.iter().map(|r| (r.epoch as f64, r.train_loss)).collect();
    let val: Vec<(f64, f64)> = h.iter().filter_map(|r| Some((r.epoch as f64, *r.val.get(select)?))).collect();
    crate::eval::plots::lines(
        &out.join("curves.png"),
        "training loss and validation metric",
        "epoch",
        "value",
        &[("train loss".to_string(), loss), (format!("val {select}"), val)],
    )?;
    if let Some(cm) = &ev.confusion {
        crate::eval::plots::confusion(&out.join("confusion.png"), cm)?;
    }
    Ok(ev)
}
