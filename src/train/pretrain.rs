//! The self-supervised stages on the one training loop: the TPP stage (target parameters + pretext head
//! trained, backbone frozen) and backbone pre-training (everything trained), as MAE and DINO
//! [`TrainStep`]s. Only the given parameters are optimised; the rest stays frozen.
use super::callbacks::{EachEpoch, LossLog, ProgressReport};
use super::optim::{AdamW, AdamWConfig};
use super::schedule::WarmupCosine;
use super::trainer::{Batches, TrainState, TrainStep, Trainer};
use crate::data::Split;
use crate::data::loader::{Batch, LoaderConfig, epoch_shards};
use crate::data::transforms::{Augment, Norm};
use crate::pretext::dino::{self, Centering, DinoConfig, DinoHead};
use crate::pretext::mae::{self, MaeConfig, MaeDecoder};
use anyhow::{Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Hyperparameters of a self-supervised stage (a TPP record's `config`; compare's `[tpp]` section). Every
/// field has a default: `compare`'s TPP stage (a light 2 x 128 MAE decoder).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
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
    /// Seed of initialisation, shuffling, augmentation and masking.
    pub seed: u64,
    /// Model input size (0: the backbone's).
    pub image_size: i64,
    /// Pixel normalisation.
    pub norm: Norm,
    /// Augmentation.
    pub augment: Augment,
    /// The MAE pretext's options.
    pub mae: MaeConfig,
    /// Write a reconstruction preview every this many epochs (0: only at the end).
    pub preview_every: i64,
    /// Image/mask folders at their own resolution: this many random crops of the model's input size per
    /// image and epoch (0: every image resized to the model's input). The TPP stage of a native-resolution
    /// segmentation run.
    pub native_crops: i64,
    /// With `native_crops`: the stored resolution, N x N (0: the files' own size).
    pub native_size: i64,
    /// bf16 autocast on the CPU (matrix products in bf16, attention, norms and losses in fp32): 2-3x
    /// faster GEMMs on CPUs with bf16 instructions (AVX512-BF16, AMX), slower elsewhere; results differ
    /// from fp32 by bf16 rounding. No effect on CUDA, which always uses bf16 autocast.
    pub cpu_bf16: bool,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            epochs: 100,
            batch_size: 256,
            lr: 1.5e-3,
            min_lr: 0.0,
            warmup: 0.05,
            weight_decay: 0.05,
            clip: 1.0,
            seed: 0,
            image_size: 0,
            norm: Norm::IMAGENET,
            augment: Augment::default(),
            mae: MaeConfig { decoder_dim: 128, decoder_depth: 2, decoder_heads: 4, ..MaeConfig::default() },
            preview_every: 0,
            native_crops: 0,
            native_size: 0,
            cpu_bf16: false,
        }
    }
}

impl PretrainConfig {
    /// Rejects values no run could use, naming the option.
    pub fn validate(&self) -> Result<()> {
        use crate::check::{NON_NEGATIVE, POSITIVE, UNIT, float, int};
        int("epochs", self.epochs, 1, i64::MAX)?;
        int("batch_size", self.batch_size, 1, crate::check::MAX_BATCH)?;
        int("image_size", self.image_size, 0, crate::backbone::MAX_IMG_SIZE)?;
        int("preview_every", self.preview_every, 0, i64::MAX)?;
        int("native_crops", self.native_crops, 0, 10_000)?;
        int("native_size", self.native_size, 0, crate::backbone::MAX_IMG_SIZE)?;
        if self.native_crops == 0 && self.native_size != 0 {
            return Err(crate::error::bad_input!("native_size applies only with native_crops > 0"));
        }
        float("lr", self.lr, POSITIVE)?;
        float("min_lr", self.min_lr, NON_NEGATIVE)?;
        crate::check::at_most("min_lr (--min-lr)", self.min_lr, "lr (--lr)", self.lr)?;
        float("warmup", self.warmup, UNIT)?;
        float("weight_decay", self.weight_decay, NON_NEGATIVE)?;
        float("clip", self.clip, NON_NEGATIVE)?;
        self.norm.validate()?;
        self.augment.validate()?;
        self.mae.validate()
    }
}

/// What a finished self-supervised stage reports.
pub struct PretrainSummary {
    /// DINO: the teacher centre at the end.
    pub center: Option<Tensor>,
    /// Optimiser updates.
    pub steps: i64,
    /// Loss of the first update.
    pub first_loss: f64,
    /// Loss of the last update.
    pub final_loss: f64,
    /// Wall time.
    pub seconds: f64,
    /// Training images per second.
    pub images_per_s: f64,
}

