//! The paper's experiment in one call. For every PEFT method: plain PEFT and PEFT + TPP (target
//! parameters pre-trained with the pretext task on the downstream training images), plus the references
//! linear probe and full fine-tuning, on the same splits and seeds ([`Grid`]). Cells that finished are
//! not recomputed after an interruption (if they ran the configuration asked for now); an interrupted
//! fine-tuning cell resumes. [`run`] returns the [`CompareResults`] that `crate::eval::report` renders.
use super::records::{self, BackboneSource, DataSource, RUN_JSON, RunRecord, TppRecord};
use super::sections::{FinetuneSection, TppSection};
use crate::data::Task;
use crate::data::transforms::{Norm, Normalization};
use crate::eval::metrics::Metric;
use crate::peft::{Method, Options, PeftSpec};
use crate::pretext::Pretext;
use crate::pretext::dino::DinoConfig;
use crate::train::finetune::FinetuneConfig;
use crate::train::pretrain::PretrainConfig;
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use tch::Device;

/// PEFT methods used together in one variant, written `lora` or `lora+vpt-deep`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodSet(pub Vec<Method>);

impl std::str::FromStr for MethodSet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.split('+').map(str::parse).collect::<Result<Vec<Method>, String>>().map(MethodSet)
    }
}

impl fmt::Display for MethodSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|m| m.name()).collect();
        f.write_str(&names.join("+"))
    }
}

impl Serialize for MethodSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MethodSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A reference baseline of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Reference {
    /// Linear probe: a head on the frozen backbone.
    Linear,
    /// Full fine-tuning.
    Full,
}

/// How the linear-probe reference trains its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearProbe {
    /// On pooled features computed once per image, without augmentation (benchmark papers' probe).
    #[default]
    Features,
    /// Through the frozen backbone every epoch, with the fine-tuning augmentation.
    Augmented,
}

impl Reference {
    /// The method the reference runs.
    pub fn method(self) -> Method {
        match self {
            Reference::Linear => Method::LINEAR,
            Reference::Full => Method::FULL,
        }
    }
}

/// The TOML config of a comparison (every key has a default but `backbone` and `data`; unknown keys
/// are errors).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareConfig {
    /// The backbone (`backbone`, `heads`, `img_size`, `pool`).
    #[serde(flatten)]
    pub backbone: BackboneSource,
    /// The data set (`data`, `format`, `skip_bad`, `mask_classes`, `labels`).
    #[serde(flatten)]
    pub data: DataSource,
    /// Pixel normalisation.
    #[serde(default = "default_norm")]
    pub norm: Normalization,
    /// PEFT methods to compare, each alone or combined ("lora+vpt-deep").
    #[serde(default = "default_methods")]
    pub methods: Vec<MethodSet>,
    /// The TPP stage's pretext.
    #[serde(default = "default_pretext")]
    pub pretext: Pretext,
    /// Seeds of the runs.
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Reference baselines.
    #[serde(default = "default_refs")]
    pub references: Vec<Reference>,
    /// Validation metric for model selection (default: the task's).
    #[serde(default)]
    pub select: Option<Metric>,
    /// Test metric of the report (default: the selection metric).
    #[serde(default)]
    pub metric: Option<Metric>,
    /// PEFT options by name (`lora_rank`, `adapter_dim`, ...), for every method that has them.
    #[serde(default)]
    pub peft: Options,
    /// The TPP stage.
    #[serde(default)]
    pub tpp: TppSection,
    /// Fine-tuning.
    #[serde(default)]
    pub finetune: FinetuneSection,
    /// Options of the DINO pretext (used when `pretext = "dino"`).
    #[serde(default)]
    pub dino: DinoConfig,
    /// How the linear-probe reference trains.
    #[serde(default)]
    pub linear_probe: LinearProbe,
}

fn default_norm() -> Normalization {
    Normalization::Imagenet
}
fn default_methods() -> Vec<MethodSet> {
    vec![MethodSet(vec![Method::LORA])]
}
fn default_pretext() -> Pretext {
    Pretext::Mae
}
fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2]
}
fn default_refs() -> Vec<Reference> {
    vec![Reference::Linear, Reference::Full]
}

impl CompareConfig {
    /// A config with every default a TOML file leaves out (the same ones serde fills in).
    pub fn new(backbone: BackboneSource, data: PathBuf) -> Self {
        CompareConfig {
            backbone,
            data: DataSource::new(data),
            norm: default_norm(),
            methods: default_methods(),
            pretext: default_pretext(),
            seeds: default_seeds(),
            references: default_refs(),
            select: None,
            metric: None,
            peft: Options::default(),
            tpp: TppSection::default(),
            finetune: FinetuneSection::default(),
            dino: DinoConfig::default(),
            linear_probe: LinearProbe::default(),
        }
    }

