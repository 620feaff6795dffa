//! Training-step throughput and peak memory for the same work as the PyTorch/timm peer script
//! (random-weight timm-shaped ViT, random images, AdamW lr 1e-4 wd 0.05): `lora_ft` (LoRA r=8 on qkv +
//! head), `tpp_mae` (LoRA + 8x512 MAE decoder, 75% masking, norm-pix) and `full_ft` (everything); and
//! data-loading speed (decode and augment). Each result is one JSON object, like the peer's.
use crate::backbone::{Backbone, VitConfig};
use crate::model::PeftModel;
use crate::peft::{Method, PeftSpec};
use crate::pretext::mae::{self, MaeConfig, MaeDecoder};
use crate::train::optim::{AdamW, AdamWConfig};
use anyhow::Result;
use serde_json::{Value, json};
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};

/// The works [`steps`] knows.
pub const WORKS: &[&str] = &["lora_ft", "tpp_mae", "full_ft"];

/// What to time.
#[derive(Debug, Clone)]
pub struct StepBench {
    /// timm preset name of the model.
    pub model: String,
    /// Images per step.
    pub batch: i64,
    /// Timed steps (after 3 warm-up steps); the median is reported.
    pub steps: usize,
    /// Works to time, some of [`WORKS`].
    pub works: Vec<String>,
}

/// Decodes (all cores) and augments the data set at `path` at `size` px in batches of `batch`; images/s
/// of each.
pub fn data(path: &std::path::Path, o: &crate::data::DataOptions, batch: i64, device: Device) -> Result<Value> {
    use crate::data::loader::{LoaderConfig, epoch_batches};
    use crate::data::transforms::{Augment, Norm};
    let size = o.image_size.unwrap_or(224);
    let (hits, builds) = crate::data::cache::counters();
    let t = Instant::now();
    let (ds, _) = crate::data::open_with(path, o)?;
    let n = ds.train.len() + ds.val.len() + ds.test.len();
    let decode_s = t.elapsed().as_secs_f64();
    let cache = match crate::data::cache::counters() {
        _ if o.cache.is_none() => "off",
        (h, _) if h > hits => "mapped",
        (_, b) if b > builds => "built",
        _ => "unwritable",
    };
    let rss_after_open = rss_anon_mb();
    let mut rss_peak = rss_after_open;
    let seg = ds.task == crate::data::Task::Segmentation;
    let loader = LoaderConfig {
        batch_size: batch,
        image_size: size,
        norm: Norm::IMAGENET,
        device,
        drop_last: false,
        tiles: None,
    };
    let aug = Augment { hflip: true, crop_min_area: 0.5, rotate_deg: 10.0, jitter: 0.1, ..Augment::NONE };
    // The host's part of a GPU epoch: shuffled uint8 batches gathered from memory or the mapped cache
    // (normalisation and augmentation then run on the device).
    let t = Instant::now();
    let mut order: Vec<i64> = (0..ds.train.len()).collect();
    rand::seq::SliceRandom::shuffle(
        order.as_mut_slice(),
        &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0),
    );
    for c in order.chunks(batch.max(1) as usize) {
        let b = ds.train.images.index_select(0, &tch::Tensor::from_slice(c));
        rss_peak = rss_peak.max(rss_anon_mb());
        drop(b);
    }
    let gather_u8_s = t.elapsed().as_secs_f64();
    // An epoch without augmentation: what the loader itself delivers (gather, copy, normalise).
    let t = Instant::now();
    let mut gathered = 0;
    for b in epoch_batches(&ds.train, loader, None, 0, seg) {
        gathered += b.images.size()[0];
        rss_peak = rss_peak.max(rss_anon_mb());
    }
    let gather_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut seen = 0;
    for b in epoch_batches(&ds.train, loader, Some(aug), 0, seg) {
        seen += b.images.size()[0];
        let _ = b.images.sum(Kind::Float).double_value(&[]);
        rss_peak = rss_peak.max(rss_anon_mb());
    }
    let aug_s = t.elapsed().as_secs_f64();
    let r = json!({
        "work": "data", "data": path, "size": size, "images": n, "threads": rayon::current_num_threads(),
        "cache": cache, "open_s": (decode_s * 100.0).round() / 100.0,
        "decode_img_per_s": (n as f64 / decode_s * 10.0).round() / 10.0,
        "rss_anon_mb_after_open": rss_after_open, "rss_anon_mb_peak_epoch": rss_peak,
        "gather_u8_img_per_s": (order.len() as f64 / gather_u8_s * 10.0).round() / 10.0,
        "gather_img_per_s": (gathered as f64 / gather_s * 10.0).round() / 10.0,
        "augment_img_per_s": (seen as f64 / aug_s * 10.0).round() / 10.0, "device": format!("{device:?}"),
    });
    Ok(r)
}

