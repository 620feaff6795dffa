//! `tpp data fetch medmnist <flag> [--size N] [--dir D]`.
use anyhow::Result;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// Collection (only medmnist)
    pub collection: String,
    /// Data set flag, e.g. breastmnist, pneumoniamnist, chestmnist
    pub flag: String,
    /// Image size: 28, 64, 128 or 224
    #[arg(long, default_value_t = 28)]
    pub size: i64,
    /// Destination folder
    #[arg(long, default_value = "data")]
    pub dir: PathBuf,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Download an official data set and verify its md5
    Fetch(FetchArgs),
}

pub fn run(cmd: DataCommand) -> Result<()> {
    let DataCommand::Fetch(a) = cmd;
    if a.collection != "medmnist" {
        return Err(crate::error::bad_input!("unknown collection '{}' (available: medmnist)", a.collection));
    }
    let f = crate::data::fetch::medmnist(&a.flag, a.size, &a.dir)?;
    match f.downloaded {
        None => tracing::info!("{} is already here and verified (md5 {})", f.path.display(), f.md5),
        Some(n) => tracing::info!("wrote {} ({n} bytes, md5 {} verified)", f.path.display(), f.md5),
    }
    Ok(())
}