    /// Reads a TOML config; errors name the file and the key.
    pub fn read(path: &Path) -> Result<Self> {
        // Every failure here is a problem with the input named.
        crate::error::input((|| -> Result<Self> {
            let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
            let invalid = |e: String| anyhow!("{}: invalid config: {}", path.display(), e.replace('\n', " "));
            let table: toml::Table = text.parse().map_err(|e: toml::de::Error| invalid(e.to_string()))?;
            let keys: Vec<String> = table.keys().cloned().collect();
            let cfg: CompareConfig =
                toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| invalid(e.to_string()))?;
            // serde cannot reject unknown keys next to flattened ones: every key must be a field.
            let known = serde_json::to_value(&cfg)?;
            if let Some(k) = keys.iter().find(|k| known.get(k.as_str()).is_none()) {
                return Err(invalid(format!("unknown key `{k}`")));
            }
            PeftSpec::new(Vec::new(), &cfg.peft).map_err(|e| invalid(format!("[peft]: {e}")))?;
            cfg.validate().map_err(|e| invalid(format!("{e:#}")))?;
            Ok(cfg)
        })())
    }

    /// Rejects settings no comparison could run, naming the section and option.
    pub fn validate(&self) -> Result<()> {
        self.backbone.validate()?;
        self.data.validate()?;
        if self.seeds.is_empty() || self.seeds.len() as u64 > MAX_SEEDS {
            return Err(crate::error::bad_input!("seeds: give 1 to {MAX_SEEDS}, got {}", self.seeds.len()));
        }
        // A repeated entry would run (and count) the same cell twice in the paired statistics.
        unique("seeds", &self.seeds)?;
        unique("methods", &self.methods.iter().map(ToString::to_string).collect::<Vec<_>>())?;
        unique("references", &self.references.iter().map(|r| r.method().to_string()).collect::<Vec<_>>())?;
        self.tpp.config.validate().map_err(|e| e.context("[tpp]"))?;
        self.finetune.config.validate().map_err(|e| e.context("[finetune]"))?;
        crate::check::float("[finetune] full_lr", self.finetune.full_lr, crate::check::POSITIVE)?;
        let fraction = self.finetune.train_fraction;
        crate::check::float("[finetune] train_fraction", fraction, crate::check::UNIT_OPEN_LOW)?;
        self.dino.validate().map_err(|e| e.context("[dino]"))?;
        for m in &self.methods {
            self.spec(m)?;
        }
        Ok(())
    }

    /// The spec of one method set with the config's PEFT options.
    fn spec(&self, methods: &MethodSet) -> Result<PeftSpec> {
        let spec = PeftSpec::new(methods.0.clone(), &self.peft)?;
        spec.validate()?;
        Ok(spec)
    }
}

/// The most seeds a comparison runs (each seed is a full set of runs).
pub const MAX_SEEDS: u64 = 1000;

/// An error naming the first entry of `values` given twice.
fn unique<T: PartialEq + std::fmt::Display>(key: &str, values: &[T]) -> Result<()> {
    match values.iter().enumerate().find(|(i, v)| values[..*i].contains(v)) {
        Some((_, v)) => Err(crate::error::bad_input!("{key}: '{v}' is given twice")),
        None => Ok(()),
    }
}

/// One fine-tuning cell of the grid.
pub struct Cell {
    /// `lora`, `lora+tpp`, `linear`, ...
    pub variant: String,
    /// The method set (or reference) it runs.
    pub method: String,
    /// The TPP stage its targets start from (index into `Grid::tpp`).
    pub stage: Option<usize>,
    /// Its seed.
    pub seed: u64,
    /// Its run folder.
    pub dir: PathBuf,
    /// Its run.
    pub record: RunRecord,
    /// The TPP setting of a sweep it fine-tunes from (`epochs-40`): trained without the test split,
    /// which only the [`Pick`] of its seed reads.
    pub candidate: Option<String>,
}

impl Cell {
    /// Finished: tested (`metrics.json`), or for a sweep's candidate, trained (`validation.json`).
    pub fn done(&self) -> bool {
        if self.candidate.is_some() { self.dir.join(super::finetune::VALIDATION_JSON).exists() } else { self.tested() }
    }

    /// Scored on the test split.
    pub fn tested(&self) -> bool {
        self.dir.join("metrics.json").exists()
    }
}

/// The choice among a seed's TPP sweep candidates: the one whose fine-tuned model scores best on
/// validation, and only it is scored on the test split.
pub struct Pick {
    /// The variant (`lora+tpp`).
    pub variant: String,
    /// The method set's label.
    pub method: String,
    /// The seed.
    pub seed: u64,
    /// The candidate runs (indices into `Grid::cells`), in sweep order.
    pub candidates: Vec<usize>,
    /// The plain run of the method and seed (index into `Grid::cells`).
    pub plain: usize,
    /// Where the choice is recorded (`runs/<variant>/pick-seed<N>.json`).
    pub file: PathBuf,
}

/// What a [`Pick`] file records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PickRecord {
    /// The selection metric.
    pub select: String,
    /// The chosen setting's label.
    pub picked: String,
    /// Each candidate's best validation value, in sweep order (null: none finite).
    pub validation: Vec<(String, Option<f64>)>,
}

impl PickRecord {
    /// Reads a pick file.
    pub fn read(file: &Path) -> Result<Self> {
        records::read_json(file, "a pick record")
    }
}

impl Pick {
    /// Done: chosen from the candidates asked for now, as their validation records still say, and the
    /// chosen run tested.
    fn done(&self, grid: &Grid) -> bool {
        self.choose(grid).is_ok_and(|(now, i)| self.finished(grid, &now, i))
    }

