//! The run folder of a fine-tuning run: `run.json` records everything needed to rebuild the model, so
//! `evaluate`, `predict`, `export` and `--resume` need only the folder.
use crate::backbone::{LoadOptions, Pool};
use crate::data::Task;
use crate::model::PeftModel;
use crate::peft::PeftSpec;
use crate::train::finetune::{FinetuneConfig, load_model};
use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub backbone: PathBuf,
    pub heads: Option<i64>,
    pub img_size: Option<i64>,
    pub pool: Option<Pool>,
    pub peft: PeftSpec,
    pub init_targets: Option<PathBuf>,
    pub data: PathBuf,
    pub format: Option<String>,
    pub train_fraction: f64,
    #[serde(default)]
    pub skip_bad: bool,
    /// Segmentation masks: classes (2: binarised).
    #[serde(default = "two")]
    pub mask_classes: i64,
    /// NIfTI: the label volume.
    #[serde(default)]
    pub labels: Option<PathBuf>,
    pub task: Task,
    pub num_classes: i64,
    pub config: FinetuneConfig,
}

pub const RUN_JSON: &str = "run.json";

fn two() -> i64 {
    2
}

impl RunRecord {
    pub fn read(run: &Path) -> Result<Self> {
        let p = run.join(RUN_JSON);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("{}: cannot read (not a tpp run folder?)", p.display()))?;
        serde_json::from_str(&text).map_err(|e| anyhow!("{}: not a valid run record ({e})", p.display()))
    }

    pub fn write(&self, run: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        let p = run.join(RUN_JSON);
        crate::peft::io::write_text_atomic(&p, &text)
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions { num_heads: self.heads, img_size: self.img_size, pool: self.pool }
    }

    /// The model with fresh targets and head (weights to be loaded by the caller).
    pub fn build_model(&self, device: Device) -> Result<PeftModel> {
        let (mut m, _) = PeftModel::build(&self.backbone, &self.load_options(), &self.peft, device, self.config.seed)?;
        if self.task == Task::Segmentation {
            m.add_seg_head(self.num_classes);
        } else {
            m.add_head(self.num_classes);
        }
        Ok(m)
    }

    /// Reads the run's dataset the way the model needs it (size and channels for file-based formats).
    pub fn open_data(
        &self,
        model: &PeftModel,
        data: Option<&Path>,
    ) -> Result<(crate::data::Dataset, Option<crate::data::SplitRecord>)> {
        let o = crate::data::DataOptions {
            format: self.format.clone(),
            image_size: Some(model.bb.vit.cfg.img_size),
            grey: model.bb.vit.cfg.in_chans == 1,
            skip_bad: self.skip_bad,
            mask_classes: self.mask_classes,
            labels: self.labels.clone(),
        };
        crate::data::open_with(data.unwrap_or(&self.data), &o)
    }

    /// The model with the run's final (best-on-validation) weights from `<run>/adapter`.
    pub fn load_trained(&self, run: &Path, device: Device) -> Result<PeftModel> {
        let m = self.build_model(device)?;
        let dir = run.join("adapter");
        if !dir.exists() {
            bail!("{}: no adapter/ folder (the run has not finished; --resume it)", run.display());
        }
        load_model(&m, &dir)?;
        Ok(m)
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
