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
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long)]
    pub tpp_epochs: Option<i64>,
    #[arg(value_parser = crate::check::int_flag(1, i64::MAX), long)]
    pub ft_epochs: Option<i64>,
    /// Report folder (report.md, results.json, plots, and every run)
    #[arg(long, value_parser = crate::check::out_path)]
    pub out: PathBuf,
}

impl Args {
    /// Flags override the config file.
    pub fn apply(&self, cfg: &mut CompareConfig) {
        if let Some(b) = &self.backbone {
            cfg.backbone.path = b.clone();
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
        if let Some(e) = self.tpp_epochs {
            cfg.tpp.config.epochs = e;
        }
        if let Some(e) = self.ft_epochs {
            cfg.finetune.config.epochs = e;
        }
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
        self.apply(&mut cfg);
        Ok(cfg)
    }
}

/// Runs a comparison into `out` and prints the report.
pub fn run_and_report(cfg: &CompareConfig, out: &Path, device: Device) -> Result<()> {
    let results = crate::experiment::compare::run(cfg, out, device)?;
    println!("{}", crate::eval::report::write(cfg, &results, out)?);
    Ok(())
}

pub fn run(a: Args, device: Device) -> Result<()> {
    run_and_report(&a.config()?, &a.out, device)
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
        a.apply(&mut cfg);
        assert_eq!((cfg.pretext, cfg.backbone.img_size, cfg.seeds.clone()), (Pretext::Dino, Some(56), vec![0, 1]));
        assert!(cfg.references.is_empty());
        let methods: Vec<String> = cfg.methods.iter().map(ToString::to_string).collect();
        assert_eq!(methods, ["lora", "vpt-deep"]);
        let d = crate::experiment::sections::FinetuneSection::default();
        assert_eq!(cfg.finetune.config.epochs, d.config.epochs, "an absent flag changes nothing");
    }
}
