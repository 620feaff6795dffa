//! What a stage needs to run, recorded in its output folder so that `evaluate`, `predict`, `export`,
//! `--resume` and `compare`'s kept cells need only the folder: [`RunRecord`] (`run.json` of a
//! fine-tuning run) and [`TppRecord`] (in a TPP stage's `config.json`), both naming their backbone as a
//! [`BackboneSource`].
use crate::backbone::{Backbone, Checkpoint, LoadOptions, Pool};
use crate::data::{Dataset, SplitRecord, Task};
use crate::model::PeftModel;
use crate::peft::PeftSpec;
use crate::pretext::Pretext;
use crate::pretext::dino::DinoConfig;
use crate::pretext::mae::DecoderSource;
use crate::train::callbacks::Checkpointable;
use crate::train::finetune::FinetuneConfig;
use crate::train::pretrain::PretrainConfig;
use anyhow::{Context, Result, anyhow};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Device;

pub use crate::data::absolute;

/// A JSON file read as `T`; errors name the file and what it should have held (`what`).
pub fn read_json<T: serde::de::DeserializeOwned>(file: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not {what}", file.display()))
}

/// A cheap fingerprint of a file or folder, to tell whether a run's inputs are still the ones it used.
/// A file: its size and its first and last 64 KiB. A folder: the relative path and size of every image
/// file in it and its sub-folders (sorted; hidden entries skipped), since reading 10^5 images would take
/// minutes. Detects another, added, removed, truncated or re-encoded file; an edit that keeps a folder
/// file's size, or a large file's size and ends, may pass.
pub fn fingerprint(path: &Path) -> Result<String> {
    // A missing or unreadable input is the user's to fix.
    crate::error::input(fingerprint_of(path))
}

fn fingerprint_of(path: &Path) -> Result<String> {
    use md5::{Digest, Md5};
    use std::io::{Read, Seek, SeekFrom};
    let mut h = Md5::new();
    let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if meta.is_file() {
        const END: u64 = 64 << 10;
        let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
        h.update(meta.len().to_le_bytes());
        let mut buf = Vec::new();
        f.by_ref().take(END).read_to_end(&mut buf)?;
        f.seek(SeekFrom::Start(meta.len().saturating_sub(END)))?;
        f.read_to_end(&mut buf)?;
        h.update(&buf);
    } else {
        // A data folder's images: at most two levels down (class folders, images/ and masks/), hidden
        // entries skipped, so notes, caches or run folders kept beside the data change nothing.
        let mut files = Vec::new();
        let mut stack = vec![(path.to_path_buf(), 0)];
        while let Some((dir, depth)) = stack.pop() {
            for e in std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))? {
                let e = e?;
                let p = e.path();
                if crate::data::images::is_hidden(&p) {
                    continue;
                }
                if e.file_type()?.is_dir() {
                    if depth < 1 {
                        stack.push((p, depth + 1));
                    }
                } else if crate::data::images::is_image(&p) {
                    files
                        .push((p.strip_prefix(path).unwrap_or(&p).to_string_lossy().into_owned(), e.metadata()?.len()));
                }
            }
        }
        files.sort();
        for (name, len) in files {
            h.update(name.as_bytes());
            h.update(len.to_le_bytes());
        }
    }
    Ok(crate::data::fetch::hex(&h.finalize()))
}

/// Fingerprints of a run's backbone and data ([`fingerprint`]), recorded so that a later use of the run
/// (evaluate, predict, resume, fine-tuning from a TPP stage) notices a changed input.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Fingerprints {
    /// Of the backbone checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone: Option<String>,
    /// Of the data (and a NIfTI label volume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Of the target parameters the run started from (a TPP stage recomputed since gives other ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_targets: Option<String>,
}

impl Fingerprints {
    /// Whether none is recorded (records written before fingerprints were).
    pub fn is_empty(&self) -> bool {
        self.backbone.is_none() && self.data.is_none() && self.init_targets.is_none()
    }

    /// Each one this record lacks (written by an earlier version) taken from `now` (it cannot tell).
    fn filled_from(self, now: &Fingerprints) -> Fingerprints {
        Fingerprints {
            backbone: self.backbone.or_else(|| now.backbone.clone()),
            data: self.data.or_else(|| now.data.clone()),
            init_targets: self.init_targets.or_else(|| now.init_targets.clone()),
        }
    }
}

