//! `tpp compare`: a config file and flags that override it.
use crate::data::transforms::Normalization;
use crate::experiment::compare::{CompareConfig, MethodSet, Reference};
use crate::experiment::records::BackboneSource;
use crate::pretext::Pretext;
use anyhow::Result;
use std::path::{Path, PathBuf};
use tch::Device;

/// A reference baseline, or `none`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReferenceArg {
    Linear,
    Full,
    None,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// TOML config (see README); flags below override it
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Backbone checkpoint (.safetensors), or a Hugging Face hub id: hf-hub:ORG/NAME[@REV] or ORG/NAME[@REV]
    #[arg(long)]
    pub backbone: Option<PathBuf>,
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Comma-separated PEFT methods (each may combine with '+', e.g. lora+vpt-deep)
    #[arg(long, value_delimiter = ',')]
    pub methods: Option<Vec<MethodSet>>,
    /// Number of seeds (0, 1, ..., N-1)
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=crate::experiment::compare::MAX_SEEDS))]
    pub seeds: Option<u64>,
    #[arg(long, value_enum)]
    pub norm: Option<Normalization>,
    /// Pretext of the TPP stage
    #[arg(long, value_enum)]
    pub pretext: Option<Pretext>,
    /// Model input size in pixels (default: the data's, or the checkpoint's)
    #[arg(value_parser = crate::check::int_flag(1, crate::backbone::MAX_IMG_SIZE), long)]
    pub img_size: Option<i64>,
    /// Comma-separated reference baselines: linear, full, or none
    #[arg(long, value_enum, value_delimiter = ',')]
    pub references: Option<Vec<ReferenceArg>>,
    /// TPP epochs; a comma-separated list (40,120,300) runs each and picks per seed on validation
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long, value_delimiter = ',')]
    pub tpp_epochs: Option<Vec<i64>>,
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long)]
    pub ft_epochs: Option<i64>,
    /// Report folder (report.md, results.json, plots, and every run)
    #[arg(long, value_parser = crate::check::out_path)]
    pub out: PathBuf,
    /// Print the grid's independent cells (a method at one seed, or a reference at one seed), numbered
    /// from 0, with what is done, and exit
    #[arg(long, conflicts_with_all = ["cell", "devices"])]
    pub list_cells: bool,
    /// Run only cell K (e.g. one task of a Slurm job array; machines share --out); the report is written
    /// by whichever cell finishes the grid
    #[arg(long, value_name = "K", conflicts_with = "devices")]
    pub cell: Option<usize>,
    /// Run cells concurrently, one process per device (e.g. cuda:0,cuda:1; cpu,cpu splits the cores);
    /// logs in <out>/logs/
    #[arg(long, value_delimiter = ',', value_name = "DEVICES")]
    pub devices: Option<Vec<String>>,
    /// (internal: a cell started by --devices leaves the report to its parent)
    #[arg(long, hide = true)]
    pub no_report: bool,
}

impl Args {
    /// Flags override the config file.
    pub fn apply(&self, cfg: &mut CompareConfig) -> Result<()> {
        if let Some(b) = &self.backbone {
            cfg.backbone.path = b.clone();
            cfg.backbone.hub = None;
        }
        if let Some(d) = &self.data {
            cfg.data.data = d.clone();
        }
        if let Some(m) = &self.methods {
            cfg.methods = m.clone();
        }
        if let Some(n) = self.seeds {
            cfg.seeds = (0..n).collect();
        }
        if let Some(n) = self.norm {
            cfg.norm = n;
        }
        if let Some(p) = self.pretext {
            cfg.pretext = p;
        }
        if let Some(s) = self.img_size {
            cfg.backbone.img_size = Some(s);
        }
        if let Some(r) = &self.references {
            let refs = r.iter().filter_map(|r| match r {
                ReferenceArg::Linear => Some(Reference::Linear),
                ReferenceArg::Full => Some(Reference::Full),
                ReferenceArg::None => None,
            });
            cfg.references = refs.collect();
        }
        if let Some(e) = &self.tpp_epochs {
            let values = e.iter().map(|&e| toml::Value::Integer(e)).collect();
            cfg.tpp.set("epochs", values).map_err(|e| crate::error::bad_input!("--tpp-epochs: {e:#}"))?;
        }
        if let Some(e) = self.ft_epochs {
            cfg.finetune.config.epochs = e;
        }
        Ok(())
    }

