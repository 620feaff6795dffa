//! Fine-tuning for classification: AdamW with warm-up + cosine, label smoothing, mixup, gradient
//! accumulation, layer-wise lr decay (full fine-tuning), early stopping and best-epoch selection on the
//! validation split only; atomic per-epoch checkpoints with optimiser state for `--resume`. The test
//! split is not touched here (see [`evaluate`]).
use crate::data::loader::{LoaderConfig, epoch_batches};
use crate::data::transforms::{Augment, Norm};
use crate::data::{Dataset, Split, Task};
use crate::eval::metrics;
use crate::model::PeftModel;
use crate::peft;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::schedule::WarmupCosine;
use anyhow::{Context, Result, anyhow, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Reduction, Tensor};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FinetuneConfig {
    pub epochs: i64,
    pub batch_size: i64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub seed: u64,
    pub label_smoothing: f64,
    /// Mixup Beta(alpha, alpha) (0: off).
    pub mixup: f64,
    /// Stop after this many epochs without validation improvement (0: never).
    pub patience: i64,
    /// Gradient accumulation steps.
    pub accum: i64,
    /// Layer-wise lr decay for full fine-tuning (1: off).
    pub layer_decay: f64,
    pub image_size: i64,
    pub norm: Norm,
    pub augment: Augment,
    /// Validation metric for model selection (auc, accuracy, f1, kappa, ...).
    pub select: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: i64,
    pub train_loss: f64,
    pub lr: f64,
    pub seconds: f64,
    pub images_per_s: f64,
    pub val: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub epochs_done: i64,
    pub best_epoch: i64,
    pub best_value: f64,
    pub bad_epochs: i64,
    pub history: Vec<EpochRecord>,
    pub stopped_early: bool,
}

/// Logits of a batch.
fn logits(model: &PeftModel, x: &Tensor, train: bool) -> Tensor {
    crate::device::autocast(model.device, || model.forward_task(x, train)).to_kind(Kind::Float)
}

/// Segmentation: per-image, per-class pixel counts of a whole split (eval mode, no gradient).
pub fn seg_counts(model: &PeftModel, split: &Split, loader: LoaderConfig) -> Result<Vec<metrics::SegCounts>> {
    let _g = tch::no_grad_guard();
    let mut out = Vec::new();
    for b in epoch_batches(split, LoaderConfig { drop_last: false, ..loader }, None, 0, true) {
        out.extend(crate::heads::segmentation::counts(&logits(model, &b.images, false), &b.labels));
    }
    Ok(out)
}

/// Validation (or test) metrics of a split for the task.
fn split_metrics(model: &PeftModel, split: &Split, task: Task, loader: LoaderConfig) -> Result<BTreeMap<String, f64>> {
    if task == Task::Segmentation {
        return Ok(metrics::segmentation(&seg_counts(model, split, loader)?));
    }
    let (probs, truth) = predict_split(model, split, task, loader)?;
    Ok(metrics::classification(task, &truth, &probs))
}

/// One row of numbers per image.
pub type Rows = Vec<Vec<f64>>;

/// Class (or label) probabilities and truths of a whole split, in order. No gradient, eval mode.
pub fn predict_split(model: &PeftModel, split: &Split, task: Task, loader: LoaderConfig) -> Result<(Rows, Rows)> {
    let _g = tch::no_grad_guard();
    let mut probs = Vec::new();
    let mut truth = Vec::new();
    for b in epoch_batches(split, LoaderConfig { drop_last: false, ..loader }, None, 0, false) {
        let l = logits(model, &b.images, false);
        let p = if task == Task::Multilabel { l.sigmoid() } else { l.softmax(-1, Kind::Float) };
        let p = p.to_kind(Kind::Double).to_device(Device::Cpu);
        let k = p.size()[1];
        let flat = Vec::<f64>::try_from(p.flatten(0, -1))?;
        probs.extend(flat.chunks(k as usize).map(<[f64]>::to_vec));
        let t = b.labels.to_kind(Kind::Double).to_device(Device::Cpu);
        let w = if t.dim() == 1 { 1 } else { t.size()[1] };
        let flat = Vec::<f64>::try_from(t.flatten(0, -1))?;
        truth.extend(flat.chunks(w as usize).map(<[f64]>::to_vec));
    }
    Ok((probs, truth))
}

