//! `tpp evaluate --run <dir> [--data <path>]`: test metrics of a finished run.
use super::run::RunRecord;
use crate::data::loader::LoaderConfig;
use crate::train::finetune::evaluate;
use anyhow::{Result, bail};
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub run: PathBuf,
    /// Another dataset of the same task (its test split); default: the run's data
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub format: Option<String>,
    /// Write the metrics as JSON here (default: print only)
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    let mut rec = RunRecord::read(&a.run)?;
    let data = a.data.clone().unwrap_or_else(|| rec.data.clone());
    if a.format.is_some() {
        rec.format = a.format.clone();
    }
    let model = rec.load_trained(&a.run, device)?;
    let (ds, _) = rec.open_data(&model, Some(&data))?;
    if ds.task != rec.task || ds.num_classes != rec.num_classes {
        bail!(
            "{}: task {:?} with {} classes, but the run was trained for {:?} with {}",
            data.display(),
            ds.task,
            ds.num_classes,
            rec.task,
            rec.num_classes
        );
    }
    let loader = LoaderConfig {
        batch_size: 128,
        image_size: model.bb.vit.cfg.img_size,
        norm: rec.config.norm,
        device,
        drop_last: false,
    };
    let ev = evaluate(&model, &ds.test, ds.task, ds.num_classes, loader, "test")?;
    println!("{} test images of {}", ev.n, data.display());
    for (k, v) in &ev.metrics {
        match ev.ci95.get(k) {
            Some(ci) => println!("{k:>18} {v:.4}  (95% CI {:.4} - {:.4})", ci.low, ci.high),
            None => println!("{k:>18} {v:.4}"),
        }
    }
    if let Some(out) = a.out {
        std::fs::write(&out, serde_json::to_string_pretty(&ev)?)
            .map_err(|e| anyhow::anyhow!("{}: cannot write ({e})", out.display()))?;
    }
    Ok(())
}