    /// The comparison these arguments ask for.
    pub fn config(&self) -> Result<CompareConfig> {
        let mut cfg = match &self.config {
            Some(p) => CompareConfig::read(p)?,
            None => {
                let (Some(b), Some(d)) = (&self.backbone, &self.data) else {
                    return Err(crate::error::bad_input!(
                        "tpp compare needs --config <file.toml>, or at least --backbone and --data"
                    ));
                };
                CompareConfig::new(BackboneSource::new(b), d.clone())
            }
        };
        self.apply(&mut cfg)?;
        // A hub id is resolved once, here (the cells, and --devices' processes, read the cached file).
        cfg.backbone.resolve_hub(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }
}

/// Runs a comparison into `out` and prints the report.
pub fn run_and_report(cfg: &CompareConfig, out: &Path, device: Device) -> Result<()> {
    let results = crate::experiment::compare::run(cfg, out, device)?;
    println!("{}", crate::profile::time("report", || crate::eval::report::write(cfg, &results, out))?);
    Ok(())
}

pub fn run(a: Args, device: Device, threads: i64) -> Result<()> {
    let cfg = a.config()?;
    if a.list_cells {
        return list_cells(&cfg, &a.out);
    }
    if let Some(k) = a.cell {
        let results = crate::experiment::compare::run_unit(&cfg, &a.out, k, device)?;
        match results {
            Some(r) if !a.no_report => {
                println!("{}", crate::profile::time("report", || crate::eval::report::write(&cfg, &r, &a.out))?)
            }
            Some(_) => {}
            None => {
                let units = crate::experiment::compare::units(&cfg, &a.out)?;
                let left = units.iter().filter(|u| !u.done).count();
                tracing::info!(
                    "cell {k} done; {left} of {} cells remain (the last one to finish writes the report)",
                    units.len()
                );
            }
        }
        return Ok(());
    }
    if let Some(devices) = &a.devices {
        return on_devices(&cfg, &a.out, devices, threads);
    }
    run_and_report(&cfg, &a.out, device)
}

fn list_cells(cfg: &CompareConfig, out: &Path) -> Result<()> {
    let units = crate::experiment::compare::units(cfg, out)?;
    for (k, u) in units.iter().enumerate() {
        let status = if u.done {
            "done"
        } else if u.started {
            "started"
        } else {
            "pending"
        };
        println!("{k}\t{status}\t{}", u.label);
    }
    let done = units.iter().filter(|u| u.done).count();
    tracing::info!(
        "{} cells, {done} done; run one with --cell K (0 to {})",
        units.len(),
        units.len().saturating_sub(1)
    );
    Ok(())
}

/// This command line for one cell on one device: the same arguments without --devices / --device.
fn cell_command(k: usize, device: &str, threads: Option<usize>) -> Result<std::process::Command> {
    let exe = std::env::current_exe().map_err(|e| anyhow::anyhow!("cannot find this program's path: {e}"))?;
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if std::mem::take(&mut skip) {
            continue;
        }
        let s = a.to_string_lossy();
        if s == "--devices" || s == "--device" {
            skip = true;
        } else if !(s.starts_with("--devices=") || s.starts_with("--device=")) {
            args.push(a);
        }
    }
    let mut c = std::process::Command::new(exe);
    c.args(args).args(["--cell", &k.to_string(), "--device", device, "--no-report"]);
    if let Some(t) = threads {
        c.args(["--threads", &t.to_string()]);
    }
    Ok(c)
}

