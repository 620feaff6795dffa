//! `tpp predict --run <dir> --input <image | folder | .npy> --out <file.csv>`: labels and probabilities.
use super::run::RunRecord;
use crate::data::images;
use crate::data::transforms::resize;
use anyhow::{Context, Result, anyhow};
use std::fmt::Write as _;
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub run: PathBuf,
    /// An image, a folder of images, or a float32 .npy [N, C, H, W] already normalised
    #[arg(long)]
    pub input: PathBuf,
    /// CSV: input, predicted label, one probability column per class; for segmentation runs, a folder of
    /// PNG masks (same names; 0/255 for binary, class ids otherwise) at each image's own size
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    let rec = RunRecord::read(&a.run)?;
    let model = rec.load_trained(&a.run, device)?;
    let size = model.bb.vit.cfg.img_size;
    let (names, x): (Vec<String>, Tensor) = if a.input.extension().is_some_and(|e| e == "npy") {
        let x = crate::data::npy::read_f32(&a.input)?;
        ((0..x.size()[0]).map(|i| format!("{}[{i}]", a.input.display())).collect(), x)
    } else {
        let files = images::list_images(&a.input)?;
        let grey = model.bb.vit.cfg.in_chans == 1;
        let norm = images::Normalize {
            mean: rec.config.norm.mean.map(|v| v as f32),
            std: rec.config.norm.std.map(|v| v as f32),
        };
        let imgs = files.iter().map(|f| images::load_image(f, size as u32, grey, &norm)).collect::<Result<Vec<_>>>()?;
        (files.iter().map(|f| f.display().to_string()).collect(), Tensor::stack(&imgs, 0))
    };
    // Inputs are resized to the model's size below: only their channel count must fit.
    let mut shape = x.size();
    if shape.len() == 4 {
        (shape[2], shape[3]) = (size, size);
    }
    model.bb.check_input(&shape).map_err(|e| anyhow!("{}: {e}", a.input.display()))?;
    let _g = tch::no_grad_guard();
    // The inputs stay on the host; only one batch at a time goes to the device (any number of files).
    let batch = |i: i64, b: i64| resize(&x.narrow(0, i, b).to_device(device), size);
    let n = x.size()[0];
    if rec.task == crate::data::Task::Segmentation {
        return write_masks(&model, &batch, n, &names, &a, device);
    }
    let chunks: Vec<Tensor> = (0..n)
        .step_by(64)
        .map(|i| {
            let xb = batch(i, 64.min(n - i));
            crate::device::autocast(device, || model.bb.vit.forward_t(&xb, false)).to_kind(Kind::Float)
        })
        .collect();
    let logits = Tensor::cat(&chunks, 0);
    let probs =
        if rec.task == crate::data::Task::Multilabel { logits.sigmoid() } else { logits.softmax(-1, Kind::Float) };
    let probs = probs.to_kind(Kind::Double).to_device(Device::Cpu);
    let k = probs.size()[1] as usize;
    let flat = Vec::<f64>::try_from(probs.flatten(0, -1))?;
    let mut csv = String::from("input,label");
    for j in 0..k {
        let _ = write!(csv, ",prob_{j}");
    }
    csv.push('\n');
    for (name, p) in names.iter().zip(flat.chunks(k)) {
        let label = if rec.task == crate::data::Task::Multilabel {
            (0..k).filter(|&j| p[j] > 0.5).map(|j| j.to_string()).collect::<Vec<_>>().join(";")
        } else {
            (0..k).max_by(|&x, &y| p[x].total_cmp(&p[y])).unwrap_or(0).to_string()
        };
        let _ = write!(csv, "\"{}\",{label}", name.replace('"', "'"));
        for v in p {
            let _ = write!(csv, ",{v:.6}");
        }
        csv.push('\n');
    }
    std::fs::write(&a.out, csv).with_context(|| format!("{}: cannot write", a.out.display()))?;
    eprintln!("wrote {} predictions to {}", names.len(), a.out.display());
    Ok(())
}

fn write_masks(
    model: &crate::model::PeftModel,
    batch: &dyn Fn(i64, i64) -> Tensor,
    n: i64,
    names: &[String],
    a: &Args,
    device: Device,
) -> Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}: cannot create folder", a.out.display()))?;
    let mut k = 0;
    for i in (0..n).step_by(16) {
        let b = 16.min(n - i);
        let xb = batch(i, b);
        let logits = crate::device::autocast(device, || model.forward_task(&xb, false)).to_kind(Kind::Float);
        for j in 0..b {
            let name = &names[(i + j) as usize];
            let src = std::path::Path::new(name);
            // Back to the image's own size when it is a file.
            let l = logits.get(j).unsqueeze(0);
            let l = match image::image_dimensions(src) {
                Ok((w, h)) => l.upsample_bilinear2d([h as i64, w as i64], false, None, None),
                Err(_) => l,
            };
            let m = l.argmax(1, false).squeeze_dim(0).to_kind(Kind::Uint8).to_device(Device::Cpu);
            let classes = logits.size()[1];
            let m = if classes == 2 { m * 255 } else { m };
            let (h, w) = (m.size()[0] as u32, m.size()[1] as u32);
            let px = Vec::<u8>::try_from(m.flatten(0, -1))?;
            let stem =
                src.file_stem().and_then(|s| s.to_str()).map(str::to_string).unwrap_or_else(|| format!("{}", i + j));
            let path = a.out.join(format!("{stem}.png"));
            image::GrayImage::from_raw(w, h, px)
                .ok_or_else(|| anyhow!("mask buffer"))?
                .save(&path)
                .with_context(|| format!("{}: cannot write", path.display()))?;
            k += 1;
        }
    }
    eprintln!("wrote {k} masks to {}", a.out.display());
    Ok(())
}
