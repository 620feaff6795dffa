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
    #[arg(long)]
    pub format: Option<String>,
    /// Write the metrics as JSON here (default: print only)
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    if let Some(out) = a.out.as_ref().filter(|o| o.exists()) {
        return Err(crate::error::bad_input!(
            "{}: exists; choose another --out (nothing is overwritten)",
            out.display()
        ));
    }
    let (ev, data) = crate::experiment::inference::evaluate_run(&a.run, a.data.as_deref(), a.format.clone(), device)?;
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