/// Runs the grid's unfinished cells concurrently, one child process per device (each device takes the
/// next cell when its last one ends), then writes the report.
fn on_devices(cfg: &CompareConfig, out: &Path, devices: &[String], threads: i64) -> Result<()> {
    if devices.is_empty() {
        return Err(crate::error::bad_input!("--devices: no device given"));
    }
    for d in devices {
        crate::device::parse_device(d).map_err(|e| crate::error::bad_input!("--devices: {e:#}"))?;
    }
    let units = crate::experiment::compare::units(cfg, out)?;
    let mut pending: std::collections::VecDeque<usize> =
        units.iter().enumerate().filter(|(_, u)| !u.done).map(|(k, _)| k).collect();
    let logs = out.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| anyhow::anyhow!("{}: cannot create ({e})", logs.display()))?;
    // CPU workers split the cores unless --threads says otherwise.
    let cpus = devices.iter().filter(|d| d.as_str() == "cpu").count().max(1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut free: Vec<usize> = (0..devices.len()).rev().collect();
    let mut running: Vec<(std::process::Child, usize, usize)> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    tracing::info!("{} of {} cells to run on {}", pending.len(), units.len(), devices.join(", "));
    loop {
        while failed.is_empty() && !free.is_empty() && !pending.is_empty() {
            let (d, k) = (free.pop().expect("checked"), pending.pop_front().expect("checked"));
            let t = (threads == 0 && devices[d] == "cpu").then(|| (cores / cpus).max(1));
            let log_path = logs.join(format!("cell{k}.log"));
            let log = std::fs::File::create(&log_path)
                .map_err(|e| anyhow::anyhow!("{}: cannot create ({e})", log_path.display()))?;
            let child = cell_command(k, &devices[d], t)?
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start cell {k}: {e}"))?;
            tracing::info!("cell {k} ({}) started on {}; log {}", units[k].label, devices[d], log_path.display());
            running.push((child, k, d));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        let mut i = 0;
        while i < running.len() {
            match running[i].0.try_wait()? {
                None => i += 1,
                Some(status) => {
                    let (_, k, d) = running.swap_remove(i);
                    free.push(d);
                    if status.success() {
                        tracing::info!("cell {k} ({}) finished on {}", units[k].label, devices[d]);
                    } else {
                        let log = logs.join(format!("cell{k}.log"));
                        let last = std::fs::read_to_string(&log).unwrap_or_default();
                        let last = last.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
                        tracing::error!("cell {k} ({}) failed on {}: {last}", units[k].label, devices[d]);
                        failed.push(format!("{k} (see {})", log.display()));
                    }
                }
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "cells failed: {}; finished cells are kept, run the command again to continue",
            failed.join(", ")
        );
    }
    let results = crate::experiment::compare::collect(cfg, out)?;
    println!("{}", crate::profile::time("report", || crate::eval::report::write(cfg, &results, out))?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_override_the_config() {
        let cli = crate::cli::Cli::try_parse_from([
            "tpp",
            "compare",
            "--pretext",
            "dino",
            "--img-size",
            "56",
            "--references",
            "none",
            "--methods",
            "lora,vpt-deep",
            "--seeds",
            "2",
            "--out",
            "o",
        ])
        .unwrap();
        let crate::cli::Command::Compare(a) = cli.cmd else { panic!("not compare") };
        let path = std::env::temp_dir().join(format!("tpp_compare_{}_flags.toml", std::process::id()));
        std::fs::write(&path, "backbone = \"b.safetensors\"\ndata = \"d.npz\"\nimg_size = 28\n").unwrap();
        let mut cfg = CompareConfig::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        a.apply(&mut cfg).unwrap();
        assert_eq!((cfg.pretext, cfg.backbone.img_size, cfg.seeds.clone()), (Pretext::Dino, Some(56), vec![0, 1]));
        assert!(cfg.references.is_empty());
        let methods: Vec<String> = cfg.methods.iter().map(ToString::to_string).collect();
        assert_eq!(methods, ["lora", "vpt-deep"]);
        let d = crate::experiment::sections::FinetuneSection::default();
        assert_eq!(cfg.finetune.config.epochs, d.config.epochs, "an absent flag changes nothing");
    }
}
