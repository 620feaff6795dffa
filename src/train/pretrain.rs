//! The self-supervised training loop of the TPP stage (and of backbone pre-training): only the given
//! parameters (target parameters + pretext head, or everything) are optimised; the rest stays frozen.
use crate::data::Split;
use crate::data::loader::{LoaderConfig, epoch_batches};
use crate::data::transforms::{Augment, Norm};
use crate::pretext::mae::{self, MaeConfig, MaeDecoder};
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::schedule::WarmupCosine;
use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Write;
use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PretrainConfig {
    pub epochs: i64,
    pub batch_size: i64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup: f64,
    pub weight_decay: f64,
    pub clip: f64,
    pub seed: u64,
    pub image_size: i64,
    pub norm: Norm,
    pub augment: Augment,
    pub mae: MaeConfig,
    /// Write a reconstruction preview every this many epochs (0: only at the end).
    pub preview_every: i64,
}

pub struct PretrainSummary {
    /// DINO: the teacher centre at the end.
    pub center: Option<Tensor>,
    pub steps: i64,
    pub first_loss: f64,
    pub final_loss: f64,
    pub seconds: f64,
    pub images_per_s: f64,
}

pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    let style =
        indicatif::ProgressStyle::with_template(&format!("{what} {{bar:30}} {{pos}}/{{len}} {{msg}} ETA {{eta}}"))
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

/// Per-step loss log of a pretext run: `loss.csv` (one row per step), the progress bar, and a non-finite
/// check. Losses stay on the device and are read every 20 steps, so a GPU is not synchronised each step.
pub struct StepLog {
    csv: std::io::BufWriter<std::fs::File>,
    pb: indicatif::ProgressBar,
    pending: Vec<(i64, i64, f64, Tensor)>,
    window: Instant,
    window_imgs: i64,
    out: std::path::PathBuf,
    pub first_loss: f64,
    pub last_loss: f64,
}

impl StepLog {
    pub fn new(out: &Path, total_steps: i64, what: &str) -> Result<Self> {
        let csv_path = out.join("loss.csv");
        let mut csv = std::io::BufWriter::new(
            std::fs::File::create(&csv_path).with_context(|| format!("{}: cannot create", csv_path.display()))?,
        );
        writeln!(csv, "step,epoch,loss,lr,images_per_s")?;
        Ok(StepLog {
            csv,
            pb: progress_bar(total_steps as u64, what),
            pending: Vec::new(),
            window: Instant::now(),
            window_imgs: 0,
            out: out.to_path_buf(),
            first_loss: f64::NAN,
            last_loss: f64::NAN,
        })
    }

    pub fn push(&mut self, step: i64, epoch: i64, lr: f64, loss: &Tensor, images: i64, last: bool) -> Result<()> {
        self.pending.push((step, epoch, lr, loss.detach()));
        self.window_imgs += images;
        if self.pending.len() >= 20 || last {
            self.flush()?;
        }
        self.pb.set_position(step as u64 + 1);
        Ok(())
    }

    pub fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let all: Vec<Tensor> = self.pending.iter().map(|p| p.3.to_kind(Kind::Double)).collect();
        let losses = Vec::<f64>::try_from(Tensor::stack(&all, 0).to_device(Device::Cpu))?;
        let ips = self.window_imgs as f64 / self.window.elapsed().as_secs_f64().max(1e-9);
        let mut lr_now = 0.0;
        for ((s, e, lr, _), l) in self.pending.drain(..).zip(losses) {
            if !l.is_finite() {
                self.pb.finish_and_clear();
                bail!(
                    "loss became {l} at step {s} (epoch {e}); stopping. What the last finished epoch saved is kept in {}",
                    self.out.display()
                );
            }
            if self.first_loss.is_nan() {
                self.first_loss = l;
            }
            self.last_loss = l;
            lr_now = lr;
            writeln!(self.csv, "{s},{e},{l:.6},{lr:.6e},{ips:.1}")?;
        }
        self.pb.set_message(format!("loss {:.4} lr {lr_now:.2e} {ips:.0} img/s", self.last_loss));
        self.window = Instant::now();
        self.window_imgs = 0;
        self.csv.flush()?;
        Ok(())
    }

    pub fn finish(&mut self) -> Result<()> {
        self.flush()?;
        self.pb.finish_and_clear();
        Ok(())
    }
}

