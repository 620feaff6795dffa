//! `tpp bench`: training-step speed and peak memory (see `crate::bench`), or data-loading speed.
use crate::experiment::DataSource;
use anyhow::Result;
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// timm preset name
    #[arg(long, default_value = "vit_base_patch16_224")]
    pub model: String,
    #[arg(value_parser = crate::check::int_flag(1, crate::check::MAX_BATCH), long, default_value_t = 128)]
    pub batch: i64,
    /// Timed steps (after 3 warm-up steps); the median is reported
    #[arg(value_parser = crate::check::int_flag(1, 10_000), long, default_value_t = 20)]
    pub steps: i64,
    /// Comma-separated: lora_ft, tpp_mae, full_ft
    #[arg(long, value_delimiter = ',', default_value = "lora_ft,tpp_mae,full_ft")]
    pub work: Vec<String>,
    /// bf16 autocast on the CPU (as `finetune --cpu-bf16`)
    #[arg(long, conflicts_with = "data")]
    pub cpu_bf16: bool,
    /// Data-loading benchmark instead: decode (all cores) and augment this data set (folder, CSV,
    /// images/ + masks/, or .npz), reporting images/s
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Image size for the data-loading benchmark
    #[arg(value_parser = crate::check::int_flag(1, crate::backbone::MAX_IMG_SIZE), long, default_value_t = 224)]
    pub size: i64,
    /// Format of --data: medmnist, folder, csv, segpairs, nifti
    #[arg(long, requires = "data")]
    pub format: Option<String>,
    /// Label volume of a NIfTI --data
    #[arg(long, requires = "data")]
    pub labels: Option<std::path::PathBuf>,
    /// Skip unreadable files of --data (listed on stderr) instead of stopping
    #[arg(long, requires = "data")]
    pub skip_bad: bool,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    if let Some(d) = &a.data {
        let source = DataSource { format: a.format, skip_bad: a.skip_bad, labels: a.labels, ..DataSource::new(d) };
        let o = source.options_at(a.size, false, crate::data::cache::dir());
        println!("RESULT {}", crate::bench::data(d, &o, a.batch, device)?);
        return Ok(());
    }
    let b = crate::bench::StepBench { model: a.model, batch: a.batch, steps: a.steps as usize, works: a.work };
    b.config()?;
    crate::device::set_cpu_bf16(a.cpu_bf16);
    let precision = if crate::device::autocasts(device) { "bf16 autocast" } else { "fp32" };
    println!("{} ({precision})", crate::bench::banner(device));
    // Each line as soon as it is measured (a timeout or an out-of-memory keeps the earlier ones).
    crate::bench::steps(&b, device, &mut |r| println!("RESULT {r}"))
}
