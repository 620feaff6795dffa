//! Supervised fine-tuning as a [`TrainStep`] of the one training loop: classification or segmentation
//! losses with label smoothing and mixup; AdamW with warm-up + cosine, gradient accumulation and
//! layer-wise lr decay (full fine-tuning); best-epoch selection on the validation split only, early
//! stopping, and atomic per-epoch checkpoints for `--resume`. The test split is not touched here (see
//! [`crate::eval::evaluate`]).
use super::callbacks::{BestOnValidation, Checkpointable, Checkpointer, EarlyStopping, History, ProgressReport};
use super::optim::{AdamW, AdamWConfig};
use super::schedule::WarmupCosine;
use super::trainer::{Batches, TrainState, TrainStep, Trainer};
use crate::data::loader::{Batch, LoaderConfig, epoch_shards};
use crate::data::transforms::{Augment, Norm};
use crate::data::{Dataset, Task};
use crate::eval::metrics::Metric;
use crate::heads::segmentation::SegConfig;
use crate::model::PeftModel;
use anyhow::{Result, anyhow};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Kind, Reduction, Tensor};

/// Fine-tuning hyperparameters (the `config` of a run's `run.json`; compare's `[finetune]` section).
/// Every field has a default: `compare`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Epochs.
    pub epochs: i64,
    /// Images per batch.
    pub batch_size: i64,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine.
    pub min_lr: f64,
    /// Linear warm-up, as a fraction of all updates.
    pub warmup: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Gradient-norm clipping (0: off).
    pub clip: f64,
    /// Seed of initialisation, shuffling, augmentation and mixup.
    pub seed: u64,
    /// Label smoothing of the cross-entropy.
    pub label_smoothing: f64,
    /// Mixup Beta(alpha, alpha) (0: off).
    pub mixup: f64,
    /// Stop after this many epochs without validation improvement (0: never).
    pub patience: i64,
    /// Gradient accumulation steps.
    pub accum: i64,
    /// Layer-wise lr decay for full fine-tuning (1: off).
    pub layer_decay: f64,
    /// Model input size (0: the backbone's; runs record the size used).
    pub image_size: i64,
    /// Pixel normalisation (runs record resolved values).
    pub norm: Norm,
    /// Training augmentation.
    pub augment: Augment,
    /// Validation metric for model selection.
    pub select: Metric,
    /// Segmentation: head, native-resolution crops and windows, loss.
    pub seg: SegConfig,
    /// Linear probe only: train the head on pooled features computed once per image (eval mode, no
    /// augmentation), as benchmark papers probe; seconds instead of an augmented pass per epoch.
    pub cached_features: bool,
    /// bf16 autocast on the CPU (matrix products in bf16, attention, norms and losses in fp32): 2-3x
    /// faster GEMMs on CPUs with bf16 instructions (AVX512-BF16, AMX), slower elsewhere; results differ
    /// from fp32 by bf16 rounding. No effect on CUDA, which always uses bf16 autocast.
    pub cpu_bf16: bool,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            epochs: 50,
            batch_size: 64,
            lr: 1e-3,
            min_lr: 0.0,
            warmup: 0.05,
            weight_decay: 0.05,
            clip: 1.0,
            seed: 0,
            label_smoothing: 0.0,
            mixup: 0.0,
            patience: 0,
            accum: 1,
            layer_decay: 1.0,
            image_size: 0,
            norm: Norm::IMAGENET,
            augment: Augment::default(),
            select: Metric::Auc,
            seg: SegConfig::default(),
            cached_features: false,
            cpu_bf16: false,
        }
    }
}

impl FinetuneConfig {
    /// Rejects values no run could use, naming the option.
    pub fn validate(&self) -> Result<()> {
        use crate::check::{NON_NEGATIVE, POSITIVE, UNIT, UNIT_OPEN_HIGH, UNIT_OPEN_LOW, float, int};
        int("epochs", self.epochs, 1, i64::MAX)?;
        int("batch_size", self.batch_size, 1, crate::check::MAX_BATCH)?;
        int("accum", self.accum, 1, i64::MAX)?;
        int("patience", self.patience, 0, i64::MAX)?;
        int("image_size", self.image_size, 0, crate::backbone::MAX_IMG_SIZE)?;
        float("lr", self.lr, POSITIVE)?;
        float("min_lr", self.min_lr, NON_NEGATIVE)?;
        crate::check::at_most("min_lr (--min-lr)", self.min_lr, "lr (--lr)", self.lr)?;
        float("warmup", self.warmup, UNIT)?;
        float("weight_decay", self.weight_decay, NON_NEGATIVE)?;
        float("clip", self.clip, NON_NEGATIVE)?;
        float("label_smoothing", self.label_smoothing, UNIT_OPEN_HIGH)?;
        float("mixup", self.mixup, NON_NEGATIVE)?;
        float("layer_decay", self.layer_decay, UNIT_OPEN_LOW)?;
        self.norm.validate()?;
        self.seg.validate()?;
        self.augment.validate()
    }
}

