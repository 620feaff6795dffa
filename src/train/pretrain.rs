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
    let n = split.len();
    if n == 0 {
        bail!("no training images");
    }
    let bs = cfg.batch_size.min(n);
    let steps_per_epoch = (n / bs).max(1);
    let total = steps_per_epoch * cfg.epochs;
    let sched = WarmupCosine {
        base_lr: cfg.lr,
        min_lr: cfg.min_lr,
        warmup_steps: ((total as f64) * cfg.warmup).round() as i64,
        total_steps: total,
    };
    let mut opt =
        AdamW::new(params, AdamWConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: cfg.weight_decay });
    let loader = LoaderConfig { batch_size: bs, image_size: cfg.image_size, norm: cfg.norm, device, drop_last: true };
    let csv_path = out.join("loss.csv");
    let mut csv = std::io::BufWriter::new(
        std::fs::File::create(&csv_path).with_context(|| format!("{}: cannot create", csv_path.display()))?,
    );
    writeln!(csv, "step,epoch,loss,lr,images_per_s")?;
    let n_patches = (cfg.image_size / vit.cfg.patch_size).pow(2);
    let mut noise_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x6d61_6500);
    let pb = progress_bar(total as u64, "TPP");
    let start = Instant::now();
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let mut step = 0i64;
    // Losses stay on the device and are read every few steps, so the GPU is not synchronised each step.
    let mut pending: Vec<(i64, i64, f64, Tensor)> = Vec::new();
    let mut window = Instant::now();
    let mut window_imgs = 0i64;
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
            pending.push((step, epoch, lr, out_mae.loss.detach()));
            window_imgs += b;
            step += 1;
            if pending.len() >= 20 || step == total {
                let losses = Vec::<f64>::try_from(
                    Tensor::stack(&pending.iter().map(|p| p.3.to_kind(Kind::Double)).collect::<Vec<_>>(), 0)
                        .to_device(Device::Cpu),
                )?;
                let ips = window_imgs as f64 / window.elapsed().as_secs_f64().max(1e-9);
                for ((s, e, lr, _), l) in pending.drain(..).zip(losses) {
                    if !l.is_finite() {
                        pb.finish_and_clear();
                        bail!(
                            "loss became {l} at step {s} (epoch {e}); stopping. The targets of the last finished epoch are kept in {}",
                            out.display()
                        );
                    }
                    if first_loss.is_nan() {
                        first_loss = l;
                    }
                    last_loss = l;
                    writeln!(csv, "{s},{e},{l:.6},{lr:.6e},{ips:.1}")?;
                }
                pb.set_message(format!("loss {last_loss:.4} lr {lr:.2e} {ips:.0} img/s"));
                window = Instant::now();
                window_imgs = 0;
            }
            pb.set_position(step as u64);
        }
        csv.flush()?;
        save()?;
        if cfg.preview_every > 0 && (epoch + 1) % cfg.preview_every == 0 && epoch + 1 < cfg.epochs {
            write_preview(vit, dec, split, cfg, device, &out.join(format!("preview_epoch{:04}.png", epoch + 1)))?;
        }
    }
    pb.finish_and_clear();
    write_preview(vit, dec, split, cfg, device, &out.join("preview_final.png"))?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(PretrainSummary {
        steps: step,
        first_loss,
        final_loss: last_loss,
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
