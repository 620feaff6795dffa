//! `tpp export --run <dir> --merge --out <file.safetensors>`: fold the run's PEFT updates into the
//! backbone and write a plain timm-format checkpoint (with the task head).
use super::run::RunRecord;
use anyhow::{Result, anyhow, bail};
use std::path::PathBuf;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub run: PathBuf,
    /// Merge LoRA/DoRA/SSF/BitFit into the weights (the only export mode: a plain timm checkpoint)
    #[arg(long)]
    pub merge: bool,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    if !a.merge {
        bail!(
            "export writes a merged timm checkpoint: pass --merge (the adapter alone is already in {}/adapter)",
            a.run.display()
        );
    }
    let rec = RunRecord::read(&a.run)?;
    // Merging happens in fp32 on the CPU, whatever device trained the run.
    let mut model = rec.load_trained(&a.run, Device::Cpu)?;
    crate::peft::merge(&mut model.bb.vit, &rec.peft).map_err(|e| anyhow!("{}: {e}", a.run.display()))?;
    let named = model.bb.vit.state_dict().map_err(|e| anyhow!("{}: {e}", a.run.display()))?;
    crate::peft::io::write_safetensors_atomic(&a.out, &named)?;
    eprintln!("wrote merged timm checkpoint ({} tensors) to {}", named.len(), a.out.display());
    Ok(())
}