/// An error when `what` at `path` no longer has the fingerprint a run recorded.
fn check_fingerprint(path: &Path, recorded: Option<&String>, what: &str) -> Result<()> {
    let Some(recorded) = recorded else { return Ok(()) };
    if fingerprint(path)? != *recorded {
        return Err(crate::error::bad_input!(
            "{}: the {what} changed since the run used it (its fingerprint differs); results would not be the run's",
            path.display()
        ));
    }
    Ok(())
}

/// A backbone checkpoint and how to read it: the file, and what its shapes cannot tell or the user
/// wants otherwise. Flattened into records and configs as the keys `backbone`, `heads`, `img_size`,
/// `pool`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneSource {
    /// The checkpoint file (.safetensors: timm, MAE, HF ViTMAE or HF Dinov2 layout); for a hub id, the
    /// cached snapshot's file once [`BackboneSource::resolve_hub`] has run.
    #[serde(rename = "backbone")]
    pub path: PathBuf,
    /// Attention heads, when neither shapes nor a config.json beside the file tell.
    #[serde(default)]
    pub heads: Option<i64>,
    /// Input image size (position embeddings are resampled).
    #[serde(default)]
    pub img_size: Option<i64>,
    /// Pooling (default: as the checkpoint implies).
    #[serde(default)]
    pub pool: Option<Pool>,
    /// A backbone named by Hugging Face hub id: the repo, the revision asked for and the commit it
    /// resolved to (`path` is then the cached snapshot's `model.safetensors`; see [`crate::hub`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<crate::hub::HubSource>,
}

impl BackboneSource {
    /// A checkpoint file read with its own geometry.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BackboneSource { path: path.into(), heads: None, img_size: None, pool: None, hub: None }
    }

    /// When `path` is a Hugging Face hub id (`hf-hub:ORG/NAME[@REV]`, or `ORG/NAME[@REV]` naming no local
    /// path), resolves it through the hub cache (downloading what it lacks unless offline; `var` looks up
    /// the environment): `path` becomes the snapshot's `model.safetensors` and `hub` records the commit.
    /// `tpp:NAME` becomes the model of that name in tpp's models folder (the demo's backbone). Anything
    /// else is left as it is.
    pub fn resolve_hub(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<()> {
        if self.hub.is_some() {
            return Ok(());
        }
        if let Some(file) = self.path.to_str().and_then(super::demo::named_model) {
            self.path = file?;
            return Ok(());
        }
        let Some(id) = self.path.to_str().and_then(crate::hub::parse) else { return Ok(()) };
        let r = crate::hub::resolve(&id?, var)?;
        self.hub = Some(r.source());
        self.path = r.weights;
        Ok(())
    }

    /// The checkpoint's absolute path, as records keep it: canonical, except that a hub snapshot's file
    /// keeps its path (a symlink into `blobs/`), so that the `config.json` beside it is still found.
    pub fn absolute_path(&self) -> PathBuf {
        match &self.hub {
            Some(_) => std::path::absolute(&self.path).unwrap_or_else(|_| self.path.clone()),
            None => absolute(&self.path),
        }
    }

    /// Rejects options no load could use.
    pub fn validate(&self) -> Result<()> {
        if let Some(h) = self.heads {
            crate::check::int("heads", h, 1, 1 << 12)?;
        }
        if let Some(s) = self.img_size {
            crate::check::int("img_size", s, 1, crate::backbone::MAX_IMG_SIZE)?;
        }
        Ok(())
    }

    /// The loader's options.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions { num_heads: self.heads, img_size: self.img_size, pool: self.pool }
    }

    /// The backbone on `device`, with the checkpoint it came from.
    pub fn load(&self, device: Device) -> Result<(Backbone, Checkpoint)> {
        Backbone::load(&self.path, &self.load_options(), device)
    }

    /// The backbone with fresh target parameters of `spec` (their usual init, from `seed`).
    pub fn model(&self, spec: &PeftSpec, device: Device, seed: u64) -> Result<(PeftModel, Checkpoint)> {
        PeftModel::build(&self.path, &self.load_options(), spec, device, seed)
    }
}

