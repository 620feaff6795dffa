//! `tpp demo`: the embedded demo (see `crate::experiment::demo`).
use anyhow::Result;
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder [default: runs/demo, with --from-scratch runs/demo-from-scratch]
    #[arg(long, value_parser = crate::check::out_path)]
    pub out: Option<PathBuf>,
    /// Folder holding pneumoniamnist.npz and breastmnist.npz [default: the copies inside tpp, written to
    /// <out>/data]
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A much shorter run (a smoke test of the whole pipeline, about a minute)
    #[arg(long)]
    pub quick: bool,
    /// The earlier demo: MAE-pre-train a small ViT on PneumoniaMNIST first, then LoRA vs LoRA + TPP
    /// (with linear-probe and full fine-tuning references) on BreastMNIST; needs no download
    #[arg(long, conflicts_with = "backbone")]
    pub from_scratch: bool,
    /// The pre-trained backbone: a checkpoint file, hf-hub:ORG/NAME or tpp:NAME [default:
    /// tpp:dinov2-vits14-imgfocus, i.e. <cache>/models/dinov2-vits14-imgfocus/model.safetensors, made by `make demo`]
    #[arg(long)]
    pub backbone: Option<PathBuf>,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    let default_out = if a.from_scratch { "runs/demo-from-scratch" } else { "runs/demo" };
    let out = a.out.unwrap_or_else(|| PathBuf::from(default_out));
    let data = crate::experiment::demo::data_dir(a.data_dir, &out)?;
    let (cfg, results) = if a.from_scratch {
        crate::experiment::demo::run_from_scratch(&out, &data, a.quick, device)?
    } else {
        let backbone = match a.backbone.or_else(crate::experiment::demo::default_backbone) {
            Some(b) => b,
            None => {
                return Err(crate::error::bad_input!(
                    "no cache folder (HOME, XDG_CACHE_HOME and TPP_CACHE_DIR are unset): pass --backbone FILE"
                ));
            }
        };
        let mut source = crate::experiment::BackboneSource::new(backbone);
        source.resolve_hub(|k| std::env::var(k).ok())?;
        crate::experiment::demo::run_pretrained(&out, &data, source, a.quick, device)?
    };
    println!("{}", crate::eval::report::write(&cfg, &results, &out.join("compare"))?);
    Ok(())
}