/// What a pretext run derives from its config: batch size, step count, schedule, optimiser, loader.
struct Plan {
    bs: i64,
    total: i64,
    sched: WarmupCosine,
    opt: AdamW,
    loader: LoaderConfig,
}

impl Plan {
    /// AdamW with betas (0.9, `beta2`): MAE's recipe uses 0.95, DINO's 0.999.
    fn new(
        split: &Split,
        cfg: &PretrainConfig,
        params: Vec<(String, Tensor)>,
        beta2: f64,
        device: Device,
    ) -> Result<Self> {
        let n = split.len();
        if n == 0 {
            bail!("no training images");
        }
        let bs = cfg.batch_size.min(n);
        let total = (n / bs).max(1) * cfg.epochs;
        let sched = WarmupCosine {
            base_lr: cfg.lr,
            min_lr: cfg.min_lr,
            warmup_steps: ((total as f64) * cfg.warmup).round() as i64,
            total_steps: total,
        };
        let opt = AdamW::new(params, AdamWConfig { beta1: 0.9, beta2, eps: 1e-8, weight_decay: cfg.weight_decay });
        let loader =
            LoaderConfig { batch_size: bs, image_size: cfg.image_size, norm: cfg.norm, device, drop_last: true };
        Ok(Plan { bs, total, sched, opt, loader })
    }
}

/// Trains `params` with the MAE loss of `vit` + `dec` on the images of `split` (labels unused).
/// `save` is called after every epoch (atomic writes of whatever the caller keeps).
#[allow(clippy::too_many_arguments)]
pub fn train_mae(
    vit: &crate::backbone::Vit,
    dec: &MaeDecoder,
    params: Vec<(String, Tensor)>,
    split: &Split,
    cfg: &PretrainConfig,
    device: Device,
    out: &Path,
    save: &mut dyn FnMut() -> Result<()>,
) -> Result<PretrainSummary> {
    let Plan { bs, total, sched, mut opt, loader } = Plan::new(split, cfg, params, 0.95, device)?;
    let n_patches = (cfg.image_size / vit.cfg.patch_size).pow(2);
    let mut noise_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6d61_6500);
    let mut log = StepLog::new(out, total, "TPP")?;
    let start = Instant::now();
    let mut step = 0i64;
    for epoch in 0..cfg.epochs {
        for batch in epoch_batches(split, loader, Some(cfg.augment), cfg.seed.wrapping_add(epoch as u64 * 7919), false)
        {
            let b = batch.images.size()[0];
            let noise: Vec<f32> = (0..b * n_patches).map(|_| noise_rng.random::<f32>()).collect();
            let noise = Tensor::from_slice(&noise).reshape([b, n_patches]).to_device(device);
            let lr = sched.lr(step);
            opt.zero_grad();
            let out_mae =
                crate::device::autocast(device, || mae::forward(vit, dec, &batch.images, &cfg.mae, &noise, true));
            out_mae.loss.backward();
            if cfg.clip > 0.0 {
                let _ = opt.clip_grad_norm(cfg.clip);
            }
            opt.step(lr);
            log.push(step, epoch, lr, &out_mae.loss, b, step + 1 == total)?;
            step += 1;
        }
        save()?;
        if cfg.preview_every > 0 && (epoch + 1) % cfg.preview_every == 0 && epoch + 1 < cfg.epochs {
            write_preview(vit, dec, split, cfg, device, &out.join(format!("preview_epoch{:04}.png", epoch + 1)))?;
        }
    }
    log.finish()?;
    write_preview(vit, dec, split, cfg, device, &out.join("preview_final.png"))?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(PretrainSummary {
        center: None,
        steps: step,
        first_loss: log.first_loss,
        final_loss: log.last_loss,
        seconds,
        images_per_s: (step * bs) as f64 / seconds,
    })
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
    pub student: &'a crate::backbone::Vit,
    pub teacher: &'a crate::backbone::Vit,
    pub s_head: &'a crate::pretext::dino::DinoHead,
    pub t_head: &'a crate::pretext::dino::DinoHead,
    /// (teacher store, student store) pairs: target parameters and heads.
    pub ema: Vec<(&'a tch::nn::VarStore, &'a tch::nn::VarStore)>,
}

