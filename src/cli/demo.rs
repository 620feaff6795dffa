//! `tpp demo`: the embedded default (see `crate::experiment::demo`).
use anyhow::Result;
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder
    #[arg(long, value_parser = crate::check::out_path, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Folder holding pneumoniamnist.npz and breastmnist.npz (default: the repository's data/)
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A much shorter run (a smoke test of the whole pipeline, about a minute)
    #[arg(long)]
    pub quick: bool,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    let data = crate::experiment::demo::data_dir(a.data_dir)?;
    let (cfg, results) = crate::experiment::demo::run(&a.out, &data, a.quick, device)?;
    println!("{}", crate::eval::report::write(&cfg, &results, &a.out.join("compare"))?);
    Ok(())
}