    /// Whether the choice `now` (cell `i`) is the one the pick file holds, from the same validation values,
    /// and its run is tested.
    fn finished(&self, grid: &Grid, now: &PickRecord, i: usize) -> bool {
        let recorded =
            PickRecord::read(&self.file).is_ok_and(|r| r.validation == now.validation && r.picked == now.picked);
        recorded && grid.cells[i].tested()
    }

    /// Test results of this seed in the variant's folder other than the candidate `keep`'s: any would
    /// mean the test split was read for another setting (an earlier pick, under other lists).
    fn other_tested(&self, grid: &Grid, keep: usize) -> Option<PathBuf> {
        let variant_dir = self.file.parent()?;
        let seed = grid.cells[keep].dir.file_name()?.to_owned();
        let keep = grid.cells[keep].dir.clone();
        std::fs::read_dir(variant_dir)
            .ok()?
            .filter_map(|e| Some(e.ok()?.path().join(&seed)))
            .find(|d| *d != keep && d.join("metrics.json").exists())
    }

    /// Chooses from the candidates' validation records: the highest finite value, the first on a tie.
    fn choose(&self, grid: &Grid) -> Result<(PickRecord, usize)> {
        let mut validation = Vec::new();
        let mut best: Option<(f64, usize)> = None;
        for &i in &self.candidates {
            let c = &grid.cells[i];
            let v = super::finetune::ValidationRecord::read(&c.dir)?;
            if let Some(x) = v.best_val.filter(|x| x.is_finite())
                && best.is_none_or(|(b, _)| x > b)
            {
                best = Some((x, i));
            }
            validation.push((c.candidate.clone().unwrap_or_default(), v.best_val));
        }
        let i = best.map_or(self.candidates[0], |(_, i)| i);
        let picked = grid.cells[i].candidate.clone().unwrap_or_default();
        Ok((PickRecord { select: grid.select.name(), picked, validation }, i))
    }
}

/// One TPP stage of the grid.
pub struct TppJob {
    /// Its output folder.
    pub dir: PathBuf,
    /// The stage.
    pub record: TppRecord,
}

/// Every stage of a comparison, in the order they run, and what they are scored on.
pub struct Grid {
    /// TPP stages (one per method set and seed).
    pub tpp: Vec<TppJob>,
    /// Fine-tuning runs.
    pub cells: Vec<Cell>,
    /// The choices among TPP sweep candidates (one per method set and seed; none without a sweep).
    pub picks: Vec<Pick>,
    /// The task of the data.
    pub task: Task,
    /// The selection metric.
    pub select: Metric,
}

impl CompareConfig {
    /// The fine-tuning config of a run of `seed` (the full reference at its own lr).
    fn finetune_config(&self, seed: u64, full: bool, select: Metric) -> FinetuneConfig {
        let f = &self.finetune;
        FinetuneConfig {
            lr: if full { f.full_lr } else { f.config.lr },
            seed,
            image_size: 0,
            norm: self.norm.norm(),
            select,
            ..f.config.clone()
        }
    }

    fn run_record(&self, spec: PeftSpec, seed: u64, init: Option<PathBuf>, task: (Task, i64, Metric)) -> RunRecord {
        let full = spec.trains_backbone();
        let probe = spec.methods == [Method::LINEAR] && self.linear_probe == LinearProbe::Features;
        let mut config = self.finetune_config(seed, full, task.2);
        config.cached_features = probe && task.0 != Task::Segmentation;
        RunRecord {
            backbone: self.backbone.clone(),
            peft: spec,
            init_targets: init,
            data: self.data.clone(),
            train_fraction: self.finetune.train_fraction,
            task: task.0,
            num_classes: task.1,
            config,
            fingerprints: Default::default(),
        }
    }

    fn tpp_record(&self, spec: PeftSpec, seed: u64, config: &PretrainConfig) -> TppRecord {
        TppRecord {
            backbone: self.backbone.clone(),
            peft: spec,
            data: self.data.clone(),
            pretext: self.pretext,
            config: PretrainConfig { seed, image_size: 0, norm: self.norm.norm(), ..config.clone() },
            decoder: self.tpp.decoder,
            freeze_decoder: false,
            dino: self.dino.clone(),
            backbone_fingerprint: None,
        }
    }

    /// Every stage of the comparison into `out`, as their records will be written (absolute paths, the
    /// inputs' fingerprints).
    pub fn grid(&self, out: &Path) -> Result<Grid> {
        let mut grid = self.plain_grid(out)?;
        let (backbone, data) = (records::fingerprint(&self.backbone.path)?, self.data.fingerprint()?);
        for job in &mut grid.tpp {
            job.record = job.record.resolved()?;
        }
        let fingerprints = records::Fingerprints { backbone: Some(backbone), data: Some(data), init_targets: None };
        for c in &mut grid.cells {
            c.record = RunRecord { fingerprints: fingerprints.clone(), ..c.record.clone().absolute_paths() };
        }
        Ok(grid)
    }

