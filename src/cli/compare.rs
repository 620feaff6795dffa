//! `tpp compare`: the paper's experiment in one command. For every PEFT method: plain PEFT and PEFT + TPP
//! (target parameters pre-trained with the pretext task on the downstream training images), plus the
//! references linear probe and full fine-tuning, on the same splits and seeds. Cells that finished are
//! not recomputed after an interruption; an interrupted fine-tuning cell resumes.
use super::args::augment;
use super::finetune::{default_select, execute};
use super::pretrain::{Pretext, TppRecord, execute_targets};
use super::run::RunRecord;
use crate::backbone::Pool;
use crate::data::transforms::Norm;
use crate::peft::{Method, PeftSpec};
use crate::pretext::mae::MaeConfig;
use crate::train::finetune::FinetuneConfig;
use crate::train::pretrain::PretrainConfig;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TppSection {
    pub epochs: i64,
    pub batch_size: i64,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup: f64,
    pub mask_ratio: f64,
    /// auto, checkpoint or fresh
    pub decoder: String,
    pub decoder_dim: i64,
    pub decoder_depth: i64,
    pub decoder_heads: i64,
    /// Random resized crop min area (default 0.8, or 1 with `pad_crop`).
    pub crop_min_area: Option<f64>,
    /// Reflect-pad + random crop, pixels (0: none).
    pub pad_crop: i64,
}

