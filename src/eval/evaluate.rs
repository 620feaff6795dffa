//! Evaluation of a model on a split: predictions, metrics with bootstrap intervals, the confusion matrix,
//! and `metrics.json`. The test split meets a model here once, after model selection.
use crate::data::loader::{Batch, LoaderConfig, epoch_shards};
use crate::data::{Split, Task};
use crate::eval::metrics;
use crate::model::PeftModel;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// Runs `f` on this process's part of every evaluation batch of `split` (all of it outside a
/// data-parallel run; no augmentation, in order) and returns the split positions of the rows it saw.
fn each_shard(
    split: &Split,
    loader: LoaderConfig,
    seg: bool,
    mut f: impl FnMut(&Batch) -> Result<()>,
) -> Result<Vec<i64>> {
    let mut index = Vec::new();
    let cfg = LoaderConfig { drop_last: false, ..loader };
    for b in epoch_shards(split, cfg, None, 0, seg, crate::dist::part()) {
        if b.shard.len == 0 {
            continue;
        }
        index.extend(Vec::<i64>::try_from(&b.index)?);
        f(&b)?;
    }
    Ok(index)
}

/// Segmentation: per-image, per-class pixel counts of a whole split (eval mode, no gradient). In a
/// data-parallel run each process scores its shard of every batch and the counts are gathered.
pub fn seg_counts(model: &PeftModel, split: &Split, loader: LoaderConfig) -> Result<Vec<metrics::SegCounts>> {
    let _g = tch::no_grad_guard();
    let mut out = Vec::new();
    let index = match loader.tiles {
        // Whole stored images, one per process at a time, each through sliding windows (`batch_size` of
        // them per forward pass).
        Some(t) => {
            let per = LoaderConfig { batch_size: crate::dist::part().world, ..loader };
            each_shard(split, per, true, |b| {
                for i in 0..b.images.size()[0] {
                    let probs = model.segment(&b.images.get(i), t, loader.batch_size)?;
                    out.extend(crate::heads::segmentation::counts(&probs.unsqueeze(0), &b.labels.narrow(0, i, 1)));
                }
                Ok(())
            })?
        }
        None => each_shard(split, loader, true, |b| {
            out.extend(crate::heads::segmentation::counts(&model.logits(&b.images, false), &b.labels));
            Ok(())
        })?,
    };
    let Some(g) = crate::dist::current() else { return Ok(out) };
    let rows: Vec<Vec<f64>> = out.iter().map(|c| c.iter().flatten().copied().collect()).collect();
    let all = g.gather_rows(split.len() as usize, &index, &rows)?;
    Ok(all.into_iter().map(|r| r.chunks(3).map(|c| [c[0], c[1], c[2]]).collect()).collect())
}

/// Validation (or test) metrics of a split for the task (no intervals).
pub fn split_metrics(
    model: &PeftModel,
    split: &Split,
    task: Task,
    loader: LoaderConfig,
) -> Result<BTreeMap<String, f64>> {
    if task == Task::Segmentation {
        return Ok(metrics::segmentation(&seg_counts(model, split, loader)?));
    }
    let (probs, truth) = predict_split(model, split, task, loader)?;
    Ok(metrics::classification(task, &truth, &probs))
}

/// One row of numbers per image.
pub type Rows = Vec<Vec<f64>>;

/// The rows of a [N] or [N, W] tensor, as f64 on the host.
pub fn rows(t: &Tensor) -> Result<Rows> {
    let t = t.to_kind(Kind::Double).to_device(Device::Cpu);
    let w = if t.dim() == 1 { 1 } else { t.size()[1] };
    Ok(Vec::<f64>::try_from(t.flatten(0, -1))?.chunks(w as usize).map(<[f64]>::to_vec).collect())
}

/// Class (or label) probabilities and truths of a whole split, in order. No gradient, eval mode. In a
/// data-parallel run each process predicts its shard of every batch and the rows are gathered.
pub fn predict_split(model: &PeftModel, split: &Split, task: Task, loader: LoaderConfig) -> Result<(Rows, Rows)> {
    let _g = tch::no_grad_guard();
    let mut probs = Vec::new();
    let mut truth = Vec::new();
    let index = each_shard(split, loader, false, |b| {
        let l = model.logits(&b.images, false);
        let p = if task == Task::Multilabel { l.sigmoid() } else { l.softmax(-1, Kind::Float) };
        probs.extend(rows(&p)?);
        truth.extend(rows(&b.labels)?);
        Ok(())
    })?;
    let Some(g) = crate::dist::current() else { return Ok((probs, truth)) };
    let n = split.len() as usize;
    Ok((g.gather_rows(n, &index, &probs)?, g.gather_rows(n, &index, &truth)?))
}

/// Test-split evaluation of the current model: metrics, 95% bootstrap intervals, confusion matrix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Evaluation {
    /// The split's name.
    pub split: String,
    /// Samples scored.
    pub n: usize,
    /// Metrics by name.
    pub metrics: BTreeMap<String, f64>,
    /// 95% bootstrap intervals by metric.
    pub ci95: BTreeMap<String, metrics::Interval>,
    /// Confusion matrix (truth x prediction), single-label tasks.
    pub confusion: Option<Vec<Vec<i64>>>,
    /// Predicted probabilities (per-image Dice for segmentation).
    #[serde(skip)]
    pub probs: Vec<Vec<f64>>,
    /// Truths.
    #[serde(skip)]
    pub truth: Vec<Vec<f64>>,
}

/// Metrics of `split` with 95% bootstrap intervals (1000 resamples), the confusion matrix and the
/// predictions (per-image Dice for segmentation).
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
    /// Trained parameters.
    pub trainable_params: i64,
    /// All parameters (replaced ones counted once).
    pub total_params: i64,
    /// Training wall time.
    pub seconds: f64,
    /// Mean training images per second.
    pub images_per_s: f64,
    /// Peak GPU memory (None on CPU).
    pub peak_memory_bytes: Option<u64>,
    /// Best validation epoch.
    pub best_epoch: i64,
    /// Its validation value.
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
        crate::peft::io::write_text_atomic(&out.join("confusion.csv"), &s)?;
    }
    let text = serde_json::to_string_pretty(&v)?;
    let p = out.join("metrics.json");
    crate::peft::io::write_text_atomic(&p, &text)
}