    fn plain_grid(&self, out: &Path) -> Result<Grid> {
        self.validate()?;
        // Task and classes only; each run reads the data at its model's size.
        let (task, num_classes) = self.data.describe()?;
        let select = self.select.unwrap_or(Metric::default_for(task));
        for (key, m) in [("select", Some(select)), ("metric", self.metric)] {
            if let Some(m) = m {
                m.check_for(task, num_classes).map_err(|e| crate::error::bad_input!("{key}: {e}"))?;
            }
        }
        let t = (task, num_classes, select);
        let (mut tpp, mut cells, mut picks) = (Vec::new(), Vec::new(), Vec::new());
        // Without a sweep: tpp/<method>/seedN and runs/<method>+tpp/seedN; a sweep's setting adds its
        // label as a folder level (tpp/<method>/epochs-40/seedN).
        let candidates = self.tpp.candidates()?;
        let seed_dir = |kind: &str, v: &str, label: &str, seed: u64| {
            let d = out.join(kind).join(v);
            if label.is_empty() { d } else { d.join(label) }.join(format!("seed{seed}"))
        };
        for m in &self.methods {
            let spec = self.spec(m)?;
            if !spec.adds_parameters() {
                bail!("compare: '{m}' is a reference, not a PEFT method (list it under references)");
            }
            let name = m.to_string();
            let variant = format!("{name}+tpp");
            for &seed in &self.seeds {
                let plain = cells.len();
                let record = self.run_record(spec.clone(), seed, None, t);
                let (method, dir) = (name.clone(), seed_dir("runs", &name, "", seed));
                cells.push(Cell { variant: name.clone(), method, stage: None, seed, dir, record, candidate: None });
                let mut cands = Vec::new();
                for c in &candidates {
                    let tpp_dir = seed_dir("tpp", &name, &c.label, seed);
                    let stage = Some(tpp.len());
                    tpp.push(TppJob { dir: tpp_dir.clone(), record: self.tpp_record(spec.clone(), seed, &c.config) });
                    let record = self.run_record(spec.clone(), seed, Some(tpp_dir), t);
                    let dir = seed_dir("runs", &variant, &c.label, seed);
                    let candidate = (!c.label.is_empty()).then(|| c.label.clone());
                    cands.push(cells.len());
                    let (variant, method) = (variant.clone(), name.clone());
                    cells.push(Cell { variant, method, stage, seed, dir, record, candidate });
                }
                if candidates.len() > 1 {
                    let file = out.join("runs").join(&variant).join(format!("pick-seed{seed}.json"));
                    let (variant, method) = (variant.clone(), name.clone());
                    picks.push(Pick { variant, method, seed, candidates: cands, plain, file });
                }
            }
        }
        for r in &self.references {
            let spec = PeftSpec::with_methods(&[r.method()]);
            let name = r.method().name().to_string();
            for &seed in &self.seeds {
                let record = self.run_record(spec.clone(), seed, None, t);
                let dir = seed_dir("runs", &name, "", seed);
                let (variant, method) = (name.clone(), name.clone());
                cells.push(Cell { variant, method, stage: None, seed, dir, record, candidate: None });
            }
        }
        Ok(Grid { tpp, cells, picks, task, select })
    }
}

/// An independent piece of a grid (`tpp compare --cell K`): a PEFT method at one seed (its TPP stage, then
/// fine-tuning without and with it) or a reference at one seed. Units share nothing but the data, so
/// they can run at the same time on other devices or machines sharing the output folder.
#[derive(Debug, Clone)]
pub struct Unit {
    /// e.g. `lora seed 0`, `linear seed 2`.
    pub label: String,
    /// Its TPP stages (indices into `Grid::tpp`).
    pub tpp: Vec<usize>,
    /// Its fine-tuning runs (indices into `Grid::cells`).
    pub runs: Vec<usize>,
    /// Its picks among TPP sweep candidates (indices into `Grid::picks`).
    pub picks: Vec<usize>,
    /// Every stage and run of it finished.
    pub done: bool,
    /// Some stage or run of it has started (a folder exists).
    pub started: bool,
}

impl Grid {
    /// The grid's independent units, in a fixed order (the numbering of `--cell K`, from 0).
    pub fn units(&self) -> Vec<Unit> {
        let mut units = Vec::new();
        let mut claimed = vec![false; self.cells.len()];
        for i in 0..self.cells.len() {
            let c = &self.cells[i];
            if claimed[i] || c.stage.is_some() || !self.is_peft(c) {
                continue;
            }
            // A PEFT method at one seed: its plain run, the runs from its TPP stages, those stages, its pick.
            let mine = |d: &Cell| d.seed == c.seed && d.method == c.method && self.is_peft(d);
            let runs: Vec<usize> = (0..self.cells.len()).filter(|&k| !claimed[k] && mine(&self.cells[k])).collect();
            let tpp: Vec<usize> = runs.iter().filter_map(|&k| self.cells[k].stage).collect();
            let picks: Vec<usize> = (0..self.picks.len()).filter(|&p| self.picks[p].plain == i).collect();
            for &k in &runs {
                claimed[k] = true;
            }
            units.push(self.unit(format!("{} seed {}", c.method, c.seed), tpp, runs, picks));
        }
        for (i, c) in self.cells.iter().enumerate() {
            if !claimed[i] {
                units.push(self.unit(format!("{} seed {}", c.variant, c.seed), Vec::new(), vec![i], Vec::new()));
            }
        }
        units
    }

    /// Whether a cell is a PEFT method's (plain or from TPP), not a reference's.
    fn is_peft(&self, c: &Cell) -> bool {
        c.record.peft.adds_parameters()
    }