fn loss_fn(
    task: Task,
    logits: &Tensor,
    labels: &Tensor,
    num_classes: i64,
    smoothing: f64,
    mix: Option<(&Tensor, f64)>,
) -> Tensor {
    if task == Task::Segmentation {
        return crate::heads::segmentation::loss(logits, labels);
    }
    if task == Task::Multilabel {
        let y = labels.to_kind(Kind::Float);
        let y = match mix {
            Some((perm, lam)) => &y * lam + y.index_select(0, perm) * (1.0 - lam),
            None => y,
        };
        return logits.binary_cross_entropy_with_logits::<Tensor>(&y, None, None, Reduction::Mean);
    }
    match mix {
        None => logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, smoothing),
        Some((perm, lam)) => {
            let onehot = labels.one_hot(num_classes).to_kind(Kind::Float);
            let soft = &onehot * lam + onehot.index_select(0, perm) * (1.0 - lam);
            logits.cross_entropy_loss::<Tensor>(&soft, None, Reduction::Mean, -100, smoothing)
        }
    }
}

/// Layer id for layer-wise lr decay: embeddings 0, block i -> i + 1, the rest (norm, head) depth + 1.
fn layer_id(name: &str, depth: i64) -> i64 {
    let n = name.strip_prefix("backbone.").unwrap_or(name);
    if n.starts_with("patch_embed")
        || n.starts_with("cls_token")
        || n.starts_with("reg_token")
        || n.starts_with("pos_embed")
    {
        0
    } else if let Some(rest) = n.strip_prefix("blocks.") {
        rest.split('.').next().and_then(|s| s.parse::<i64>().ok()).map_or(depth + 1, |i| i + 1)
    } else {
        depth + 1
    }
}

pub struct Paths {
    pub out: PathBuf,
}

impl Paths {
    pub fn checkpoint(&self) -> PathBuf {
        self.out.join("checkpoint")
    }
    pub fn best(&self) -> PathBuf {
        self.out.join("best")
    }
}

/// Saves the trainable state of the model into `dir` (target parameters incl. head; for full
/// fine-tuning also the backbone as `backbone.safetensors`).
pub fn save_model(model: &PeftModel, dir: &Path) -> Result<()> {
    peft::io::save(&model.targets, dir)?;
    if model.is_full() {
        let named = model.bb.vit.state_dict().map_err(|e| anyhow!(e))?;
        peft::io::write_safetensors_atomic(&dir.join("backbone.safetensors"), &named)?;
    }
    Ok(())
}

/// Loads what [`save_model`] wrote.
pub fn load_model(model: &PeftModel, dir: &Path) -> Result<()> {
    peft::io::load_values(&model.targets, dir, true)?;
    if model.is_full() {
        let p = dir.join("backbone.safetensors");
        let t = crate::backbone::checkpoint::read_safetensors(&p)?;
        crate::backbone::checkpoint::load_into(&model.bb.vs, &t, "", &p)?;
    }
    Ok(())
}