impl Checkpointable for PeftModel {
    /// The target parameters incl. head; for full fine-tuning also the backbone (`backbone.safetensors`).
    fn save(&self, dir: &Path) -> Result<()> {
        crate::peft::io::save(&self.targets, dir)?;
        if self.is_full() {
            let named = self.bb.vit.state_dict().map_err(|e| anyhow!(e))?;
            crate::peft::io::write_safetensors_atomic(&dir.join("backbone.safetensors"), &named)?;
        }
        Ok(())
    }

    fn load(&self, dir: &Path) -> Result<()> {
        crate::peft::io::load_values(&self.targets, dir, true)?;
        if self.is_full() {
            let p = dir.join("backbone.safetensors");
            let t = crate::backbone::checkpoint::read_safetensors(&p)?;
            crate::backbone::checkpoint::load_into(&self.bb.vs, &t, "", &p)?;
        }
        Ok(())
    }
}

/// One fine-tuning update: (mixed) images through the model, the task's loss.
pub struct FinetuneStep<'a> {
    model: &'a PeftModel,
    ds: &'a Dataset,
    cfg: &'a FinetuneConfig,
    loader: LoaderConfig,
    /// The epoch's mixup draws.
    rng: ChaCha8Rng,
}

impl<'a> FinetuneStep<'a> {
    /// The step for `model` on `ds`'s training split (batches of `loader`).
    pub fn new(model: &'a PeftModel, ds: &'a Dataset, cfg: &'a FinetuneConfig, loader: LoaderConfig) -> Self {
        FinetuneStep { model, ds, cfg, loader, rng: ChaCha8Rng::seed_from_u64(0) }
    }

    fn epoch_seed(&self, epoch: i64) -> u64 {
        self.cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64)
    }
}

impl FinetuneStep<'_> {
    /// Data-parallel: this process's part of the global batch's loss (mixup is refused before training).
    fn shard_loss(&self, b: &Batch, g: &crate::dist::Group) -> Result<Tensor> {
        let (task, k) = (self.ds.task, self.ds.num_classes);
        let (kind, dev) = (self.cfg.seg.loss, self.model.device);
        if b.shard.len == 0 {
            return match task {
                Task::Segmentation => crate::heads::segmentation::shard_loss(None, k, kind, b.shard, g, dev),
                _ => Ok(Tensor::zeros([], (Kind::Float, dev))),
            };
        }
        let l = self.model.logits(&b.images, true);
        Ok(match task {
            Task::Segmentation => {
                crate::heads::segmentation::shard_loss(Some((&l, &b.labels)), k, kind, b.shard, g, dev)?
            }
            _ => loss_fn(task, &l, &b.labels, k, self.cfg, None) * b.shard.share(),
        })
    }
}

impl TrainStep for FinetuneStep<'_> {
    fn batches(&mut self, epoch: i64) -> Batches {
        // Every epoch draws from its own seeded stream, so a resumed run repeats an uninterrupted one.
        let seed = self.epoch_seed(epoch);
        self.rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d69_7875);
        let seg = self.ds.task == Task::Segmentation;
        // Batches stream from the loader (prefetched on the host): collecting a whole epoch of augmented
        // float batches on the device would need the data set's size in device memory.
        let len = self.loader.num_batches(self.loader.train_samples(self.ds.train.len()));
        let iter = epoch_shards(&self.ds.train, self.loader, Some(self.cfg.augment), seed, seg, crate::dist::part());
        Batches { len, iter: Box::new(iter) }
    }

    fn loss(&mut self, b: &Batch) -> Result<Tensor> {
        if let Some(g) = crate::dist::current() {
            return self.shard_loss(b, g);
        }
        let bsz = b.images.size()[0];
        let mix = if self.cfg.mixup > 0.0 && bsz > 1 && self.ds.task != Task::Segmentation {
            let lam = sample_beta(&mut self.rng, self.cfg.mixup);
            let mut perm: Vec<i64> = (0..bsz).collect();
            for k in (1..perm.len()).rev() {
                perm.swap(k, self.rng.random_range(0..=k));
            }
            Some((Tensor::from_slice(&perm).to_device(self.model.device), lam))
        } else {
            None
        };
        let x = match &mix {
            Some((perm, lam)) => &b.images * *lam + b.images.index_select(0, perm) * (1.0 - lam),
            None => b.images.shallow_clone(),
        };
        let l = self.model.logits(&x, true);
        let mix = mix.as_ref().map(|(p, lam)| (p, *lam));
        Ok(loss_fn(self.ds.task, &l, &b.labels, self.ds.num_classes, self.cfg, mix))
    }

    fn validate(&mut self) -> Result<BTreeMap<String, f64>> {
        let eval = LoaderConfig { batch_size: self.loader.batch_size.max(64), ..self.loader };
        crate::eval::evaluate::split_metrics(self.model, &self.ds.val, self.ds.task, eval)
    }
}