/// How a data set is read: the path and format, and the options of file-based formats.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    /// The data set (see `crate::data::infer_format`).
    pub data: PathBuf,
    /// Its format, when the path does not tell.
    pub format: Option<String>,
    /// Skip unreadable files instead of stopping.
    #[serde(default)]
    pub skip_bad: bool,
    /// Segmentation masks: classes (2: binarised).
    #[serde(default = "two")]
    pub mask_classes: i64,
    /// NIfTI: the label volume.
    #[serde(default)]
    pub labels: Option<PathBuf>,
}

fn two() -> i64 {
    2
}

impl DataSource {
    /// The fingerprint of the data (with the label volume, if any).
    pub fn fingerprint(&self) -> Result<String> {
        let mut f = fingerprint(&self.data)?;
        if let Some(l) = &self.labels {
            f.push('+');
            f.push_str(&fingerprint(l)?);
        }
        Ok(f)
    }

    /// A data set at `path` with default options.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        DataSource { data: path.into(), format: None, skip_bad: false, mask_classes: 2, labels: None }
    }

    /// Rejects options no data set could use.
    pub fn validate(&self) -> Result<()> {
        crate::check::int("mask_classes", self.mask_classes, 2, 256)
    }

    /// Reading options for a model's input (size and channels of file-based formats).
    pub fn options(&self, model: &crate::backbone::VitConfig) -> crate::data::DataOptions {
        self.options_at(model.img_size, model.in_chans == 1, crate::data::cache::dir())
    }

    /// Reading options at `image_size` px, grey or RGB, through the decoded-data cache in `cache`.
    pub fn options_at(&self, image_size: i64, grey: bool, cache: Option<PathBuf>) -> crate::data::DataOptions {
        crate::data::DataOptions {
            format: self.format.clone(),
            image_size: Some(image_size),
            grey,
            skip_bad: self.skip_bad,
            mask_classes: self.mask_classes,
            labels: self.labels.clone(),
            cache,
        }
    }

    /// The task and number of classes, without decoding file-based formats.
    pub fn describe(&self) -> Result<(Task, i64)> {
        crate::data::describe(&self.data, &self.options_at(16, true, None))
    }

    /// Opens image/mask folders at native resolution (their own size, or `size` x `size`) with `model`'s
    /// channels, for crops and sliding windows.
    pub fn open_native(&self, model: &crate::backbone::VitConfig, size: i64) -> Result<(Dataset, Option<SplitRecord>)> {
        let fmt = match &self.format {
            Some(f) => f.clone(),
            None => crate::data::infer_format(&self.data)?.to_string(),
        };
        if fmt != "segpairs" {
            return Err(crate::error::bad_input!(
                "{}: native-resolution crops (--seg-native, native_crops) read image/mask folders (images/ + masks/), not {fmt}",
                self.data.display()
            ));
        }
        crate::data::open_with(&self.data, &self.options_at(size, model.in_chans == 1, crate::data::cache::dir()))
    }

    /// Opens the data for `model` (at its input size and channels).
    pub fn open(&self, model: &crate::backbone::VitConfig) -> Result<(Dataset, Option<SplitRecord>)> {
        crate::data::open_with(&self.data, &self.options(model))
    }
}

/// A fine-tuning run: everything needed to rebuild its model and data (`run.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The backbone.
    #[serde(flatten)]
    pub backbone: BackboneSource,
    /// The PEFT method(s) and options.
    pub peft: PeftSpec,
    /// A TPP output whose target parameters start the run (None: their usual init).
    pub init_targets: Option<PathBuf>,
    /// The data.
    #[serde(flatten)]
    pub data: DataSource,
    /// Fraction of the training labels used (stratified, seeded).
    pub train_fraction: f64,
    /// The task.
    pub task: Task,
    /// Classes (or labels, or mask classes).
    pub num_classes: i64,
    /// Hyperparameters.
    pub config: FinetuneConfig,
    /// What the backbone and data were when the run started.
    #[serde(default, skip_serializing_if = "Fingerprints::is_empty")]
    pub fingerprints: Fingerprints,
}

