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
    /// CSV: input, predicted label, one probability column per class
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
    model.bb.check_input(&x.size()).map_err(|e| anyhow!("{}: {e}", a.input.display()))?;
    let _g = tch::no_grad_guard();
    let x = resize(&x.to_device(device), size);
    let logits = crate::device::autocast(device, || model.bb.vit.forward_t(&x, false)).to_kind(Kind::Float);
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
