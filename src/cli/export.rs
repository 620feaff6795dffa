//! `tpp export --run <dir> --merge --out <file.safetensors>`: a plain timm checkpoint with the run's PEFT
//! updates folded in (and the task head).
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub run: PathBuf,
    /// Merge LoRA/DoRA/SSF/BitFit/IA³ into the weights (the only export mode: a plain timm checkpoint)
    #[arg(long)]
    pub merge: bool,
    #[arg(long, value_parser = crate::check::out_path)]
    pub out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    if !a.merge {
        return Err(crate::error::bad_input!(
            "export writes a merged timm checkpoint: pass --merge (the adapter alone is already in {}/adapter)",
            a.run.display()
        ));
    }
    let n = crate::experiment::inference::export_merged(&a.run, &a.out)?;
    tracing::info!("wrote merged timm checkpoint ({n} tensors) to {}", a.out.display());
    Ok(())
}