impl Default for TppSection {
    fn default() -> Self {
        TppSection {
            epochs: 100,
            batch_size: 256,
            lr: 1.5e-3,
            weight_decay: 0.05,
            warmup: 0.05,
            mask_ratio: 0.75,
            decoder: "auto".into(),
            decoder_dim: 128,
            decoder_depth: 2,
            decoder_heads: 4,
            crop_min_area: None,
            pad_crop: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FinetuneSection {
    pub epochs: i64,
    pub batch_size: i64,
    pub lr: f64,
    /// Learning rate of the full fine-tuning reference.
    pub full_lr: f64,
    pub weight_decay: f64,
    pub warmup: f64,
    pub label_smoothing: f64,
    pub patience: i64,
    /// Random resized crop min area (default 0.8, or 1 with `pad_crop`).
    pub crop_min_area: Option<f64>,
    /// Reflect-pad + random crop, pixels (0: none).
    pub pad_crop: i64,
    pub train_fraction: f64,
}

impl Default for FinetuneSection {
    fn default() -> Self {
        FinetuneSection {
            epochs: 50,
            batch_size: 64,
            lr: 1e-3,
            full_lr: 1e-4,
            weight_decay: 0.05,
            warmup: 0.05,
            label_smoothing: 0.0,
            patience: 0,
            crop_min_area: None,
            pad_crop: 0,
            train_fraction: 1.0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeftSection {
    pub lora_rank: i64,
    pub lora_alpha: f64,
    pub lora_targets: Vec<String>,
    pub adapter_dim: i64,
    pub adapter_scale: f64,
    pub prompt_len: i64,
}

impl Default for PeftSection {
    fn default() -> Self {
        PeftSection {
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_targets: vec!["qkv".into()],
            adapter_dim: 64,
            adapter_scale: 0.1,
            prompt_len: 10,
        }
    }
}

/// The TOML config of a comparison (every field has a default but `backbone` and `data`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareConfig {
    pub backbone: PathBuf,
    pub data: PathBuf,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub heads: Option<i64>,
    #[serde(default)]
    pub img_size: Option<i64>,
    #[serde(default)]
    pub pool: Option<Pool>,
    #[serde(default = "default_norm")]
    pub norm: String,
    /// PEFT methods to compare, each alone or combined ("lora+vpt-deep").
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    #[serde(default = "default_pretext")]
    pub pretext: Pretext,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Reference baselines: linear and/or full.
    #[serde(default = "default_refs")]
    pub references: Vec<String>,
    /// Validation metric for model selection (default: auc, kappa for ordinal).
    #[serde(default)]
    pub select: Option<String>,
    /// Test metric of the report (default: the selection metric).
    #[serde(default)]
    pub metric: Option<String>,
    #[serde(default)]
    pub peft: PeftSection,
    #[serde(default)]
    pub tpp: TppSection,
    #[serde(default)]
    pub finetune: FinetuneSection,
    /// Options of the DINO pretext (used when `pretext = "dino"`).
    #[serde(default)]
    pub dino: crate::pretext::dino::DinoConfig,
}

fn default_norm() -> String {
    "imagenet".into()
}
fn default_methods() -> Vec<String> {
    vec!["lora".into()]
}
fn default_pretext() -> Pretext {
    Pretext::Mae
}
fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2]
}
fn default_refs() -> Vec<String> {
    vec!["linear".into(), "full".into()]
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
    pub methods: Option<Vec<String>>,
    /// Number of seeds (0, 1, ..., N-1)
    #[arg(long)]
    pub seeds: Option<u64>,
    #[arg(long)]
    pub norm: Option<String>,
    /// Pretext of the TPP stage
    #[arg(long, value_enum)]
    pub pretext: Option<Pretext>,
    /// Model input size in pixels (default: the data's, or the checkpoint's)
    #[arg(long)]
    pub img_size: Option<i64>,
    /// Comma-separated reference baselines: linear, full, or none
    #[arg(long, value_delimiter = ',')]
    pub references: Option<Vec<String>>,
    #[arg(long)]
    pub tpp_epochs: Option<i64>,
    #[arg(long)]
    pub ft_epochs: Option<i64>,
    /// Report folder (report.md, results.json, plots, and every run)
    #[arg(long)]
    pub out: PathBuf,
}

impl Args {
    /// Flags override the config file.
    fn apply(&self, cfg: &mut CompareConfig) {
        if let Some(b) = &self.backbone {
            cfg.backbone = b.clone();
        }
        if let Some(d) = &self.data {
            cfg.data = d.clone();
        }
        if let Some(m) = &self.methods {
            cfg.methods = m.clone();
        }
        if let Some(n) = self.seeds {
            cfg.seeds = (0..n).collect();
        }
        if let Some(n) = &self.norm {
            cfg.norm = n.clone();
        }
        if let Some(p) = self.pretext {
            cfg.pretext = p;
        }
        if let Some(s) = self.img_size {
            cfg.img_size = Some(s);
        }
        if let Some(r) = &self.references {
            cfg.references = r.iter().filter(|r| r.as_str() != "none").cloned().collect();
        }
        if let Some(e) = self.tpp_epochs {
            cfg.tpp.epochs = e;
        }
        if let Some(e) = self.ft_epochs {
            cfg.finetune.epochs = e;
        }
    }
}

impl CompareConfig {
    /// A config with every default a TOML file leaves out (the same ones serde fills in).
    pub fn new(backbone: PathBuf, data: PathBuf) -> Self {
        CompareConfig {
            backbone,
            data,
            format: None,
            heads: None,
            img_size: None,
            pool: None,
            norm: default_norm(),
            methods: default_methods(),
            pretext: default_pretext(),
            seeds: default_seeds(),
            references: default_refs(),
            select: None,
            metric: None,
            peft: PeftSection::default(),
            tpp: TppSection::default(),
            finetune: FinetuneSection::default(),
            dino: Default::default(),
        }
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        toml::from_str(&text)
            .map_err(|e| anyhow!("{}: invalid config: {}", path.display(), e.to_string().replace('\n', " ")))
    }

    fn spec(&self, label: &str) -> Result<PeftSpec> {
        let methods = label
            .split('+')
            .map(|m| m.parse::<Method>().map_err(|e| anyhow!("methods: {e}")))
            .collect::<Result<Vec<_>>>()?;
        let p = &self.peft;
        let opts = crate::peft::Options::from_pairs([
            ("lora_rank", serde_json::json!(p.lora_rank)),
            ("lora_alpha", serde_json::json!(p.lora_alpha)),
            ("lora_targets", serde_json::json!(p.lora_targets)),
            ("adapter_dim", serde_json::json!(p.adapter_dim)),
            ("adapter_scale", serde_json::json!(p.adapter_scale)),
            ("prompt_len", serde_json::json!(p.prompt_len)),
        ]);
        let spec = PeftSpec::new(methods, &opts)?;
        spec.validate()?;
        Ok(spec)
    }
}

/// One fine-tuning cell of the grid.
pub struct Cell {
    pub variant: String,
    pub method: String,
    pub tpp: bool,
    pub seed: u64,
    pub dir: PathBuf,
    pub record: RunRecord,
}

pub fn run(a: Args, device: Device) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => CompareConfig::read(p)?,
        None => {
            let (Some(b), Some(d)) = (&a.backbone, &a.data) else {
                bail!("tpp compare needs --config <file.toml>, or at least --backbone and --data");
            };
            CompareConfig::new(b.clone(), d.clone())
        }
    };
    a.apply(&mut cfg);
    run_config(&cfg, &a.out, device)
}

/// Runs the whole grid of `cfg` into `out` and writes the report.
pub fn run_config(cfg: &CompareConfig, out: &Path, device: Device) -> Result<()> {
    if cfg.seeds.is_empty() {
        bail!("compare: no seeds");
    }
    for r in &cfg.references {
        if r != "linear" && r != "full" {
            bail!("compare: unknown reference '{r}' (expected linear or full)");
        }
    }
    // Task and classes only; each run reads the data at its model's size.
    let probe =
        crate::data::DataOptions { format: cfg.format.clone(), image_size: Some(16), grey: true, ..Default::default() };
    let (task, num_classes) = crate::data::describe(&cfg.data, &probe)?;
    let select = cfg.select.clone().unwrap_or_else(|| default_select(task).into());
    let norm = Norm::parse(&cfg.norm)?;
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let f = &cfg.finetune;
    let ft_aug = augment(f.crop_min_area, f.pad_crop, true, 0.0, 0.0).context("[finetune]")?;
    let tpp_aug = augment(cfg.tpp.crop_min_area, cfg.tpp.pad_crop, true, 0.0, 0.0).context("[tpp]")?;
    let ft_cfg = |seed: u64, full: bool| FinetuneConfig {
        epochs: f.epochs,
        batch_size: f.batch_size,
        lr: if full { f.full_lr } else { f.lr },
        min_lr: 0.0,
        warmup: f.warmup,
        weight_decay: f.weight_decay,
        clip: 1.0,
        seed,
        label_smoothing: f.label_smoothing,
        mixup: 0.0,
        patience: f.patience,
        accum: 1,
        layer_decay: 1.0,
        image_size: 0,
        norm,
        augment: ft_aug,
        select: select.clone(),
    };
    let record = |spec: PeftSpec, seed: u64, init: Option<PathBuf>| {
        let full = spec.trains_backbone();
        RunRecord {
            backbone: cfg.backbone.clone(),
            heads: cfg.heads,
            img_size: cfg.img_size,
            pool: cfg.pool,
            peft: spec,
            init_targets: init,
            data: cfg.data.clone(),
            format: cfg.format.clone(),
            train_fraction: f.train_fraction,
            skip_bad: false,
            mask_classes: 2,
            labels: None,
            task,
            num_classes,
            config: ft_cfg(seed, full),
        }
    };
    let mut cells: Vec<Cell> = Vec::new();
    let mut tpp_jobs: Vec<(TppRecord, PathBuf)> = Vec::new();
    for m in &cfg.methods {
        let spec = cfg.spec(m)?;
        if !spec.adds_parameters() {
            bail!("compare: '{m}' is a reference, not a PEFT method (list it under references)");
        }
        for &seed in &cfg.seeds {
            let tpp_dir = out.join("tpp").join(m).join(format!("seed{seed}"));
            let t = &cfg.tpp;
            tpp_jobs.push((
                TppRecord {
                    backbone: cfg.backbone.clone(),
                    heads: cfg.heads,
                    img_size: cfg.img_size,
                    pool: cfg.pool,
                    peft: spec.clone(),
                    data: cfg.data.clone(),
                    format: cfg.format.clone(),
                    pretext: cfg.pretext,
                    config: PretrainConfig {
                        epochs: t.epochs,
                        batch_size: t.batch_size,
                        lr: t.lr,
                        min_lr: 0.0,
                        warmup: t.warmup,
                        weight_decay: t.weight_decay,
                        clip: 1.0,
                        seed,
                        image_size: 0,
                        norm,
                        augment: tpp_aug,
                        mae: MaeConfig {
                            mask_ratio: t.mask_ratio,
                            decoder_dim: t.decoder_dim,
                            decoder_depth: t.decoder_depth,
                            decoder_heads: t.decoder_heads,
                            decoder_mlp_ratio: 4.0,
                            norm_pix: true,
                        },
                        preview_every: 0,
                    },
                    decoder: t.decoder.clone(),
                    freeze_decoder: false,
                    dino: cfg.dino.clone(),
                },
                tpp_dir.clone(),
            ));
            for (tpp, init) in [(false, None), (true, Some(tpp_dir.clone()))] {
                let variant = if tpp { format!("{m}+tpp") } else { m.clone() };
                cells.push(Cell {
                    dir: out.join("runs").join(&variant).join(format!("seed{seed}")),
                    variant,
                    method: m.clone(),
                    tpp,
                    seed,
                    record: record(spec.clone(), seed, init),
                });
            }
        }
    }
    for r in &cfg.references {
        for &seed in &cfg.seeds {
            cells.push(Cell {
                variant: r.clone(),
                method: r.clone(),
                tpp: false,
                seed,
                dir: out.join("runs").join(r).join(format!("seed{seed}")),
                record: record(cfg.spec(r)?, seed, None),
            });
        }
    }
    // Before any work: finished results are reused only for the configuration asked for now.
    for (rec, dir) in &tpp_jobs {
        if dir.join("config.json").exists() {
            check_kept_tpp(rec, dir)?;
        }
    }
    for c in &cells {
        if c.dir.join("metrics.json").exists() {
            check_kept_run(&c.record, &c.dir)?;
        }
    }
    std::fs::write(out.join("compare.toml"), toml::to_string_pretty(cfg)?)?;
    let total = tpp_jobs.len() + cells.len();
    let mut k = 0;
    for (rec, dir) in &tpp_jobs {
        k += 1;
        if dir.join("config.json").exists() {
            eprintln!("[{k}/{total}] TPP {} seed {}: done before, kept", rec.peft.label(), rec.config.seed);
            continue;
        }
        eprintln!("[{k}/{total}] TPP {} seed {}", rec.peft.label(), rec.config.seed);
        execute_targets(rec, dir, device)?;
    }
    for c in &cells {
        k += 1;
        if c.dir.join("metrics.json").exists() {
            eprintln!("[{k}/{total}] {} seed {}: done before, kept", c.variant, c.seed);
            continue;
        }
        let resume = c.dir.join(super::run::RUN_JSON).exists();
        eprintln!("[{k}/{total}] {} seed {}{}", c.variant, c.seed, if resume { " (resuming)" } else { "" });
        execute(&c.record, &c.dir, resume, device)?;
    }
    let metric = cfg.metric.clone().unwrap_or(select);
    let report = crate::eval::report::build(cfg, &cells, &metric, out)?;
    println!("{report}");
    Ok(())
}

/// A finished cell is reused only if it ran the configuration asked for now: re-running an edited config
/// into the same folder must not mix old and new numbers silently.
fn check_kept_run(want: &RunRecord, dir: &Path) -> Result<()> {
    let old = RunRecord::read(dir)?;
    let mut want = want.clone();
    adopt_filled_in((&mut want.config.image_size, &mut want.config.norm), (old.config.image_size, old.config.norm));
    check_same(&dir.join(super::run::RUN_JSON), &old, &want)
}

fn check_kept_tpp(want: &TppRecord, dir: &Path) -> Result<()> {
    let file = dir.join("config.json");
    let text = std::fs::read_to_string(&file).with_context(|| format!("{}: cannot read", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON ({e})", file.display()))?;
    let old: TppRecord = serde_json::from_value(v["record"].clone())
        .map_err(|e| anyhow!("{}: no valid TPP record ({e})", file.display()))?;
    let mut want = want.clone();
    adopt_filled_in((&mut want.config.image_size, &mut want.config.norm), (old.config.image_size, old.config.norm));
    check_same(&file, &old, &want)
}

/// Fields a run fills in itself (the model's input size, the resolved dataset normalisation) are taken
/// from the finished record where the request leaves them open.
fn adopt_filled_in(want: (&mut i64, &mut Norm), old: (i64, Norm)) {
    if *want.0 == 0 {
        *want.0 = old.0;
    }
    if *want.1 == Norm::DATASET {
        *want.1 = old.1;
    }
}

/// Ok when the two records agree; otherwise one error naming `file` and every changed field.
fn check_same<T: Serialize>(file: &Path, old: &T, want: &T) -> Result<()> {
    let (old, want) = (serde_json::to_value(old)?, serde_json::to_value(want)?);
    if old == want {
        return Ok(());
    }
    let mut diffs = Vec::new();
    diff_leaves("", &old, &want, &mut diffs);
    bail!(
        "{}: this finished run used another configuration ({}); choose another --out or delete the folder to \
         recompute it",
        file.display(),
        diffs.join(", ")
    )
}

/// `path: old -> new` for every differing leaf of two JSON values.
fn diff_leaves(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    match (a, b) {
        (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            let null = serde_json::Value::Null;
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                diff_leaves(&p, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} -> {b}")),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, text: &str) -> Result<CompareConfig> {
        let path = std::env::temp_dir().join(format!("tpp_compare_{}_{name}.toml", std::process::id()));
        std::fs::write(&path, text).unwrap();
        let cfg = CompareConfig::read(&path);
        std::fs::remove_file(&path).unwrap();
        cfg
    }

    #[test]
    fn dino_section_overrides_only_what_it_names() {
        let base = "backbone = \"b.safetensors\"\ndata = \"d.npz\"\npretext = \"dino\"\n";
        let cfg = parse("ok", &format!("{base}[dino]\nout_dim = 256\nlocal_crops = 2\n")).unwrap();
        let d = crate::pretext::dino::DinoConfig::default();
        assert_eq!((cfg.dino.out_dim, cfg.dino.local_crops), (256, 2));
        assert_eq!((cfg.dino.teacher_temp, cfg.dino.momentum), (d.teacher_temp, d.momentum));
        assert_eq!(parse("none", base).unwrap().dino, d);
        // A misspelt option is an error naming the file, not a silently ignored line.
        let err = parse("typo", &format!("{base}[dino]\nout_dims = 256\n")).unwrap_err().to_string();
        assert!(err.contains("tpp_compare_") && err.contains("typo.toml") && err.contains("out_dims"), "{err}");
    }

    #[test]
    fn flags_override_the_config() {
        use clap::Parser;
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
        let mut cfg = parse("flags", "backbone = \"b.safetensors\"\ndata = \"d.npz\"\nimg_size = 28\n").unwrap();
        a.apply(&mut cfg);
        assert_eq!((cfg.pretext, cfg.img_size, cfg.seeds.clone()), (Pretext::Dino, Some(56), vec![0, 1]));
        assert!(cfg.references.is_empty());
        assert_eq!(cfg.methods, ["lora", "vpt-deep"]);
        assert_eq!(cfg.finetune.epochs, FinetuneSection::default().epochs, "an absent flag changes nothing");
    }
}