/// File name of a run's record.
pub const RUN_JSON: &str = "run.json";

impl RunRecord {
    /// Rejects a run no training could do, naming the option (before anything is written).
    pub fn validate(&self) -> Result<()> {
        self.backbone.validate()?;
        self.data.validate()?;
        self.peft.validate()?;
        crate::check::float("train_fraction", self.train_fraction, crate::check::UNIT_OPEN_LOW)?;
        crate::check::int("num_classes", self.num_classes, 1, 1 << 16)?;
        let select = self.config.select;
        select
            .check_for(self.task, self.num_classes)
            .map_err(|e| crate::error::bad_input!("select (--select): {e}"))?;
        self.config.validate()
    }

    /// The record with every path absolute (against the current folder).
    pub(crate) fn absolute_paths(mut self) -> Self {
        self.backbone.path = self.backbone.absolute_path();
        self.data.data = absolute(&self.data.data);
        self.data.labels = self.data.labels.as_deref().map(absolute);
        self.init_targets = self.init_targets.as_deref().map(absolute);
        self
    }

    /// The record with absolute paths and the inputs' fingerprints: what `run.json` keeps.
    pub fn resolved(&self) -> Result<Self> {
        let mut r = self.clone().absolute_paths();
        r.fingerprints = Fingerprints {
            backbone: Some(fingerprint(&r.backbone.path)?),
            data: Some(r.data.fingerprint()?),
            init_targets: r.init_targets.as_deref().map(init_fingerprint).transpose()?,
        };
        Ok(r)
    }

    /// A record as this version writes it, for comparing an earlier version's with `now`: absolute paths
    /// (against the current folder) and, for each fingerprint it lacks, `now`'s (it cannot tell otherwise).
    pub fn normalised_like(&self, now: &RunRecord) -> RunRecord {
        let mut r = self.clone().absolute_paths();
        r.fingerprints = r.fingerprints.filled_from(&now.fingerprints);
        r
    }

    /// Reads `<run>/run.json`.
    pub fn read(run: &Path) -> Result<Self> {
        // Every failure here is a problem with the input named.
        crate::error::input((|| -> Result<Self> {
            let p = run.join(RUN_JSON);
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("{}: cannot read (not a tpp run folder?)", p.display()))?;
            let rec: RunRecord =
                serde_json::from_str(&text).map_err(|e| anyhow!("{}: not a valid run record ({e})", p.display()))?;
            rec.validate().map_err(|e| anyhow!("{}: {e:#}", p.display()))?;
            Ok(rec)
        })())
    }

    /// Writes `<run>/run.json` atomically.
    pub fn write(&self, run: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::peft::io::write_text_atomic(&run.join(RUN_JSON), &text)
    }

    /// The model with fresh targets and head (weights to be loaded by the caller).
    pub fn build_model(&self, device: Device) -> Result<PeftModel> {
        let (mut m, _) = self.backbone.model(&self.peft, device, self.config.seed)?;
        m.add_task_head(self.task, self.num_classes, self.config.seg.head);
        Ok(m)
    }

    /// Reads the run's dataset (or `data` instead) the way the model needs it; the run's own data must be
    /// what it was when the run started.
    pub fn open_data(&self, model: &PeftModel, data: Option<&DataSource>) -> Result<(Dataset, Option<SplitRecord>)> {
        let src = data.unwrap_or(&self.data);
        match data {
            Some(_) => {}
            None if self.fingerprints.data.as_ref().is_some_and(|f| Some(f) != src.fingerprint().ok().as_ref()) => {
                return Err(crate::error::bad_input!(
                    "{}: the data changed since the run used it (its fingerprint differs); results would not be the run's",
                    src.data.display()
                ));
            }
            None => {}
        }
        let seg = &self.config.seg;
        if self.task != Task::Segmentation || !seg.native {
            return src.open(model.bb.vit.config());
        }
        src.open_native(model.bb.vit.config(), seg.data_size)
    }

    /// The model with the run's final (best-on-validation) weights from `<run>/adapter`, on the backbone
    /// the run was trained on.
    pub fn load_trained(&self, run: &Path, device: Device) -> Result<PeftModel> {
        check_fingerprint(&self.backbone.path, self.fingerprints.backbone.as_ref(), "backbone")?;
        let m = self.build_model(device)?;
        let dir = run.join("adapter");
        if !dir.exists() {
            return Err(crate::error::bad_input!(
                "{}: no adapter/ folder (the run has not finished; continue it with `tpp finetune ... --resume`)",
                run.display()
            ));
        }
        m.load(&dir)?;
        Ok(m)
    }
}

