//! `tpp bench`: training-step speed and peak memory (see `crate::bench`), or data-loading speed.
use anyhow::Result;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// timm preset name
    #[arg(long, default_value = "vit_base_patch16_224")]
    pub model: String,
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long, default_value_t = 128)]
    pub batch: i64,
    /// Timed steps (after 3 warm-up steps); the median is reported
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Comma-separated: lora_ft, tpp_mae, full_ft
    #[arg(long, value_delimiter = ',', default_value = "lora_ft,tpp_mae,full_ft")]
    pub work: Vec<String>,
    /// Data-loading benchmark instead: decode (all cores) and augment this data set (folder, CSV,
    /// images/ + masks/, or .npz), reporting images/s
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Image size for the data-loading benchmark
    #[arg(value_parser = crate::check::int_flag(1, crate::backbone::MAX_IMG_SIZE), long, default_value_t = 224)]
    pub size: i64,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    if let Some(d) = &a.data {
        println!("RESULT {}", crate::bench::data(d, a.size, a.batch, device)?);
        return Ok(());
    }
    println!("{}", crate::bench::banner(device));
    let b = crate::bench::StepBench { model: a.model, batch: a.batch, steps: a.steps, works: a.work };
    for r in crate::bench::steps(&b, device)? {
        println!("RESULT {r}");
    }
    Ok(())
}