    fn unit(&self, label: String, tpp: Vec<usize>, runs: Vec<usize>, picks: Vec<usize>) -> Unit {
        let tpp_done = |j: &usize| self.tpp[*j].dir.join("config.json").exists();
        let done = tpp.iter().all(tpp_done)
            && runs.iter().all(|&i| self.cells[i].done())
            && picks.iter().all(|&p| self.picks[p].done(self));
        let started = tpp.iter().any(|j| self.tpp[*j].dir.exists() || partial(&self.tpp[*j].dir).exists())
            || runs.iter().any(|i| self.cells[*i].dir.exists());
        Unit { label, tpp, runs, picks, done, started }
    }
}

fn partial(dir: &Path) -> PathBuf {
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    dir.with_file_name(format!("{name}.partial"))
}

/// The units of `cfg`'s grid in `out`, with what is done (`tpp compare --list-cells`).
pub fn units(cfg: &CompareConfig, out: &Path) -> Result<Vec<Unit>> {
    Ok(cfg.grid(out)?.units())
}

/// Runs unit `k` of the grid (keeping what finished; an interrupted run resumes) and, when that completes
/// the grid, collects the results (None while other units are missing). Concurrent units write only
/// into their own folders, each file atomically.
pub fn run_unit(cfg: &CompareConfig, out: &Path, k: usize, device: Device) -> Result<Option<CompareResults>> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let grid = cfg.grid(out)?;
    let units = grid.units();
    let Some(unit) = units.get(k) else {
        return Err(crate::error::bad_input!(
            "--cell {k}: the grid has {} cells (0 to {}; see --list-cells)",
            units.len(),
            units.len().saturating_sub(1)
        ));
    };
    let tpp: Vec<&TppJob> = unit.tpp.iter().map(|&j| &grid.tpp[j]).collect();
    let cells: Vec<&Cell> = unit.runs.iter().map(|&i| &grid.cells[i]).collect();
    check_kept(&tpp, &cells)?;
    crate::peft::io::write_text_atomic(&out.join("compare.toml"), &toml::to_string_pretty(cfg)?)?;
    tracing::info!("cell {k} of {}: {}", units.len(), unit.label);
    run_jobs(&tpp, &cells, device)?;
    run_picks(&grid, &unit.picks, device)?;
    if grid.units().iter().all(|u| u.done) { Ok(Some(CompareResults::collect(cfg, &grid)?)) } else { Ok(None) }
}

/// Errors unless every finished (or interrupted) stage and run ran the configuration asked for now.
fn check_kept(tpp: &[&TppJob], cells: &[&Cell]) -> Result<()> {
    // Before any work: finished results are reused only for the configuration asked for now.
    for job in tpp {
        if job.dir.join("config.json").exists() {
            check_kept_tpp(&job.record, &job.dir)?;
        }
    }
    // Finished and interrupted runs alike: an interrupted one is resumed only with the same record.
    for c in cells {
        if c.dir.join(RUN_JSON).exists() {
            check_kept_run(&c.record, &c.dir)?;
        }
    }
    Ok(())
}

/// Runs what is not finished of these stages and runs, in order, with `[k/total]` progress lines.
fn run_jobs(tpp: &[&TppJob], cells: &[&Cell], device: Device) -> Result<()> {
    let total = tpp.len() + cells.len();
    for (k, job) in tpp.iter().enumerate() {
        let (label, seed) = (job.record.peft.label(), job.record.config.seed);
        if job.dir.join("config.json").exists() {
            tracing::info!("[{}/{total}] TPP {label} seed {seed}: done before, kept", k + 1);
            continue;
        }
        tracing::info!("[{}/{total}] TPP {label} seed {seed}", k + 1);
        remove_unfinished(&job.dir)?;
        super::tpp::pretrain_targets(&job.record, &job.dir, device)?;
    }
    for (k, c) in cells.iter().enumerate() {
        let k = tpp.len() + k + 1;
        let name = match &c.candidate {
            Some(l) => format!("{} ({l}, test not read)", c.variant),
            None => c.variant.clone(),
        };
        if c.done() {
            tracing::info!("[{k}/{total}] {name} seed {}: done before, kept", c.seed);
            continue;
        }
        let resume = c.dir.join(RUN_JSON).exists();
        tracing::info!("[{k}/{total}] {name} seed {}{}", c.seed, if resume { " (resuming)" } else { "" });
        if c.candidate.is_some() {
            super::finetune::train_untested(&c.record, &c.dir, resume, device)?;
        } else {
            super::finetune::run(&c.record, &c.dir, resume, device)?;
        }
    }
    Ok(())
}