/// The loop for a stage over `split` (full batches only) and its loader. AdamW with betas (0.9, `beta2`):
/// MAE's recipe uses 0.95, DINO's 0.999.
fn plan(
    split: &Split,
    cfg: &PretrainConfig,
    params: Vec<(String, Tensor)>,
    beta2: f64,
    device: Device,
    out: &Path,
) -> Result<(Trainer<'static>, LoaderConfig)> {
    cfg.validate()?;
    if split.is_empty() {
        bail!("no training images");
    }
    let tiles = (cfg.native_crops > 0).then_some(crate::data::loader::Tiles {
        size: cfg.image_size,
        overlap: 0.5,
        per_image: cfg.native_crops,
    });
    // Samples per epoch: `native_crops` crops of every image at native resolution.
    let n = LoaderConfig::samples(tiles, split.len());
    let bs = cfg.batch_size.min(n);
    let world = crate::dist::part().world;
    if bs < world {
        return Err(crate::error::bad_input!(
            "--batch-size {bs} (the global batch; at most the number of training images) is smaller than the {world} \
             processes: every process needs at least one image of each batch"
        ));
    }
    let steps_per_epoch = (n / bs).max(1);
    let schedule = WarmupCosine::new(cfg.lr, cfg.min_lr, cfg.warmup, steps_per_epoch * cfg.epochs);
    let opt = AdamW::new(params, AdamWConfig { beta1: 0.9, beta2, eps: 1e-8, weight_decay: cfg.weight_decay });
    let loader =
        LoaderConfig { batch_size: bs, image_size: cfg.image_size, norm: cfg.norm, device, drop_last: true, tiles };
    let (clip, epochs, saved_in) = (cfg.clip, cfg.epochs, Some(out.to_path_buf()));
    let trainer = Trainer { opt, schedule, clip, accum: 1, epochs, steps_per_epoch, checkpoint: None, saved_in };
    Ok((trainer, loader))
}

/// Runs a stage's loop with its loss log, progress and per-epoch callback; the summary of the run.
fn run_stage(
    trainer: &mut Trainer,
    step: &mut dyn TrainStep,
    batch_size: i64,
    label: &str,
    out: &Path,
    each_epoch: &mut dyn FnMut(&super::trainer::EpochRecord) -> Result<()>,
) -> Result<PretrainSummary> {
    let mut log = LossLog::new(out)?;
    let mut progress = ProgressReport::new(label, None);
    let mut each = EachEpoch(each_epoch);
    let mut state = TrainState::default();
    let start = Instant::now();
    crate::profile::time("pre-training", || trainer.fit(step, &mut state, &mut [&mut log, &mut progress, &mut each]))?;
    let seconds = start.elapsed().as_secs_f64();
    let steps = state.epochs_done * trainer.steps_per_epoch;
    Ok(PretrainSummary {
        center: None,
        steps,
        first_loss: log.first_loss,
        final_loss: log.last_loss,
        seconds,
        images_per_s: (steps * batch_size) as f64 / seconds,
    })
}

/// One MAE update: per-sample random masking (seeded stream over the whole run), encoder + decoder, loss
/// on the masked patches.
pub struct MaeStep<'a> {
    vit: &'a crate::backbone::Vit,
    dec: &'a MaeDecoder,
    split: &'a Split,
    cfg: &'a PretrainConfig,
    loader: LoaderConfig,
    noise_rng: ChaCha8Rng,
}

impl<'a> MaeStep<'a> {
    /// The step for `vit` + `dec` on `split`'s images.
    pub fn new(
        vit: &'a crate::backbone::Vit,
        dec: &'a MaeDecoder,
        split: &'a Split,
        cfg: &'a PretrainConfig,
        loader: LoaderConfig,
    ) -> Self {
        let noise_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6d61_6500);
        MaeStep { vit, dec, split, cfg, loader, noise_rng }
    }
}

impl TrainStep for MaeStep<'_> {
    fn batches(&mut self, epoch: i64) -> Batches {
        let seed = self.cfg.seed.wrapping_add(epoch as u64 * 7919);
        let part = crate::dist::part();
        let iter = epoch_shards(self.split, self.loader, Some(self.cfg.augment), seed, false, part);
        Batches { len: self.loader.num_batches(self.loader.train_samples(self.split.len())), iter: Box::new(iter) }
    }

    fn loss(&mut self, batch: &Batch) -> Result<Tensor> {
        // The masking noise of the whole global batch (every process draws the same), this shard's rows.
        let (b, shard) = (batch.shard.total, batch.shard);
        let n_patches = (self.cfg.image_size / self.vit.config().patch_size).pow(2);
        let noise: Vec<f32> = (0..b * n_patches).map(|_| self.noise_rng.random::<f32>()).collect();
        let noise = shard.rows(&Tensor::from_slice(&noise).reshape([b, n_patches])).to_device(self.loader.device);
        let out = crate::device::autocast(self.loader.device, || {
            mae::forward(self.vit, self.dec, &batch.images, &self.cfg.mae, &noise, true)
        });
        // Every image hides as many patches, so the mean over hidden patches weights images equally.
        Ok(if shard.is_whole() { out.loss } else { out.loss * shard.share() })
    }
}