fn loss_fn(
    task: Task,
    logits: &Tensor,
    labels: &Tensor,
    num_classes: i64,
    cfg: &FinetuneConfig,
    mix: Option<(&Tensor, f64)>,
) -> Tensor {
    if task == Task::Segmentation {
        return crate::heads::segmentation::loss(logits, labels, cfg.seg.loss);
    }
    let smoothing = cfg.label_smoothing;
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
    if ["patch_embed", "cls_token", "reg_token", "pos_embed"].iter().any(|p| n.starts_with(p)) {
        0
    } else if let Some(rest) = n.strip_prefix("blocks.") {
        rest.split('.').next().and_then(|s| s.parse::<i64>().ok()).map_or(depth + 1, |i| i + 1)
    } else {
        depth + 1
    }
}

/// The loop's settings for fine-tuning `model` on `n` training images.
fn trainer<'a>(model: &'a PeftModel, cfg: &FinetuneConfig, n: i64, out: &Path) -> Trainer<'a> {
    let bs = cfg.batch_size.min(n).max(1);
    let steps_per_epoch = ((n + bs - 1) / bs + cfg.accum - 1) / cfg.accum.max(1);
    let schedule = WarmupCosine::new(cfg.lr, cfg.min_lr, cfg.warmup, steps_per_epoch * cfg.epochs);
    let mut opt = AdamW::new(
        model.trainable(),
        AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: cfg.weight_decay },
    );
    if model.is_full() && cfg.layer_decay < 1.0 {
        let depth = model.bb.vit.config().depth;
        opt.set_lr_scales(|name| cfg.layer_decay.powi((depth + 1 - layer_id(name, depth)) as i32));
    }
    Trainer {
        opt,
        schedule,
        clip: cfg.clip,
        accum: cfg.accum,
        epochs: cfg.epochs,
        steps_per_epoch,
        checkpoint: Some(Checkpointer::new(out.join("checkpoint"), model)),
        saved_in: None,
    }
}

/// Fine-tunes `model` (whose head is already attached) on `ds`, selecting the best epoch on validation.
/// Returns the final state; the best weights are in `<out>/best`, the latest epoch in `<out>/checkpoint`.
pub fn finetune(model: &PeftModel, ds: &Dataset, cfg: &FinetuneConfig, out: &Path, resume: bool) -> Result<TrainState> {
    cfg.validate()?;
    if cfg.mixup > 0.0 && crate::dist::part().world > 1 {
        // Mixup pairs images across the whole batch, which no process holds.
        return Err(crate::error::bad_input!("--mixup is not supported in data-parallel runs (under torchrun)"));
    }
    let tiles = (ds.task == Task::Segmentation).then(|| cfg.seg.tiles(cfg.image_size)).flatten();
    // Samples per epoch: several crops of every image in native-resolution segmentation.
    let n = LoaderConfig::samples(tiles, ds.train.len());
    let mut trainer = trainer(model, cfg, n, out);
    let mut state = TrainState::default();
    if resume && trainer.resume(&mut state)? {
        tracing::info!(
            "resuming after epoch {} (best {} = {:.4} at epoch {})",
            state.epochs_done,
            cfg.select,
            state.best_value,
            state.best_epoch
        );
    }
    let bs = cfg.batch_size.min(n).max(1);
    let loader = LoaderConfig {
        batch_size: bs,
        image_size: cfg.image_size,
        norm: cfg.norm,
        device: model.device,
        drop_last: false,
        tiles,
    };
    let mut best = BestOnValidation { metric: cfg.select.name(), dir: out.join("best"), model };
    let mut stop = EarlyStopping { patience: cfg.patience };
    let mut history = History { dir: out.to_path_buf() };
    let mut progress = ProgressReport::new("fine-tune", Some(&cfg.select.name()));
    let callbacks: &mut [&mut dyn super::trainer::Callback] = &mut [&mut best, &mut stop, &mut history, &mut progress];
    if cfg.cached_features {
        let mut step = FeatureStep::new(model, ds, cfg, loader);
        trainer.fit(&mut step, &mut state, callbacks)?;
    } else {
        let mut step = FinetuneStep::new(model, ds, cfg, loader);
        trainer.fit(&mut step, &mut state, callbacks)?;
    }
    Ok(state)
}