/// Makes these picks of the grid (their candidates trained): records each choice, then scores the chosen
/// run, and only it, on the test split.
fn run_picks(grid: &Grid, picks: &[usize], device: Device) -> Result<()> {
    for &p in picks {
        let pick = &grid.picks[p];
        let (record, i) = pick.choose(grid)?;
        if pick.finished(grid, &record, i) {
            continue;
        }
        // Another setting already tested would mean the test split was read for more than the pick.
        if let Some(o) = pick.other_tested(grid, i) {
            bail!(
                "{}: holds test results of an earlier pick, but validation now picks {} (the TPP lists changed?); \
                 the test split was read for that pick already, so run the new lists into another --out",
                o.display(),
                record.picked
            );
        }
        let c = &grid.cells[i];
        // Testing resumes the trained run; without its checkpoint it would train again, and the tested
        // model need not be the one validation picked.
        if !c.dir.join("checkpoint").exists() || !c.dir.join("best").exists() {
            bail!(
                "{}: the picked run's checkpoint/ or best/ is missing, so it cannot be tested as validated; \
                 remove the folder to train it again",
                c.dir.display()
            );
        }
        let vals: Vec<String> = record
            .validation
            .iter()
            .map(|(l, v)| format!("{l} {}", v.map_or("n/a".into(), |v| format!("{v:.4}"))))
            .collect();
        tracing::info!(
            "{} seed {}: picked {} on validation {} ({}); scoring it on the test split",
            pick.variant,
            pick.seed,
            record.picked,
            record.select,
            vals.join(", ")
        );
        crate::peft::io::write_text_atomic(&pick.file, &serde_json::to_string_pretty(&record)?)?;
        if !c.tested() {
            super::finetune::run(&c.record, &c.dir, true, device)?;
        }
    }
    Ok(())
}

/// Collects the results of a grid whose units have all finished (after `--cell` runs elsewhere).
pub fn collect(cfg: &CompareConfig, out: &Path) -> Result<CompareResults> {
    let grid = cfg.grid(out)?;
    let missing: Vec<String> =
        grid.units().iter().enumerate().filter(|(_, u)| !u.done).map(|(k, u)| format!("{k} ({})", u.label)).collect();
    if !missing.is_empty() {
        return Err(anyhow!("{}: cells not finished: {}", out.display(), missing.join(", ")));
    }
    CompareResults::collect(cfg, &grid)
}

/// Runs the whole grid of `cfg` into `out` (keeping finished cells) and collects the results.
pub fn run(cfg: &CompareConfig, out: &Path, device: Device) -> Result<CompareResults> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let grid = cfg.grid(out)?;
    let tpp: Vec<&TppJob> = grid.tpp.iter().collect();
    let cells: Vec<&Cell> = grid.cells.iter().collect();
    check_kept(&tpp, &cells)?;
    crate::peft::io::write_text_atomic(&out.join("compare.toml"), &toml::to_string_pretty(cfg)?)?;
    run_jobs(&tpp, &cells, device)?;
    run_picks(&grid, &(0..grid.picks.len()).collect::<Vec<_>>(), device)?;
    CompareResults::collect(cfg, &grid)
}

