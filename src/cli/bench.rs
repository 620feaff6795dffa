//! `tpp bench`: training-step throughput and peak memory for the same work as
//! `../shared/bench/torch_peer.py` (random-weight timm-shaped ViT, random images, AdamW lr 1e-4 wd 0.05):
//! `lora_ft` (LoRA r=8 on qkv + head), `tpp_mae` (LoRA + 8x512 MAE decoder, 75% masking, norm-pix) and
//! `full_ft` (everything). Prints one `RESULT {json}` line per work, like the peer.
use crate::backbone::{Backbone, VitConfig};
use crate::model::PeftModel;
use crate::peft::{Method, PeftSpec};
use crate::pretext::mae::{self, MaeConfig, MaeDecoder};
use crate::train::optim::{AdamW, AdamWConfig};
use anyhow::{Result, bail};
use serde_json::json;
use std::time::Instant;
use tch::{Device, Kind, Tensor, nn};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// timm preset name
    #[arg(long, default_value = "vit_base_patch16_224")]
    pub model: String,
    #[arg(long, default_value_t = 128)]
    pub batch: i64,
    /// Timed steps (after 3 warm-up steps); the median is reported
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Comma-separated: lora_ft, tpp_mae, full_ft
    #[arg(long, value_delimiter = ',', default_value = "lora_ft,tpp_mae,full_ft")]
    pub work: Vec<String>,
    /// Data-loading benchmark instead: decode (all cores) and augment this data set (folder, CSV,
    /// images/ + masks/, or .npz), reporting images/s
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Image size for the data-loading benchmark
    #[arg(long, default_value_t = 224)]
    pub size: i64,
}

fn bench_data(path: &std::path::Path, size: i64, batch: i64, device: Device) -> Result<()> {
    use crate::data::loader::{LoaderConfig, epoch_batches};
    use crate::data::transforms::{Augment, Norm};
    let t = Instant::now();
    let o = crate::data::DataOptions { image_size: Some(size), mask_classes: 2, ..Default::default() };
    let (ds, _) = crate::data::open_with(path, &o)?;
    let n = ds.train.len() + ds.val.len() + ds.test.len();
    let decode_s = t.elapsed().as_secs_f64();
    let seg = ds.task == crate::data::Task::Segmentation;
    let loader = LoaderConfig { batch_size: batch, image_size: size, norm: Norm::IMAGENET, device, drop_last: false };
    let aug = Augment { hflip: true, crop_min_area: 0.5, rotate_deg: 10.0, jitter: 0.1, ..Augment::NONE };
    let t = Instant::now();
    let mut seen = 0;
    for b in epoch_batches(&ds.train, loader, Some(aug), 0, seg) {
        seen += b.images.size()[0];
        let _ = b.images.sum(Kind::Float).double_value(&[]);
    }
    let aug_s = t.elapsed().as_secs_f64();
    let r = json!({
        "work": "data", "data": path, "size": size, "images": n, "threads": rayon::current_num_threads(),
        "decode_img_per_s": (n as f64 / decode_s * 10.0).round() / 10.0,
        "augment_img_per_s": (seen as f64 / aug_s * 10.0).round() / 10.0, "device": format!("{device:?}"),
    });
    println!("RESULT {r}");
    Ok(())
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

pub fn run(a: Args, device: Device) -> Result<()> {
    if let Some(d) = &a.data {
        return bench_data(d, a.size, a.batch, device);
    }
    let mut cfg = VitConfig::preset(&a.model).ok_or_else(|| {
        anyhow::anyhow!("--model '{}': unknown preset (known: {})", a.model, VitConfig::PRESETS.join(", "))
    })?;
    cfg.num_classes = 0;
    if a.batch <= 0 || a.steps == 0 {
        bail!("--batch and --steps must be positive");
    }
    tch::manual_seed(0);
    let imgs = Tensor::randn([a.batch, 3, cfg.img_size, cfg.img_size], (Kind::Float, device));
    let tgt = Tensor::randint(10, [a.batch], (Kind::Int64, device));
    let dev_name = match device {
        Device::Cuda(_) => "cuda".to_string(),
        _ => format!("cpu ({} threads)", tch::get_num_threads()),
    };
    println!("tpp {} libtorch (tch 0.24) device {dev_name}", env!("CARGO_PKG_VERSION"));
    for work in &a.work {
        let spec = match work.as_str() {
            "lora_ft" | "tpp_mae" => PeftSpec::with_methods(&[Method::LORA]),
            "full_ft" => PeftSpec::with_methods(&[Method::FULL]),
            other => bail!("--work: unknown '{other}' (expected lora_ft, tpp_mae, full_ft)"),
        };
        let bb = Backbone::fresh(&cfg, device)?;
        let mut model = PeftModel::from_backbone(bb, &spec, device, 0)?;
        crate::device::reset_peak_memory(device);
        let (med, trainable) = if work == "tpp_mae" {
            let dec_vs = nn::VarStore::new(device);
            let mcfg = MaeConfig::default();
            let dec = MaeDecoder::new(&dec_vs.root(), &cfg, &mcfg, 3)?;
            let mut params = model.trainable();
            params.extend(dec_vs.variables().into_iter().map(|(k, v)| (format!("pretext.{k}"), v)));
            let trainable: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
            let mut opt = AdamW::new(params, AdamWConfig { weight_decay: 0.05, ..Default::default() });
            let n = cfg.num_patches();
            let med = time_steps(device, a.steps, || {
                let noise = Tensor::rand([a.batch, n], (Kind::Float, device));
                let out =
                    crate::device::autocast(device, || mae::forward(&model.bb.vit, &dec, &imgs, &mcfg, &noise, true));
                opt.zero_grad();
                out.loss.backward();
                opt.step(1e-4);
            });
            (med, trainable)
        } else {
            model.add_head(10);
            let params = model.trainable();
            let trainable: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
            let mut opt = AdamW::new(params, AdamWConfig { weight_decay: 0.05, ..Default::default() });
            let med = time_steps(device, a.steps, || {
                let logits = crate::device::autocast(device, || model.bb.vit.forward_t(&imgs, true));
                let loss = logits.to_kind(Kind::Float).cross_entropy_for_logits(&tgt);
                opt.zero_grad();
                loss.backward();
                opt.step(1e-4);
            });
            (med, trainable)
        };
        let peak = crate::device::peak_memory(device).map(|b| (b as f64 / (1u64 << 30) as f64 * 100.0).round() / 100.0);
        let r = json!({
            "work": work, "model": a.model, "batch": a.batch, "dtype": if device.is_cuda() { "bf16" } else { "fp32" },
            "step_ms": (med * 1e5).round() / 100.0, "img_per_s": (a.batch as f64 / med * 10.0).round() / 10.0,
            "peak_gib": peak, "trainable": trainable,
        });
        println!("RESULT {r}");
    }
    Ok(())
}