/// Replaces folder `dst` by `tmp` as atomically as the file system allows (the previous version stays as
/// `<dst>.old` until the new one is in place).
fn swap_dir(tmp: &Path, dst: &Path) -> Result<()> {
    let old = dst.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dst.exists() {
        std::fs::rename(dst, &old).with_context(|| format!("{}: cannot rotate", dst.display()))?;
    }
    std::fs::rename(tmp, dst).with_context(|| format!("{}: cannot move into place", dst.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

fn save_checkpoint(model: &PeftModel, opt: &AdamW, state: &State, paths: &Paths) -> Result<()> {
    let tmp = paths.out.join("checkpoint.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    save_model(model, &tmp)?;
    let st = opt.state();
    let pairs: Vec<(&str, &Tensor)> = st.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&pairs, tmp.join("optimizer.safetensors"))
        .map_err(|e| anyhow!("{}: cannot write optimiser state ({e})", tmp.display()))?;
    std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)?;
    swap_dir(&tmp, &paths.checkpoint())
}

/// The checkpoint folder to resume from (`checkpoint`, or `checkpoint.old` if a swap was interrupted).
fn resume_dir(paths: &Paths) -> Option<PathBuf> {
    let c = paths.checkpoint();
    if c.join("state.json").exists() {
        return Some(c);
    }
    let old = c.with_extension("old");
    old.join("state.json").exists().then_some(old)
}

fn selection_value(val: &BTreeMap<String, f64>, metric: &str) -> f64 {
    val.get(metric).copied().unwrap_or(f64::NEG_INFINITY)
}

/// Fine-tunes `model` (whose head is already attached) on `ds`, selecting the best epoch on validation.
/// Returns the final state; the best weights are in `<out>/best`.
pub fn finetune(model: &PeftModel, ds: &Dataset, cfg: &FinetuneConfig, out: &Path, resume: bool) -> Result<State> {
    let paths = Paths { out: out.to_path_buf() };
    let device = model.device;
    let n = ds.train.len();
    let bs = cfg.batch_size.min(n).max(1);
    let steps_per_epoch = ((n + bs - 1) / bs + cfg.accum - 1) / cfg.accum.max(1);
    let total = steps_per_epoch * cfg.epochs;
    let sched = WarmupCosine {
        base_lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: ((total as f64) * cfg.warmup).round() as i64,
        total_steps: total,
    };
    let mut opt = AdamW::new(
        model.trainable(),
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: cfg.weight_decay },
    );
    if model.is_full() && cfg.layer_decay < 1.0 {
        let depth = model.bb.vit.cfg.depth;
        opt.set_lr_scales(|name| cfg.layer_decay.powi((depth + 1 - layer_id(name, depth)) as i32));
    }
    let mut state = State { best_value: f64::NEG_INFINITY, best_epoch: -1, ..Default::default() };
    if resume && let Some(dir) = resume_dir(&paths) {
        load_model(model, &dir)?;
        let st_path = dir.join("optimizer.safetensors");
        let st = crate::backbone::checkpoint::read_safetensors(&st_path)?;
        opt.load_state(&st, &st_path)?;
        let text = std::fs::read_to_string(dir.join("state.json"))?;
        state = serde_json::from_str(&text).with_context(|| format!("{}: corrupt state.json", dir.display()))?;
        eprintln!(
            "resuming after epoch {} (best {} = {:.4} at epoch {})",
            state.epochs_done, cfg.select, state.best_value, state.best_epoch
        );
    }
    let loader = LoaderConfig { batch_size: bs, image_size: cfg.image_size, norm: cfg.norm, device, drop_last: false };
    let eval_loader = LoaderConfig { batch_size: bs.max(64), ..loader };
    let pb =
        crate::train::pretrain::progress_bar((total - state.epochs_done * steps_per_epoch).max(0) as u64, "fine-tune");
    let mut step = state.epochs_done * steps_per_epoch;
    for epoch in state.epochs_done..cfg.epochs {
        if state.stopped_early {
            break;
        }
        let t0 = Instant::now();
        // Every epoch draws from its own seeded stream, so a resumed run repeats an uninterrupted one.
        let epoch_seed = cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(epoch_seed ^ 0x6d69_7875);
        let mut losses: Vec<Tensor> = Vec::new();
        let mut seen = 0i64;
        let mut lr = sched.lr(step);
        opt.zero_grad();
        let seg = ds.task == Task::Segmentation;
        // Batches stream from the loader (prefetched on the host): collecting a whole epoch of augmented
        // float batches on the device would need the data set's size in device memory.
        let nb = loader.num_batches(ds.train.len());
        for (i, b) in epoch_batches(&ds.train, loader, Some(cfg.augment), epoch_seed, seg).enumerate() {
            let bsz = b.images.size()[0];
            let mix = if cfg.mixup > 0.0 && bsz > 1 && ds.task != Task::Segmentation {
                let lam = sample_beta(&mut rng, cfg.mixup);
                let mut perm: Vec<i64> = (0..bsz).collect();
                for k in (1..perm.len()).rev() {
                    perm.swap(k, rng.random_range(0..=k));
                }
                Some((Tensor::from_slice(&perm).to_device(device), lam))
            } else {
                None
            };
            let x = match &mix {
                Some((perm, lam)) => &b.images * *lam + b.images.index_select(0, perm) * (1.0 - lam),
                None => b.images.shallow_clone(),
            };
            let l = logits(model, &x, true);
            let loss = loss_fn(
                ds.task,
                &l,
                &b.labels,
                ds.num_classes,
                cfg.label_smoothing,
                mix.as_ref().map(|(p, lam)| (p, *lam)),
            );
            (&loss / cfg.accum as f64).backward();
            losses.push(loss.detach());
            seen += bsz;
            if (i + 1) as i64 % cfg.accum == 0 || i + 1 == nb {
                if cfg.clip > 0.0 {
                    let _ = opt.clip_grad_norm(cfg.clip);
                }
                lr = sched.lr(step);
                opt.step(lr);
                opt.zero_grad();
                step += 1;
                pb.inc(1);
            }
        }
        let train_loss = Tensor::stack(&losses, 0).mean(Kind::Double).double_value(&[]);
        if !train_loss.is_finite() {
            pb.finish_and_clear();
            bail!(
                "training loss became {train_loss} in epoch {}; stopping. The last good checkpoint (epoch {}) is kept in {}",
                epoch + 1,
                state.epochs_done,
                paths.checkpoint().display()
            );
        }
        let val = split_metrics(model, &ds.val, ds.task, eval_loader)?;
        let secs = t0.elapsed().as_secs_f64();
        let rec =
            EpochRecord { epoch: epoch + 1, train_loss, lr, seconds: secs, images_per_s: seen as f64 / secs, val };
        let v = selection_value(&rec.val, &cfg.select);
        pb.set_message(format!("epoch {} loss {:.4} val {} {:.4}", epoch + 1, train_loss, cfg.select, v));
        if v > state.best_value {
            state.best_value = v;
            state.best_epoch = epoch + 1;
            state.bad_epochs = 0;
            let tmp = out.join("best.tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            save_model(model, &tmp)?;
            swap_dir(&tmp, &paths.best())?;
        } else {
            state.bad_epochs += 1;
        }
        state.history.push(rec);
        state.epochs_done = epoch + 1;
        if cfg.patience > 0 && state.bad_epochs >= cfg.patience {
            state.stopped_early = true;
        }
        write_history(&state, out)?;
        save_checkpoint(model, &opt, &state, &paths)?;
    }
    pb.finish_and_clear();
    if state.best_epoch < 0 {
        bail!("no epoch produced a finite validation {}", cfg.select);
    }
    Ok(state)
}

/// A Beta(a, a) draw (via two Gamma draws by Marsaglia-Tsang), for mixup.
fn sample_beta(rng: &mut ChaCha8Rng, a: f64) -> f64 {
    fn gamma(rng: &mut ChaCha8Rng, a: f64) -> f64 {
        if a < 1.0 {
            let u: f64 = rng.random();
            return gamma(rng, a + 1.0) * u.powf(1.0 / a);
        }
        let d = a - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            // Standard normal by Box-Muller.
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-12), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
            let v = (1.0 + c * z).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u: f64 = rng.random();
            if u.ln() < 0.5 * z * z + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }
    let x = gamma(rng, a);
    let y = gamma(rng, a);
    x / (x + y)
}

/// `metrics.csv` (one row per epoch) and `history.json`.
fn write_history(state: &State, out: &Path) -> Result<()> {
    let keys: Vec<String> = state
        .history
        .iter()
        .flat_map(|r| r.val.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut s = String::from("epoch,train_loss,lr,seconds,images_per_s");
    for k in &keys {
        s.push_str(&format!(",val_{k}"));
    }
    s.push('\n');
    for r in &state.history {
        s.push_str(&format!("{},{:.6},{:.6e},{:.3},{:.1}", r.epoch, r.train_loss, r.lr, r.seconds, r.images_per_s));
        for k in &keys {
            s.push_str(&format!(",{}", r.val.get(k).map_or(String::new(), |v| format!("{v:.6}"))));
        }
        s.push('\n');
    }
    let p = out.join("metrics.csv");
    peft::io::write_text_atomic(&p, &s)?;
    let h = serde_json::to_string_pretty(&state.history)?;
    let p = out.join("history.json");
    peft::io::write_text_atomic(&p, &h)
}

/// Test-split evaluation of the current model: metrics, 95% bootstrap intervals, confusion matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    pub split: String,
    pub n: usize,
    pub metrics: BTreeMap<String, f64>,
    pub ci95: BTreeMap<String, metrics::Interval>,
    pub confusion: Option<Vec<Vec<i64>>>,
    #[serde(skip)]
    pub probs: Vec<Vec<f64>>,
    #[serde(skip)]
    pub truth: Vec<Vec<f64>>,
}

pub fn evaluate(
    model: &PeftModel,
    split: &Split,
    task: Task,
    num_classes: i64,
    loader: LoaderConfig,
    name: &str,
) -> Result<Evaluation> {
    if task == Task::Segmentation {
        let counts = seg_counts(model, split, loader)?;
        let m = metrics::segmentation(&counts);
        let ci = metrics::bootstrap(counts.len(), 1000, 0, |idx| {
            let c: Vec<metrics::SegCounts> = idx.iter().map(|&i| counts[i].clone()).collect();
            metrics::segmentation(&c)
        });
        // Per-image Dice stands in for predictions (statistics across runs).
        let per_image: Vec<Vec<f64>> =
            counts.iter().map(|c| vec![metrics::segmentation(std::slice::from_ref(c))["dice"]]).collect();
        return Ok(Evaluation {
            split: name.into(),
            n: counts.len(),
            metrics: m,
            ci95: ci,
            confusion: None,
            probs: per_image,
            truth: vec![],
        });
    }
    let (probs, truth) = predict_split(model, split, task, loader)?;
    let m = metrics::classification(task, &truth, &probs);
    let ci = metrics::bootstrap(probs.len(), 1000, 0, |idx| {
        let t: Vec<Vec<f64>> = idx.iter().map(|&i| truth[i].clone()).collect();
        let p: Vec<Vec<f64>> = idx.iter().map(|&i| probs[i].clone()).collect();
        metrics::classification(task, &t, &p)
    });
    let confusion = (task != Task::Multilabel).then(|| {
        let t: Vec<i64> = truth.iter().map(|v| v[0] as i64).collect();
        let p: Vec<i64> =
            probs.iter().map(|p| (0..p.len()).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0) as i64).collect();
        metrics::confusion(&t, &p, num_classes as usize)
    });
    Ok(Evaluation { split: name.into(), n: probs.len(), metrics: m, ci95: ci, confusion, probs, truth })
}

