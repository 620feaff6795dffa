//! `tpp embed`: pooled backbone features of images.
use super::BackboneArgs;
use crate::data::transforms::Normalization;
use crate::experiment::inference::{EmbedInput, embed};
use anyhow::Result;
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// An image file, a folder of images, or a float32 .npy of preprocessed images [N, C, H, W]
    #[arg(long)]
    pub input: PathBuf,
    /// Output .npy: float32 [N, D] pooled features (rows in sorted file order for folders)
    #[arg(long, value_parser = crate::check::out_path)]
    pub output: PathBuf,
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long, default_value_t = 32)]
    pub batch_size: i64,
    /// Normalisation of image files: imagenet, half ([-1, 1]) or none ([0, 1]); .npy input is used as is
    #[arg(long, value_enum, default_value = "imagenet")]
    pub norm: Normalization,
    /// Read image files as 1-channel grey (the patch kernel is summed over its input channels)
    #[arg(long)]
    pub grey: bool,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    if a.output.exists() {
        return Err(crate::error::bad_input!(
            "{}: exists; choose another --output (nothing is overwritten)",
            a.output.display()
        ));
    }
    if a.norm == Normalization::Dataset {
        return Err(crate::error::bad_input!(
            "--norm dataset needs a training split; embed takes imagenet, half or none"
        ));
    }
    let what = EmbedInput { input: a.input, norm: a.norm.norm(), grey: a.grey, batch_size: a.batch_size };
    let feats = embed(&a.backbone.source(), &what, device)?;
    crate::data::npy::write_f32(&a.output, &feats)?;
    tracing::info!("wrote {} features of dim {} to {}", feats.size()[0], feats.size()[1], a.output.display());
    Ok(())
}