/// Pooled backbone features [N, D] (fp32, eval mode, no augmentation) and labels of a whole split, on
/// the device. Every process of a data-parallel run computes all of them (once, before training).
fn split_features(model: &PeftModel, split: &crate::data::Split, loader: LoaderConfig) -> Result<(Tensor, Tensor)> {
    let _g = tch::no_grad_guard();
    let (mut feats, mut labels) = (Vec::new(), Vec::new());
    for b in crate::data::loader::epoch_batches(split, loader, None, 0, false) {
        let vit = &model.bb.vit;
        feats.push(crate::device::autocast(model.device, || vit.embed(&b.images)).to_kind(Kind::Float));
        labels.push(b.labels);
    }
    if feats.is_empty() {
        return Err(anyhow!("no images to compute features of"));
    }
    Ok((Tensor::cat(&feats, 0), Tensor::cat(&labels, 0)))
}

/// A linear probe's update on cached features: the head alone, on a seeded shuffle of the training
/// split's feature rows (`FinetuneConfig::cached_features`).
struct FeatureStep<'a> {
    model: &'a PeftModel,
    task: Task,
    num_classes: i64,
    cfg: &'a FinetuneConfig,
    /// Batch size and order of the epochs (the training loader's).
    loader: LoaderConfig,
    /// The splits to compute features of.
    ds: &'a Dataset,
    /// Training features and labels (none until [`TrainStep::prepare`]).
    train: (Tensor, Tensor),
    /// Validation features and labels (none until [`TrainStep::prepare`]).
    val: (Tensor, Tensor),
}

impl<'a> FeatureStep<'a> {
    fn new(model: &'a PeftModel, ds: &'a Dataset, cfg: &'a FinetuneConfig, loader: LoaderConfig) -> Self {
        let none =
            || (Tensor::zeros([0, 1], (Kind::Float, model.device)), Tensor::zeros([0], (Kind::Int64, model.device)));
        FeatureStep { model, task: ds.task, num_classes: ds.num_classes, cfg, loader, ds, train: none(), val: none() }
    }
}

impl TrainStep for FeatureStep<'_> {
    fn prepare(&mut self) -> Result<()> {
        let eval = LoaderConfig { batch_size: 128, ..self.loader };
        self.train = split_features(self.model, &self.ds.train, eval)?;
        self.val = split_features(self.model, &self.ds.val, eval)?;
        Ok(())
    }

    fn batches(&mut self, epoch: i64) -> Batches {
        use rand::seq::SliceRandom;
        let n = self.train.0.size()[0];
        let seed = self.cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64);
        let mut order: Vec<i64> = (0..n).collect();
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let dev = self.model.device;
        let (f, l) = (&self.train.0, &self.train.1);
        let batches: Vec<Batch> = self
            .loader
            .shards(n, crate::dist::part())
            .into_iter()
            .map(|(s, e, shard)| {
                let idx = Tensor::from_slice(&order[s..e]).to_device(dev);
                Batch { images: f.index_select(0, &idx), labels: l.index_select(0, &idx), index: idx, shard }
            })
            .collect();
        Batches { len: batches.len(), iter: Box::new(batches.into_iter()) }
    }

    fn loss(&mut self, b: &Batch) -> Result<Tensor> {
        if b.shard.len == 0 {
            return Ok(Tensor::zeros([], (Kind::Float, self.model.device)));
        }
        let vit = &self.model.bb.vit;
        let l = crate::device::autocast(self.model.device, || vit.head_forward(&b.images, true)).to_kind(Kind::Float);
        let loss = loss_fn(self.task, &l, &b.labels, self.num_classes, self.cfg, None);
        Ok(if b.shard.is_whole() { loss } else { loss * b.shard.share() })
    }

    fn validate(&mut self) -> Result<BTreeMap<String, f64>> {
        let _g = tch::no_grad_guard();
        let vit = &self.model.bb.vit;
        let l =
            crate::device::autocast(self.model.device, || vit.head_forward(&self.val.0, false)).to_kind(Kind::Float);
        let p = if self.task == Task::Multilabel { l.sigmoid() } else { l.softmax(-1, Kind::Float) };
        let rows = crate::eval::evaluate::rows;
        Ok(crate::eval::metrics::classification(self.task, &rows(&self.val.1)?, &rows(&p)?))
    }
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
    // For a tiny alpha both draws can underflow to 0; Beta(a, a) is then almost surely 0 or 1.
    if x + y > 0.0 { x / (x + y) } else { f64::from(u8::from(rng.random::<bool>())) }
}