/// Trains `params` with the MAE loss of `vit` + `dec` on the images of `split` (labels unused).
/// `label` names it in progress reports; `save` is called after every epoch (atomic writes of whatever the
/// caller keeps).
#[allow(clippy::too_many_arguments)]
pub fn train_mae(
    vit: &crate::backbone::Vit,
    dec: &MaeDecoder,
    params: Vec<(String, Tensor)>,
    split: &Split,
    cfg: &PretrainConfig,
    device: Device,
    out: &Path,
    label: &str,
    save: &mut dyn FnMut() -> Result<()>,
) -> Result<PretrainSummary> {
    let (mut trainer, loader) = plan(split, cfg, params, 0.95, device, out)?;
    let mut step = MaeStep::new(vit, dec, split, cfg, loader);
    let mut each_epoch = |r: &super::trainer::EpochRecord| -> Result<()> {
        save()?;
        if r.epoch == cfg.epochs {
            write_preview(vit, dec, split, cfg, device, &out.join("preview_final.png"))
        } else if cfg.preview_every > 0 && r.epoch % cfg.preview_every == 0 {
            write_preview(vit, dec, split, cfg, device, &out.join(format!("preview_epoch{:04}.png", r.epoch)))
        } else {
            Ok(())
        }
    };
    run_stage(&mut trainer, &mut step, loader.batch_size, label, out, &mut each_epoch)
}

/// A PNG of up to 8 training images: original, masked input, reconstruction (rows).
pub fn write_preview(
    vit: &crate::backbone::Vit,
    dec: &MaeDecoder,
    split: &Split,
    cfg: &PretrainConfig,
    device: Device,
    path: &Path,
) -> Result<()> {
    let _g = tch::no_grad_guard();
    let k = split.len().min(8);
    let idx: Vec<i64> = (0..k).collect();
    let sub = split.subset(&idx);
    let x = crate::data::transforms::resize(&cfg.norm.apply(&sub.images.to_device(device)), cfg.image_size);
    let n = (cfg.image_size / vit.cfg.patch_size).pow(2);
    let mut rng = ChaCha8Rng::seed_from_u64(12345);
    let noise: Vec<f32> = (0..k * n).map(|_| rng.random::<f32>()).collect();
    let noise = Tensor::from_slice(&noise).reshape([k, n]).to_device(device);
    let out = crate::device::autocast(device, || mae::forward(vit, dec, &x, &cfg.mae, &noise, false));
    let p = vit.cfg.patch_size;
    let x = x.to_kind(Kind::Float);
    let recon = mae::reconstruct(&x, &out, p, cfg.mae.norm_pix);
    let m = out.mask.reshape([k, 1, cfg.image_size / p, cfg.image_size / p]).to_kind(Kind::Float);
    let m = m.repeat_interleave_self_int(p, 2, None).repeat_interleave_self_int(p, 3, None);
    let masked = &x * (1.0 - &m) + m * -10.0;
    let rows = [x, masked, recon];
    crate::eval::images::save_grid(&rows, &cfg.norm, path)
}

/// The pieces of a DINO run: student and teacher views of one frozen backbone, their heads, and the
/// stores the EMA runs over (teacher <- student, name by name).
pub struct DinoParts<'a> {
    /// The student: backbone + trained target parameters.
    pub student: &'a crate::backbone::Vit,
    /// The teacher: the same backbone + EMA target parameters.
    pub teacher: &'a crate::backbone::Vit,
    /// The student's projection head (trained).
    pub s_head: &'a DinoHead,
    /// The teacher's projection head (EMA).
    pub t_head: &'a DinoHead,
    /// (teacher store, student store) pairs: target parameters and heads.
    pub ema: Vec<(&'a tch::nn::VarStore, &'a tch::nn::VarStore)>,
}