/// Resident anonymous memory (heap, not file pages) of this process in MB, from /proc (0 elsewhere).
fn rss_anon_mb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok());
    kb.unwrap_or(0) / 1024
}

fn sync(device: Device) {
    if let Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

fn time_steps(device: Device, steps: usize, mut step: impl FnMut()) -> f64 {
    let mut times = Vec::with_capacity(steps);
    for i in 0..steps + 3 {
        sync(device);
        let t = Instant::now();
        step();
        sync(device);
        if i >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// One line naming the build and device, for the head of a benchmark log.
pub fn banner(device: Device) -> String {
    let dev = match device {
        Device::Cuda(_) => "cuda".to_string(),
        _ => format!("cpu ({} threads)", tch::get_num_threads()),
    };
    format!("tpp {} libtorch (tch 0.24) device {dev}", env!("CARGO_PKG_VERSION"))
}

impl StepBench {
    /// The model's architecture, after checking the settings.
    pub fn config(&self) -> Result<VitConfig> {
        let mut cfg = VitConfig::preset(&self.model).ok_or_else(|| {
            crate::error::bad_input!(
                "--model '{}': unknown preset (known: {})",
                self.model,
                VitConfig::PRESETS.join(", ")
            )
        })?;
        cfg.num_classes = 0;
        if self.batch <= 0 || self.steps == 0 {
            return Err(crate::error::bad_input!("--batch and --steps must be positive"));
        }
        if let Some(w) = self.works.iter().find(|w| !WORKS.contains(&w.as_str())) {
            return Err(crate::error::bad_input!("--work: unknown '{w}' (expected {})", WORKS.join(", ")));
        }
        Ok(cfg)
    }
}

/// Times the training step of each work of `b`: median step time, images/s, peak memory (CUDA). Each
/// result goes to `report` as soon as it is measured (a later work may run out of time or memory).
pub fn steps(b: &StepBench, device: Device, report: &mut dyn FnMut(Value)) -> Result<()> {
    let cfg = b.config()?;
    tch::manual_seed(0);
    let imgs = Tensor::randn([b.batch, 3, cfg.img_size, cfg.img_size], (Kind::Float, device));
    let tgt = Tensor::randint(10, [b.batch], (Kind::Int64, device));
    for work in &b.works {
        let spec = PeftSpec::with_methods(&[if work == "full_ft" { Method::FULL } else { Method::LORA }]);
        let bb = Backbone::fresh(&cfg, device)?;
        let mut model = PeftModel::from_backbone(bb, &spec, device, 0)?;
        crate::device::reset_peak_memory(device);
        let (med, trainable) = if work == "tpp_mae" {
            time_mae(&model, &cfg, &imgs, b, device)?
        } else {
            model.add_head(10);
            let params = model.trainable();
            let trainable: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
            let mut opt = AdamW::new(params, AdamWConfig { weight_decay: 0.05, ..Default::default() });
            let med = time_steps(device, b.steps, || {
                let logits = crate::device::autocast(device, || model.bb.vit.forward_t(&imgs, true));
                let loss = logits.to_kind(Kind::Float).cross_entropy_for_logits(&tgt);
                opt.zero_grad();
                loss.backward();
                opt.step(1e-4);
            });
            (med, trainable)
        };
        let peak = crate::device::peak_memory(device).map(|p| (p as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0);
        report(json!({
            "work": work, "model": b.model, "batch": b.batch, "dtype": if crate::device::autocasts(device) { "bf16" } else { "fp32" },
            "step_ms": (med * 1e5).round() / 100.0, "img_per_s": (b.batch as f64 / med * 10.0).round() / 10.0,
            "peak_gib": peak, "trainable": trainable,
        }));
    }
    Ok(())
}

/// The TPP-MAE step: LoRA + an 8 x 512 decoder, 75% masking.
fn time_mae(model: &PeftModel, cfg: &VitConfig, imgs: &Tensor, b: &StepBench, device: Device) -> Result<(f64, i64)> {
    let dec_vs = nn::VarStore::new(device);
    let mcfg = MaeConfig::default();
    let dec = MaeDecoder::new(&dec_vs.root(), cfg, &mcfg, 3)?;
    let mut params = model.trainable();
    params.extend(dec_vs.variables().into_iter().map(|(k, v)| (format!("pretext.{k}"), v)));
    let trainable: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
    let mut opt = AdamW::new(params, AdamWConfig { weight_decay: 0.05, ..Default::default() });
    let n = cfg.num_patches();
    let med = time_steps(device, b.steps, || {
        let noise = Tensor::rand([b.batch, n], (Kind::Float, device));
        let out = crate::device::autocast(device, || mae::forward(&model.bb.vit, &dec, imgs, &mcfg, &noise, true));
        opt.zero_grad();
        out.loss.backward();
        opt.step(1e-4);
    });
    Ok((med, trainable))
}