/// Clears a stage folder of the grid that holds no finished stage (an interrupted run of an earlier
/// version wrote into it directly); finished ones have their `config.json`.
pub(crate) fn remove_unfinished(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.join("config.json").exists() {
        tracing::info!("{}: an unfinished stage; starting it again", dir.display());
        std::fs::remove_dir_all(dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
    }
    Ok(())
}

/// A finished cell is reused only if it ran the configuration asked for now: re-running an edited config
/// into the same folder must not mix old and new numbers silently.
fn check_kept_run(want: &RunRecord, dir: &Path) -> Result<()> {
    let mut want = want.clone();
    // A run that started from a TPP stage is the grid's only if that stage's targets are still the ones
    // it used: a stage that is missing (to be recomputed) or recomputed gives other ones.
    if let Some(init) = &want.init_targets {
        let finished = init.join("config.json").exists();
        want.fingerprints.init_targets =
            Some(if finished { records::init_fingerprint(init)? } else { "(stage to be recomputed)".into() });
    }
    let old = RunRecord::read(dir)?.normalised_like(&want);
    adopt_filled_in((&mut want.config.image_size, &mut want.config.norm), (old.config.image_size, old.config.norm));
    check_same(&dir.join(RUN_JSON), &old, &want)
}

fn check_kept_tpp(want: &TppRecord, dir: &Path) -> Result<()> {
    let file = dir.join("config.json");
    let text = std::fs::read_to_string(&file).with_context(|| format!("{}: cannot read", file.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON ({e})", file.display()))?;
    let mut old =
        TppRecord::from_json(&v["record"]).map_err(|e| anyhow!("{}: no valid TPP record ({e})", file.display()))?;
    // Records of earlier versions: paths as given, no fingerprint.
    old.backbone.path = old.backbone.absolute_path();
    old.data.data = records::absolute(&old.data.data);
    old.data.labels = old.data.labels.as_deref().map(records::absolute);
    old.backbone_fingerprint = old.backbone_fingerprint.or_else(|| want.backbone_fingerprint.clone());
    // The DINO options do not change an MAE stage (records name them whatever the pretext).
    if want.pretext != Pretext::Dino && old.pretext == want.pretext {
        old.dino = want.dino.clone();
    }
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

/// Every differing setting of two records, `path: old -> new`.
pub(crate) fn changes<T: Serialize>(old: &T, want: &T) -> Result<Vec<String>> {
    let mut changes = Vec::new();
    diff_leaves("", &serde_json::to_value(old)?, &serde_json::to_value(want)?, &mut changes);
    Ok(changes)
}

/// Ok when the two records agree; otherwise one error naming `file` and every changed field.
fn check_same<T: Serialize>(file: &Path, old: &T, want: &T) -> Result<()> {
    let changes = changes(old, want)?;
    if changes.is_empty() {
        return Ok(());
    }
    Err(crate::Error::StaleRun { file: file.to_path_buf(), changes }.into())
}

/// `path: old -> new` for every differing leaf of two JSON values.
fn diff_leaves(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
                diff_leaves(&p, x.get(k).unwrap_or(&Value::Null), y.get(k).unwrap_or(&Value::Null), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} -> {b}")),
        _ => {}
    }
}

/// One finished cell's test results, as its run folder holds them.
#[derive(Debug, Clone)]
pub struct CellResult {
    /// Its seed.
    pub seed: u64,
    /// Test metrics by name.
    pub metrics: BTreeMap<String, f64>,
    /// Test predictions (per-image Dice for segmentation).
    pub probs: Vec<Vec<f64>>,
    /// Test truths.
    pub truth: Vec<Vec<f64>>,
    /// The run's cost (`metrics.json`'s `run`).
    pub run: Value,
    /// Validation curve of the selection metric: (epoch, value).
    pub curve: Vec<(f64, f64)>,
}

/// What a comparison produced: every variant's cells, in grid order.
pub struct CompareResults {
    /// The task.
    pub task: Task,
    /// The selection metric.
    pub select: Metric,
    /// The report's test metric.
    pub metric: Metric,
    /// Variants in grid order (`lora`, `lora+tpp`, ..., references).
    pub variants: Vec<String>,
    /// Each variant's cells, by seed order (a sweep's variant: each seed's picked candidate).
    pub cells: BTreeMap<String, Vec<CellResult>>,
    /// The TPP sweep's choices, per method set and seed (empty without a sweep).
    pub picks: Vec<PickResult>,
}

/// One seed's choice among a method's TPP sweep candidates, with the plain run's validation value.
#[derive(Debug, Clone)]
pub struct PickResult {
    /// The variant (`lora+tpp`).
    pub variant: String,
    /// The method set (`lora`).
    pub method: String,
    /// The seed.
    pub seed: u64,
    /// The plain run's best validation value.
    pub plain_val: Option<f64>,
    /// The choice and every candidate's best validation value.
    pub record: PickRecord,
}

impl CellResult {
    fn read(c: &Cell, select: Metric) -> Result<Self> {
        let p = c.dir.join("metrics.json");
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{}: {e}", p.display()))?;
        let metrics = v
            .as_object()
            .map(|o| o.iter().filter_map(|(k, x)| x.as_f64().map(|f| (k.clone(), f))).collect())
            .unwrap_or_default();
        let grid = |key: &str| -> Vec<Vec<f64>> {
            let rows = v["predictions"][key].as_array().cloned().unwrap_or_default();
            rows.iter()
                .map(|r| r.as_array().map(|a| a.iter().filter_map(Value::as_f64).collect()).unwrap_or_default())
                .collect()
        };
        let h: Value = std::fs::read_to_string(c.dir.join("history.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(Value::Null);
        let curve = h
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|r| Some((r["epoch"].as_f64()?, r["val"][select.name().as_str()].as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(CellResult {
            seed: c.seed,
            metrics,
            probs: grid("probs"),
            truth: grid("truth"),
            run: v["run"].clone(),
            curve,
        })
    }
}

impl CompareResults {
    /// Reads every cell of a finished grid.
    pub fn collect(cfg: &CompareConfig, grid: &Grid) -> Result<Self> {
        let mut variants: Vec<String> = Vec::new();
        let mut cells: BTreeMap<String, Vec<CellResult>> = BTreeMap::new();
        let mut picks = Vec::new();
        let mut picked: BTreeMap<(String, u64), String> = BTreeMap::new();
        for p in &grid.picks {
            let record = PickRecord::read(&p.file)?;
            let plain = CellResult::read(&grid.cells[p.plain], grid.select)?;
            picked.insert((p.variant.clone(), p.seed), record.picked.clone());
            let plain_val = plain.run["best_val"].as_f64();
            picks.push(PickResult {
                variant: p.variant.clone(),
                method: p.method.clone(),
                seed: p.seed,
                plain_val,
                record,
            });
        }
        for c in &grid.cells {
            // Of a sweep's candidates, the picked one stands for its seed; the others have no test results.
            if let Some(l) = &c.candidate
                && picked.get(&(c.variant.clone(), c.seed)) != Some(l)
            {
                continue;
            }
            if !variants.contains(&c.variant) {
                variants.push(c.variant.clone());
            }
            cells.entry(c.variant.clone()).or_default().push(CellResult::read(c, grid.select)?);
        }
        if variants.is_empty() {
            bail!("compare: no runs");
        }
        let metric = cfg.metric.unwrap_or(grid.select);
        Ok(CompareResults { task: grid.task, select: grid.select, metric, variants, cells, picks })
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
        let d = DinoConfig::default();
        assert_eq!((cfg.dino.out_dim, cfg.dino.local_crops), (256, 2));
        assert_eq!((cfg.dino.teacher_temp, cfg.dino.momentum), (d.teacher_temp, d.momentum));
        assert_eq!(parse("none", base).unwrap().dino, d);
        // A misspelt option is an error naming the file, not a silently ignored line.
        let err = parse("typo", &format!("{base}[dino]\nout_dims = 256\n")).unwrap_err().to_string();
        assert!(err.contains("tpp_compare_") && err.contains("typo.toml") && err.contains("out_dims"), "{err}");
    }

    #[test]
    fn every_shipped_config_reads() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut n = 0;
        for e in std::fs::read_dir(root.join("experiments")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                CompareConfig::read(&p).unwrap_or_else(|e| panic!("{e:#}"));
                n += 1;
            }
        }
        assert!(n >= 10, "{n} configs");
        // The GPU check's config, which only a device session would otherwise read.
        CompareConfig::read(&root.join("scripts/device_compare.toml")).unwrap_or_else(|e| panic!("{e:#}"));
    }

    #[test]
    fn a_sweep_is_one_unit_per_method_and_seed_with_its_stages_runs_and_pick() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let base = format!(
            "backbone = {:?}\ndata = {:?}\nseeds = [0, 1]\nreferences = [\"linear\"]\n",
            root.join("tests/fixtures/timm_vit_avg_fcnorm.safetensors"),
            root.join("data/breastmnist.npz")
        );
        let cfg = parse("sweep", &format!("{base}[tpp]\nepochs = [1, 3]\n")).unwrap();
        // A relative output folder: the runs' records hold absolute paths, the stages' folders do not.
        let grid = cfg.grid(Path::new("rel/out")).unwrap();
        assert_eq!((grid.tpp.len(), grid.cells.len(), grid.picks.len()), (4, 8, 2));
        let units = grid.units();
        let labels: Vec<&str> = units.iter().map(|u| u.label.as_str()).collect();
        assert_eq!(labels, ["lora seed 0", "lora seed 1", "linear seed 0", "linear seed 1"]);
        let u = &units[1];
        assert_eq!((u.tpp.len(), u.runs.len(), u.picks.len()), (2, 3, 1));
        let dirs: Vec<String> = u.runs.iter().map(|&i| grid.cells[i].dir.display().to_string()).collect();
        assert_eq!(
            dirs,
            ["rel/out/runs/lora/seed1", "rel/out/runs/lora+tpp/epochs-1/seed1", "rel/out/runs/lora+tpp/epochs-3/seed1"]
        );
        assert_eq!(grid.tpp[u.tpp[1]].dir, Path::new("rel/out/tpp/lora/epochs-3/seed1"));
        assert_eq!(grid.tpp[u.tpp[1]].record.config.epochs, 3);
        assert_eq!(grid.picks[u.picks[0]].file, Path::new("rel/out/runs/lora+tpp/pick-seed1.json"));
        // Without a sweep, the folders of earlier versions, and each unit still holds its +TPP run.
        let grid = parse("plain", &base).unwrap().grid(Path::new("rel/out")).unwrap();
        let units = grid.units();
        assert!(grid.picks.is_empty() && units.len() == 4);
        let dirs: Vec<String> = units[0].runs.iter().map(|&i| grid.cells[i].dir.display().to_string()).collect();
        assert_eq!(dirs, ["rel/out/runs/lora/seed0", "rel/out/runs/lora+tpp/seed0"]);
        assert_eq!(grid.tpp[units[0].tpp[0]].dir, Path::new("rel/out/tpp/lora/seed0"));
    }

    #[test]
    fn a_changed_record_is_a_stale_run_naming_every_change() {
        let old = serde_json::json!({"config": {"epochs": 1, "lr": 0.1}, "seed": 0});
        let want = serde_json::json!({"config": {"epochs": 2, "lr": 0.1}, "seed": 1});
        let err = check_same(Path::new("r/run.json"), &old, &want).unwrap_err();
        match crate::Error::kind_of(&err) {
            Some(crate::Error::StaleRun { changes, .. }) => {
                assert_eq!(changes, &["config.epochs: 1 -> 2", "seed: 0 -> 1"])
            }
            other => panic!("expected StaleRun, got {other:?}"),
        }
        assert!(check_same(Path::new("r/run.json"), &old, &old).is_ok());
    }

    #[test]
    fn unknown_top_level_keys_and_bad_names_are_errors() {
        let base = "backbone = \"b.safetensors\"\ndata = \"d.npz\"\n";
        let err = parse("top", &format!("{base}seed = [1]\n")).unwrap_err().to_string();
        assert!(err.contains("top.toml") && err.contains("unknown key `seed`"), "{err}");
        let err = parse("method", &format!("{base}methods = [\"lora+vtp\"]\n")).unwrap_err().to_string();
        assert!(err.contains("unknown PEFT method 'vtp'"), "{err}");
        let err = parse("ref", &format!("{base}references = [\"lineal\"]\n")).unwrap_err().to_string();
        assert!(err.contains("lineal"), "{err}");
        let cfg = parse("ok", &format!("{base}heads = 6\n[peft]\nlora_rank = 4\n")).unwrap();
        assert_eq!((cfg.backbone.heads, cfg.peft.get("lora_rank")), (Some(6), Some(&serde_json::json!(4))));
        // What compare writes as compare.toml reads back the same.
        let again = parse("again", &toml::to_string_pretty(&cfg).unwrap()).unwrap();
        assert_eq!(serde_json::to_value(&again).unwrap(), serde_json::to_value(&cfg).unwrap());
    }
}
