//! `tpp evaluate --run <dir> [--data <path>]`: test metrics of a finished run.
use anyhow::Result;
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub run: PathBuf,
    /// Another dataset of the same task (its test split); default: the run's data
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Format of --data: medmnist, folder, csv, segpairs, nifti
    #[arg(long, requires = "data")]
    pub format: Option<String>,
    /// Label volume of a NIfTI --data
    #[arg(long, requires = "data")]
    pub labels: Option<PathBuf>,
    /// Skip unreadable files of --data
    #[arg(long, requires = "data")]
    pub skip_bad: bool,
    /// Write the metrics as JSON here (default: print only)
    #[arg(long, value_parser = crate::check::out_path)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    if let Some(out) = a.out.as_ref().filter(|o| o.exists()) {
        return Err(crate::error::bad_input!(
            "{}: exists; choose another --out (nothing is overwritten)",
            out.display()
        ));
    }
    use crate::experiment::inference::{OtherData, evaluate_run};
    let other = a.data.map(|data| OtherData { data, format: a.format, labels: a.labels, skip_bad: a.skip_bad });
    let (ev, data) = evaluate_run(&a.run, other.as_ref(), device)?;
    println!("{} test images of {}", ev.n, data.display());
    for (k, v) in &ev.metrics {
        match ev.ci95.get(k) {
            Some(ci) => println!("{k:>18} {v:.4}  (95% CI {:.4} - {:.4})", ci.low, ci.high),
            None => println!("{k:>18} {v:.4}"),
        }
    }
    if let Some(out) = a.out {
        crate::peft::io::write_text_atomic(&out, &serde_json::to_string_pretty(&ev)?)?;
    }
    Ok(())
}