/// Trains `params` (student target parameters + student head) with the DINO loss on `split` (labels
/// unused); the teacher follows as an EMA after every step.
#[allow(clippy::too_many_arguments)]
pub fn train_dino(
    parts: &DinoParts,
    params: Vec<(String, Tensor)>,
    split: &Split,
    cfg: &PretrainConfig,
    dino: &crate::pretext::dino::DinoConfig,
    device: Device,
    out: &Path,
    save: &mut dyn FnMut() -> Result<()>,
) -> Result<PretrainSummary> {
    use crate::pretext::dino;
    let Plan { bs, total, sched, mut opt, loader } = Plan::new(split, cfg, params, 0.999, device)?;
    let p = parts.student.cfg.patch_size;
    let g = cfg.image_size;
    let local =
        if dino.local_size > 0 { dino.local_size } else { ((g as f64 * 0.43 / p as f64).round() as i64).max(2) * p };
    let global_aug = Augment {
        hflip: true,
        crop_min_area: dino.global_scale_min,
        crop_max_area: 1.0,
        jitter: cfg.augment.jitter,
        pad_crop: cfg.augment.pad_crop,
        ..Augment::NONE
    };
    let local_aug = Augment {
        hflip: true,
        crop_min_area: 0.05,
        crop_max_area: dino.local_scale_max,
        jitter: cfg.augment.jitter,
        pad_crop: cfg.augment.pad_crop,
        ..Augment::NONE
    };
    let mut center = Tensor::zeros([1, dino.out_dim], (Kind::Float, device));
    let mut log = StepLog::new(out, total, "TPP-DINO")?;
    let start = Instant::now();
    let mut step = 0i64;
    for epoch in 0..cfg.epochs {
        let t_temp = dino::teacher_temp(dino, epoch);
        let mut rng =
            ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(1_000_003).wrapping_add(epoch as u64) ^ 0x6469_6e6f);
        // Shuffled batches without the loader's own warp: the crops below are the augmentation.
        for batch in
            epoch_batches(split, loader, Some(Augment::NONE), cfg.seed.wrapping_add(epoch as u64 * 7919), false)
        {
            let b = batch.images.size()[0];
            let globals: Vec<Tensor> =
                (0..2).map(|_| global_aug.warp(&batch.images, None, (g, g), &mut rng).0).collect();
            let locals: Vec<Tensor> = (0..dino.local_crops)
                .map(|_| local_aug.warp(&batch.images, None, (local, local), &mut rng).0)
                .collect();
            let lr = sched.lr(step);
            opt.zero_grad();
            let teacher_out = tch::no_grad(|| {
                crate::device::autocast(device, || {
                    dino::project(parts.teacher, parts.t_head, &Tensor::cat(&globals, 0), false)
                })
            })
            .chunk(2, 0);
            let loss = crate::device::autocast(device, || {
                let mut s = dino::project(parts.student, parts.s_head, &Tensor::cat(&globals, 0), true).chunk(2, 0);
                if !locals.is_empty() {
                    s.extend(
                        dino::project(parts.student, parts.s_head, &Tensor::cat(&locals, 0), true)
                            .chunk(locals.len() as i64, 0),
                    );
                }
                let (l, batch_center) = dino::loss(&s, &teacher_out, &center, dino, t_temp);
                let _g = tch::no_grad_guard();
                center = &center * dino.center_momentum + batch_center * (1.0 - dino.center_momentum);
                l
            });
            loss.backward();
            if cfg.clip > 0.0 {
                let _ = opt.clip_grad_norm(cfg.clip);
            }
            opt.step(lr);
            let m = dino::momentum(dino, step, total);
            for (t, s) in &parts.ema {
                dino::ema_update(t, s, m)?;
            }
            log.push(step, epoch, lr, &loss, b, step + 1 == total)?;
            step += 1;
        }
        save()?;
    }
    log.finish()?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(PretrainSummary {
        center: Some(center),
        steps: step,
        first_loss: log.first_loss,
        final_loss: log.last_loss,
        seconds,
        images_per_s: (step * bs) as f64 / seconds,
    })
}