/// One DINO update: two global and some local crops per image, the teacher (no gradient) on the global
/// ones, the cross-entropy over crop pairs, the centre update; the EMA teacher follows after the update.
pub struct DinoStep<'a> {
    parts: &'a DinoParts<'a>,
    split: &'a Split,
    cfg: &'a PretrainConfig,
    dino: &'a DinoConfig,
    loader: LoaderConfig,
    global_aug: Augment,
    local_aug: Augment,
    local: i64,
    /// The teacher centre.
    pub center: Tensor,
    rng: ChaCha8Rng,
    t_temp: f64,
    epoch: i64,
    /// The last batch's teacher entropy, student entropy and KL term (`loss.csv` columns).
    diag: Vec<(&'static str, Tensor)>,
    /// The epoch's summed teacher entropy and its batches, for the collapse warning.
    entropy_sum: Option<Tensor>,
    entropy_n: i64,
}

impl<'a> DinoStep<'a> {
    /// The step for `parts` on `split`'s images.
    pub fn new(
        parts: &'a DinoParts<'a>,
        split: &'a Split,
        cfg: &'a PretrainConfig,
        dino: &'a DinoConfig,
        loader: LoaderConfig,
    ) -> Self {
        let p = parts.student.config().patch_size;
        let g = cfg.image_size;
        let local = if dino.local_size > 0 {
            dino.local_size
        } else {
            ((g as f64 * 0.43 / p as f64).round() as i64).max(2) * p
        };
        let crops = |min: f64, max: f64| Augment {
            hflip: true,
            crop_min_area: min,
            crop_max_area: max,
            jitter: cfg.augment.jitter,
            pad_crop: cfg.augment.pad_crop,
            ..Augment::NONE
        };
        DinoStep {
            parts,
            split,
            cfg,
            dino,
            loader,
            global_aug: crops(dino.global_scale_min, 1.0),
            local_aug: crops(0.05, dino.local_scale_max),
            local,
            center: Tensor::zeros([1, dino.out_dim], (Kind::Float, loader.device)),
            rng: ChaCha8Rng::seed_from_u64(0),
            t_temp: dino.teacher_temp,
            epoch: 0,
            diag: Vec::new(),
            entropy_sum: None,
            entropy_n: 0,
        }
    }
}

