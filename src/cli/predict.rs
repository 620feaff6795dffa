//! `tpp predict --run <dir> --input <image | folder | .npy> --out <file.csv | mask folder>`.
use anyhow::Result;
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub run: PathBuf,
    /// An image, a folder of images, or a float32 .npy [N, C, H, W] already normalised
    #[arg(long)]
    pub input: PathBuf,
    /// CSV: input, predicted label, one probability column per class; for segmentation runs, a folder of
    /// PNG masks (same names; 0/255 for binary, class ids otherwise) at each image's own size
    #[arg(long, value_parser = crate::check::out_path)]
    pub out: PathBuf,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    let n = crate::experiment::inference::predict(&a.run, &a.input, &a.out, device)?;
    tracing::info!("wrote {n} predictions to {}", a.out.display());
    Ok(())
}
