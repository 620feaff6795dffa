//! `tpp data fetch medmnist <flag> [--size N] [--dir D]`, `tpp data cache <path>`, `tpp data info`.
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

/// `tpp data cache`.
#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    /// Data set to decode into the cache (as --data of the training commands)
    #[arg(required_unless_present = "clear", conflicts_with = "clear")]
    pub data: Option<PathBuf>,
    /// Decoded image size: the model's input size (file-based formats)
    #[arg(long, default_value_t = 224, value_parser = crate::check::int_flag(1, crate::backbone::MAX_IMG_SIZE))]
    pub img_size: i64,
    /// Decode as 1-channel grey (for 1-channel models)
    #[arg(long)]
    pub grey: bool,
    #[command(flatten)]
    pub read: super::args::ReadArgs,
    /// Remove every cache entry instead
    #[arg(long)]
    pub clear: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Download an official data set and verify its md5
    Fetch(FetchArgs),
    /// Decode a data set into the cache ahead of training (later runs map it instead of decoding)
    Cache(CacheArgs),
    /// List the cache's entries and their sizes
    Info,
}

pub fn run(cmd: DataCommand) -> Result<()> {
    match cmd {
        DataCommand::Fetch(a) => fetch(a),
        DataCommand::Cache(a) => cache(a),
        DataCommand::Info => info(),
    }
}

fn cache_dir() -> Result<PathBuf> {
    crate::data::cache::dir().ok_or_else(|| {
        crate::error::bad_input!(
            "no cache folder: --no-cache given, or neither --cache-dir, TPP_CACHE_DIR nor HOME set"
        )
    })
}

fn cache(a: CacheArgs) -> Result<()> {
    let dir = cache_dir()?;
    if a.clear {
        let freed = crate::data::cache::clear(&dir)?;
        tracing::info!("cleared {} ({:.1} MB freed)", dir.display(), freed as f64 / 1e6);
        return Ok(());
    }
    let Some(data) = a.data else { return Err(crate::error::bad_input!("a data set to cache is required")) };
    let o = a.read.source(data.clone()).options_at(a.img_size, a.grey, Some(dir));
    let (before_hits, _) = crate::data::cache::counters();
    let (ds, _) = crate::data::open_with(&data, &o)?;
    let n = ds.train.len() + ds.val.len() + ds.test.len();
    let was = if crate::data::cache::counters().0 > before_hits { "already cached" } else { "cached" };
    tracing::info!("{}: {was} ({n} images at {} px)", data.display(), ds.image_size().0);
    Ok(())
}

fn info() -> Result<()> {
    let dir = cache_dir()?;
    let entries = crate::data::cache::entries(&dir)?;
    println!("cache {} ({} entries)", dir.display(), entries.len());
    let mut total = 0;
    for e in &entries {
        let size = e.image_size.map_or("own size".to_string(), |s| format!("{s} px"));
        println!(
            "{:>10.1} MB  {:>8} images  {size:>8}  {}  ({})",
            e.bytes as f64 / 1e6,
            e.images,
            e.data.display(),
            e.format
        );
        total += e.bytes;
    }
    println!("{:>10.1} MB  in all", total as f64 / 1e6);
    Ok(())
}

fn fetch(a: FetchArgs) -> Result<()> {
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