impl TrainStep for DinoStep<'_> {
    fn batches(&mut self, epoch: i64) -> Batches {
        self.t_temp = dino::teacher_temp(self.dino, epoch);
        self.epoch = epoch;
        let seed = self.cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64) ^ 0x6469_6e6f;
        self.rng = ChaCha8Rng::seed_from_u64(seed);
        // Shuffled batches without the loader's own warp: the crops are the augmentation.
        let seed = self.cfg.seed.wrapping_add(epoch as u64 * 7919);
        let part = crate::dist::part();
        let iter = epoch_shards(self.split, self.loader, Some(Augment::NONE), seed, false, part);
        Batches { len: self.loader.num_batches(self.loader.train_samples(self.split.len())), iter: Box::new(iter) }
    }

    fn shared_state(&self) -> Vec<Tensor> {
        // Sorted by name: a store's map iterates in a different order in every process.
        let mut v: Vec<Tensor> = Vec::new();
        for (t, _) in &self.parts.ema {
            let mut named: Vec<(String, Tensor)> = t.variables().into_iter().collect();
            named.sort_by(|a, b| a.0.cmp(&b.0));
            v.extend(named.into_iter().map(|(_, t)| t));
        }
        v.push(self.center.shallow_clone());
        v
    }

    fn loss(&mut self, batch: &Batch) -> Result<Tensor> {
        let (g, parts, device, shard) = (self.cfg.image_size, self.parts, self.loader.device, batch.shard);
        let globals: Vec<Tensor> =
            (0..2).map(|_| self.global_aug.warp_shard(&batch.images, None, (g, g), &mut self.rng, shard).0).collect();
        let local = (self.local, self.local);
        let locals: Vec<Tensor> = (0..self.dino.local_crops)
            .map(|_| self.local_aug.warp_shard(&batch.images, None, local, &mut self.rng, shard).0)
            .collect();
        let teacher_out = tch::no_grad(|| {
            crate::device::autocast(device, || {
                dino::project(parts.teacher, parts.t_head, &Tensor::cat(&globals, 0), false)
            })
        })
        .to_kind(Kind::Float);
        let freeze = self.epoch < self.dino.freeze_last_layer;
        let (student, features) = crate::device::autocast(device, || {
            let (g_out, feats) =
                dino::project_features(parts.student, parts.s_head, &Tensor::cat(&globals, 0), true, freeze);
            let mut s = g_out.chunk(2, 0);
            if !locals.is_empty() {
                let l = dino::project_features(parts.student, parts.s_head, &Tensor::cat(&locals, 0), true, freeze).0;
                s.extend(l.chunk(locals.len() as i64, 0));
            }
            (s, feats)
        });
        let group = crate::dist::current().filter(|_| !shard.is_whole());
        let targets: Vec<Tensor> = match self.dino.centering {
            Centering::Centre => {
                teacher_out.chunk(2, 0).iter().map(|t| dino::centred_targets(t, &self.center, self.t_temp)).collect()
            }
            Centering::SinkhornKnopp => {
                let b = 2 * shard.total;
                dino::sinkhorn_knopp(&teacher_out, self.t_temp, self.dino.sk_iters, group, b)?.chunk(2, 0)
            }
        };
        let ce = dino::cross_entropy(&student, &targets, self.dino.student_temp);
        let mut loss = ce.shallow_clone();
        if self.dino.koleo > 0.0 {
            let k: Tensor = features.chunk(2, 0).iter().map(dino::koleo).sum();
            loss += k * self.dino.koleo;
        }
        let loss = if shard.is_whole() { loss } else { loss * shard.share() };
        let _g = tch::no_grad_guard();
        // Collapse shows in the targets' entropy (toward ln K: uniform) and in the KL term (toward 0).
        let h_t = targets.iter().map(dino::entropy).sum::<Tensor>() / targets.len() as f64;
        let h_s = student[..2].iter().map(|s| dino::entropy(&(s / self.dino.student_temp).softmax(-1, Kind::Float)));
        let h_s = h_s.sum::<Tensor>() / 2.0;
        let kl = &ce.detach() - &h_t;
        self.entropy_sum = Some(match self.entropy_sum.take() {
            Some(t) => t + &h_t,
            None => h_t.shallow_clone(),
        });
        self.entropy_n += 1;
        self.diag = vec![("teacher_entropy", h_t), ("student_entropy", h_s), ("kl", kl)];
        // The centre follows the mean teacher output of the global batch.
        let batch_center = teacher_out.mean_dim([0i64].as_slice(), true, Kind::Float);
        let batch_center = match group {
            Some(grp) => grp.sum(&(batch_center * shard.share()))?,
            None => batch_center,
        };
        let m = self.dino.center_momentum;
        self.center = &self.center * m + batch_center * (1.0 - m);
        Ok(loss)
    }

    fn diagnostics(&self) -> Vec<(&'static str, Tensor)> {
        self.diag.iter().map(|(k, t)| (*k, t.shallow_clone())).collect()
    }

    fn validate(&mut self) -> Result<BTreeMap<String, f64>> {
        // Warn once per epoch when the targets come near uniform: the pretext teaches nothing then.
        if let Some(sum) = self.entropy_sum.take() {
            let h = sum.double_value(&[]) / self.entropy_n.max(1) as f64;
            let ln_k = (self.dino.out_dim as f64).ln();
            if h > 0.9 * ln_k {
                let hint = match self.dino.centering {
                    Centering::Centre => "centering = \"sinkhorn-knopp\", a lower teacher_temp or fewer prototypes",
                    Centering::SinkhornKnopp => "a lower teacher_temp, fewer prototypes or more images per batch",
                };
                tracing::warn!(
                    "DINO epoch {}: the teacher's target entropy {h:.2} is near ln K = {ln_k:.2} (uniform targets, the \
                     pretext teaches nothing); try {hint}",
                    self.epoch + 1
                );
            }
        }
        self.entropy_n = 0;
        Ok(BTreeMap::new())
    }

    fn after_update(&mut self, step: i64, total_steps: i64) -> Result<()> {
        let m = dino::momentum(self.dino, step, total_steps);
        for (t, s) in &self.parts.ema {
            dino::ema_update(t, s, m)?;
        }
        Ok(())
    }
}

/// Trains `params` (student target parameters + student head) with the DINO loss on `split` (labels
/// unused); the teacher follows as an EMA after every update. `save` is called after every epoch.
#[allow(clippy::too_many_arguments)]
pub fn train_dino(
    parts: &DinoParts,
    params: Vec<(String, Tensor)>,
    split: &Split,
    cfg: &PretrainConfig,
    dino: &DinoConfig,
    device: Device,
    out: &Path,
    save: &mut dyn FnMut() -> Result<()>,
) -> Result<PretrainSummary> {
    let (mut trainer, loader) = plan(split, cfg, params, 0.999, device, out)?;
    let mut step = DinoStep::new(parts, split, cfg, dino, loader);
    let mut each_epoch = |_: &super::trainer::EpochRecord| save();
    let summary = run_stage(&mut trainer, &mut step, loader.batch_size, "TPP-DINO", out, &mut each_epoch)?;
    Ok(PretrainSummary { center: Some(step.center.shallow_clone()), ..summary })
}
