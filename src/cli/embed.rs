use super::BackboneArgs;
use crate::backbone::Backbone;
use crate::data::{images, npy};
use anyhow::{Result, bail};
use std::path::PathBuf;
use tch::{Device, Tensor};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// An image file, a folder of images, or a float32 .npy of preprocessed images [N, C, H, W]
    #[arg(long)]
    pub input: PathBuf,
    /// Output .npy: float32 [N, D] pooled features (rows in sorted file order for folders)
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 32)]
    pub batch_size: i64,
    /// Normalisation of image files: imagenet, half ([-1, 1]) or none ([0, 1]); .npy input is used as is
    #[arg(long, default_value = "imagenet")]
    pub norm: String,
    /// Read image files as 1-channel grey (the patch kernel is summed over its input channels)
    #[arg(long)]
    pub grey: bool,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    if a.batch_size <= 0 {
        bail!("--batch-size must be positive");
    }
    let (bb, _ck) = Backbone::load(&a.backbone.backbone, &a.backbone.load_options(), device)?;
    let size = bb.vit.cfg.img_size;
    let input = if a.input.extension().is_some_and(|e| e == "npy") {
        npy::read_f32(&a.input)?
    } else {
        let norm = images::Normalize::parse(&a.norm)?;
        let files = images::list_images(&a.input)?;
        let imgs =
            files.iter().map(|f| images::load_image(f, size as u32, a.grey, &norm)).collect::<Result<Vec<_>>>()?;
        Tensor::stack(&imgs, 0)
    };
    bb.check_input(&input.size()).map_err(|e| anyhow::anyhow!("{}: {e}", a.input.display()))?;
    let _g = tch::no_grad_guard();
    let n = input.size()[0];
    let mut outs = Vec::new();
    let mut i = 0;
    while i < n {
        let b = a.batch_size.min(n - i);
        let x = input.narrow(0, i, b).to_device(device);
        let f = crate::device::autocast(device, || bb.vit.embed(&x));
        outs.push(f.to_kind(tch::Kind::Float).to_device(Device::Cpu));
        i += b;
    }
    let feats = Tensor::cat(&outs, 0);
    npy::write_f32(&a.output, &feats)?;
    eprintln!("wrote {} features of dim {} to {}", n, feats.size()[1], a.output.display());
    Ok(())
}