/// Cost of a run, reported beside its metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunStats {
    pub trainable_params: i64,
    pub total_params: i64,
    pub seconds: f64,
    pub images_per_s: f64,
    pub peak_memory_bytes: Option<u64>,
    pub best_epoch: i64,
    pub best_val: f64,
}

/// `metrics.json`: the test metrics under their lower-case names, `ci95`, the confusion matrix, the run's
/// cost, and the test predictions (for bootstrap statistics across runs).
pub fn write_evaluation(ev: &Evaluation, out: &Path, stats: &RunStats) -> Result<()> {
    let mut v = serde_json::to_value(&ev.metrics)?;
    let obj = v.as_object_mut().expect("metrics serialise to an object");
    obj.insert("run".into(), serde_json::to_value(stats)?);
    obj.insert("predictions".into(), serde_json::json!({"probs": ev.probs, "truth": ev.truth}));
    obj.insert("ci95".into(), serde_json::to_value(&ev.ci95)?);
    obj.insert("split".into(), ev.split.clone().into());
    obj.insert("n".into(), ev.n.into());
    if let Some(cm) = &ev.confusion {
        obj.insert("confusion".into(), serde_json::to_value(cm)?);
        let mut s = String::from("truth\\pred");
        for j in 0..cm.len() {
            s.push_str(&format!(",{j}"));
        }
        s.push('\n');
        for (i, row) in cm.iter().enumerate() {
            s.push_str(&format!("{i},{}\n", row.iter().map(i64::to_string).collect::<Vec<_>>().join(",")));
        }
        std::fs::write(out.join("confusion.csv"), s)?;
    }
    let text = serde_json::to_string_pretty(&v)?;
    let p = out.join("metrics.json");
    peft::io::write_text_atomic(&p, &text)
}