/// A TPP stage: everything it needs (written as `record` in its `config.json`, with its results).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TppRecord {
    /// The backbone.
    #[serde(flatten)]
    pub backbone: BackboneSource,
    /// The PEFT method(s) whose target parameters are pre-trained.
    pub peft: PeftSpec,
    /// The data (labels unused).
    #[serde(flatten)]
    pub data: DataSource,
    /// The pretext task.
    pub pretext: Pretext,
    /// Hyperparameters.
    pub config: PretrainConfig,
    /// Where the MAE decoder comes from.
    pub decoder: DecoderSource,
    /// Keep a loaded decoder frozen.
    pub freeze_decoder: bool,
    /// The DINO pretext's options.
    #[serde(default)]
    pub dino: DinoConfig,
    /// The backbone's fingerprint when the stage ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backbone_fingerprint: Option<String>,
}

impl TppRecord {
    /// The record with absolute paths and the backbone's fingerprint: what `config.json` keeps.
    pub fn resolved(&self) -> Result<Self> {
        let mut r = self.clone();
        r.backbone.path = r.backbone.absolute_path();
        r.data.data = absolute(&r.data.data);
        r.data.labels = r.data.labels.as_deref().map(absolute);
        r.backbone_fingerprint = Some(fingerprint(&r.backbone.path)?);
        Ok(r)
    }

    /// The record a TPP output folder (or its `targets/`) holds, if it has one.
    pub fn of_output(dir: &Path) -> Result<Option<Self>> {
        let dir = if dir.ends_with("targets") { dir.parent().unwrap_or(dir) } else { dir };
        let file = dir.join("config.json");
        if !file.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&file).with_context(|| format!("{}: cannot read", file.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: not valid JSON ({e})", file.display()))?;
        let rec =
            Self::from_json(&v["record"]).map_err(|e| anyhow!("{}: no valid TPP record ({e})", file.display()))?;
        Ok(Some(rec))
    }

    /// A record from its JSON. Options added since a record was written take the values the stage was
    /// made with (DINO's running centre, ...), not today's defaults.
    pub fn from_json(v: &serde_json::Value) -> serde_json::Result<Self> {
        let mut v = v.clone();
        if let Some(d) = v.get_mut("dino").and_then(|d| d.as_object_mut()) {
            for (k, val) in DinoConfig::legacy_fields() {
                d.entry(k).or_insert(val);
            }
        }
        serde_json::from_value(v)
    }

    /// Rejects a stage no training could do, naming the option (before anything is written).
    pub fn validate(&self) -> Result<()> {
        self.backbone.validate()?;
        self.data.validate()?;
        self.peft.validate()?;
        if !self.peft.adds_parameters() {
            let m = self.peft.label();
            return Err(crate::error::bad_input!(
                "--peft {m}: the TPP stage pre-trains PEFT target parameters; '{m}' has none"
            ));
        }
        self.config.validate()?;
        self.dino.validate()
    }
}

/// The fingerprint of the target parameters in a TPP output (or its `targets/`).
pub fn init_fingerprint(p: &Path) -> Result<String> {
    fingerprint(&targets_dir(p)?.join(crate::peft::io::WEIGHTS))
}

/// The folder of target parameters inside a TPP output (`<dir>/targets`) or the folder itself.
pub fn targets_dir(p: &Path) -> Result<PathBuf> {
    for c in [p.join("targets"), p.to_path_buf()] {
        if c.join(crate::peft::io::WEIGHTS).exists() {
            return Ok(c);
        }
    }
    Err(crate::error::bad_input!(
        "{}: no target parameters here (expected a `tpp pretrain-targets` output folder or its targets/)",
        p.display()
    ))
}
