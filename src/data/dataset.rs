//! Decoded datasets: images as uint8 NCHW tensors (in memory or mapped from the cache), labels as tensors,
//! three splits.
use anyhow::{Result, bail};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// What the labels mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Two classes.
    Binary,
    /// More than two exclusive classes.
    Multiclass,
    /// Several independent binary labels (BCE).
    Multilabel,
    /// Ordered classes, trained as multi-class, reported with quadratic-weighted kappa too.
    Ordinal,
    /// Per-pixel classes (masks).
    Segmentation,
}

/// One split: `images` uint8 [N, C, H, W]; `labels` int64 [N] (classes), float [N, L] (multi-label) or
/// int64 [N, H, W] (segmentation masks).
pub struct Split {
    /// uint8 [N, C, H, W].
    pub images: Tensor,
    /// int64 [N] (classes), float [N, L] (multi-label) or int64 [N, H, W] (masks).
    pub labels: Tensor,
}

impl Split {
    /// Number of samples.
    pub fn len(&self) -> i64 {
        self.images.size()[0]
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The samples at `idx`, in that order.
    pub fn subset(&self, idx: &[i64]) -> Split {
        let i = Tensor::from_slice(idx);
        Split { images: self.images.index_select(0, &i), labels: self.labels.index_select(0, &i) }
    }
}

/// A data set read into memory: three splits and what their labels mean.
pub struct Dataset {
    /// Its name (the file or folder stem).
    pub name: String,
    /// The task.
    pub task: Task,
    /// Classes (labels for multi-label, mask classes for segmentation).
    pub num_classes: i64,
    /// Training split.
    pub train: Split,
    /// Validation split (model selection).
    pub val: Split,
    /// Test split (scored once per run).
    pub test: Split,
}

impl Dataset {
    /// Image channels.
    pub fn channels(&self) -> i64 {
        self.train.images.size()[1]
    }
    /// Stored image size (height, width).
    pub fn image_size(&self) -> (i64, i64) {
        let s = self.train.images.size();
        (s[2], s[3])
    }

    /// Keeps a stratified, seeded fraction of the training split (low-label studies). At least one
    /// image per class is kept.
    pub fn with_train_fraction(mut self, fraction: f64, seed: u64) -> Result<Self> {
        if !(fraction > 0.0 && fraction <= 1.0) {
            bail!("--train-fraction must be in (0, 1], got {fraction}");
        }
        if fraction < 1.0 {
            let idx = stratified_subset(&self.train, self.task, fraction, seed);
            self.train = self.train.subset(&idx);
        }
        Ok(self)
    }
}

/// Stratification key per sample: the class (single-label) or the first positive label (multi-label).
fn strata(split: &Split, task: Task) -> Vec<i64> {
    match task {
        Task::Multilabel => Vec::<i64>::try_from(split.labels.argmax(1, false)).unwrap_or_default(),
        Task::Segmentation => vec![0; split.len() as usize],
        _ => Vec::<i64>::try_from(split.labels.to_kind(Kind::Int64)).unwrap_or_default(),
    }
}

/// A stratified, seeded `fraction` of a split's sample indices (at least one per stratum), sorted.
pub fn stratified_subset(split: &Split, task: Task, fraction: f64, seed: u64) -> Vec<i64> {
    let keys = strata(split, task);
    let mut by: std::collections::BTreeMap<i64, Vec<i64>> = Default::default();
    for (i, k) in keys.iter().enumerate() {
        by.entry(*k).or_default().push(i as i64);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::new();
    for (_, mut v) in by {
        v.shuffle(&mut rng);
        let n = ((v.len() as f64 * fraction).round() as usize).clamp(1, v.len());
        out.extend_from_slice(&v[..n]);
    }
    out.sort();
    out
}

/// A segmentation split must hold foreground somewhere: masks that binarise to background everywhere
/// (another encoding than 0/255 or 0/1, or labels that never exceed the threshold) would train to
/// predict nothing and report a perfect Dice.
pub fn check_foreground(train: &Split, source: &std::path::Path) -> Result<()> {
    if train.labels.gt(0).any().int64_value(&[]) == 0 {
        bail!(
            "{}: no training mask has a foreground pixel (binary masks are read as 0/255 or 0/1 grey images, \
             label volumes as > 0; for class-id masks pass --mask-classes)",
            source.display()
        );
    }
    Ok(())
}

/// Counts of each class in a single-label split (for checks and reports).
pub fn class_counts(split: &Split, num_classes: i64) -> Vec<i64> {
    let labels = Vec::<i64>::try_from(split.labels.to_kind(Kind::Int64).flatten(0, -1)).unwrap_or_default();
    let mut c = vec![0; num_classes as usize];
    for l in labels {
        if (0..num_classes).contains(&l) {
            c[l as usize] += 1;
        }
    }
    c
}
