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
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Device;

/// A backbone checkpoint and how to read it: the file, and what its shapes cannot tell or the user
/// wants otherwise. Flattened into records and configs as the keys `backbone`, `heads`, `img_size`,
/// `pool`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackboneSource {
    /// The checkpoint file (.safetensors: timm, MAE, HF ViTMAE or HF Dinov2 layout).
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
}

impl BackboneSource {
    /// A checkpoint file read with its own geometry.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BackboneSource { path: path.into(), heads: None, img_size: None, pool: None }
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
        crate::data::DataOptions {
            format: self.format.clone(),
            image_size: Some(model.img_size),
            grey: model.in_chans == 1,
            skip_bad: self.skip_bad,
            mask_classes: self.mask_classes,
            labels: self.labels.clone(),
        }
    }

    /// The task and number of classes, without decoding file-based formats.
    pub fn describe(&self) -> Result<(Task, i64)> {
        let probe = crate::data::DataOptions {
            format: self.format.clone(),
            image_size: Some(16),
            grey: true,
            skip_bad: self.skip_bad,
            mask_classes: self.mask_classes,
            labels: self.labels.clone(),
        };
        crate::data::describe(&self.data, &probe)
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
        self.config.validate()
    }

    /// Reads `<run>/run.json`.
    pub fn read(run: &Path) -> Result<Self> {
        // Every failure here is a problem with the input named.
        crate::error::input((|| -> Result<Self> {
            let p = run.join(RUN_JSON);
            let text = std::fs::read_to_string(&p)
                .with_context(|| format!("{}: cannot read (not a tpp run folder?)", p.display()))?;
            serde_json::from_str(&text).map_err(|e| anyhow!("{}: not a valid run record ({e})", p.display()))
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
        m.add_task_head(self.task, self.num_classes);
        Ok(m)
    }

    /// Reads the run's dataset (or `data` instead) the way the model needs it.
    pub fn open_data(&self, model: &PeftModel, data: Option<&Path>) -> Result<(Dataset, Option<SplitRecord>)> {
        let mut src = self.data.clone();
        if let Some(d) = data {
            src.data = d.to_path_buf();
        }
        src.open(model.bb.vit.config())
    }

    /// The model with the run's final (best-on-validation) weights from `<run>/adapter`.
    pub fn load_trained(&self, run: &Path, device: Device) -> Result<PeftModel> {
        let m = self.build_model(device)?;
        let dir = run.join("adapter");
        if !dir.exists() {
            bail!("{}: no adapter/ folder (the run has not finished; --resume it)", run.display());
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
    pub data: PathBuf,
    /// Its format, when the path does not tell.
    pub format: Option<String>,
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
}

impl TppRecord {
    /// Rejects a stage no training could do, naming the option (before anything is written).
    pub fn validate(&self) -> Result<()> {
        self.backbone.validate()?;
        self.peft.validate()?;
        self.config.validate()?;
        self.dino.validate()
    }
}

/// The folder of target parameters inside a TPP output (`<dir>/targets`) or the folder itself.
pub fn targets_dir(p: &Path) -> Result<PathBuf> {
    for c in [p.join("targets"), p.to_path_buf()] {
        if c.join(crate::peft::io::WEIGHTS).exists() {
            return Ok(c);
        }
    }
    bail!(
        "{}: no target parameters here (expected a `tpp pretrain-targets` output folder or its targets/)",
        p.display()
    )
}
