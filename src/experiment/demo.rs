//! The embedded demo, offline on 2 CPU cores: MAE pre-training of a small ViT on PneumoniaMNIST (source
//! domain), then LoRA vs LoRA + TPP (with a linear probe and full fine-tuning) on BreastMNIST (target
//! domain) over 3 seeds. Re-running continues where it stopped.
use super::compare::{CompareConfig, CompareResults, MethodSet, Reference};
use super::records::BackboneSource;
use super::sections::{FinetuneSection, TppSection};
use crate::backbone::{Pool, VitConfig};
use crate::data::transforms::{Augment, Norm, Normalization};
use crate::peft::Method;
use crate::pretext::Pretext;
use crate::pretext::mae::{DecoderSource, MaeConfig};
use crate::train::finetune::FinetuneConfig;
use crate::train::pretrain::PretrainConfig;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use tch::Device;

/// The folder holding `pneumoniamnist.npz` and `breastmnist.npz`: `given`, else `data/` here or in the
/// source tree.
pub fn data_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    let found = |d: &Path| d.join("breastmnist.npz").exists() && d.join("pneumoniamnist.npz").exists();
    if let Some(d) = given {
        if found(&d) {
            return Ok(d);
        }
        return Err(crate::error::bad_input!(
            "--data-dir {}: needs pneumoniamnist.npz and breastmnist.npz (the MedMNIST v2 files of those names)",
            d.display()
        ));
    }
    let candidates = [PathBuf::from("data"), Path::new(env!("CARGO_MANIFEST_DIR")).join("data")];
    match candidates.iter().find(|d| found(d)) {
        Some(d) => Ok(d.clone()),
        None => Err(crate::error::bad_input!(
            "{}: pneumoniamnist.npz and breastmnist.npz not found; run from the repository or pass --data-dir \
             <folder with both>",
            candidates[0].display()
        )),
    }
}

/// A small ViT for 28x28 grey images: patch 4 (7x7 grid), width 128, depth 4, 4 heads.
pub fn demo_arch() -> VitConfig {
    VitConfig {
        img_size: 28,
        patch_size: 4,
        in_chans: 1,
        embed_dim: 128,
        depth: 4,
        num_heads: 4,
        mlp_hidden: 512,
        pool: Pool::Cls,
        ..VitConfig::preset("vit_tiny_patch16_224").expect("preset exists")
    }
}

/// Runs the demo into `out` (`quick`: a one-minute smoke test of the same pipeline).
pub fn run(out: &Path, data: &Path, quick: bool, device: Device) -> Result<(CompareConfig, CompareResults)> {
    let (bb_epochs, tpp_epochs, ft_epochs) = if quick { (1, 2, 2) } else { (12, 30, 20) };
    let mae = MaeConfig { decoder_dim: 128, decoder_depth: 2, decoder_heads: 4, ..MaeConfig::default() };
    let bb_dir = out.join("backbone");
    let pcfg = PretrainConfig {
        epochs: bb_epochs,
        image_size: 28,
        norm: Norm::HALF,
        augment: Augment { hflip: true, crop_min_area: 0.8, ..Augment::NONE },
        mae: mae.clone(),
        ..PretrainConfig::default()
    };
    if bb_dir.join("config.json").exists() {
        // A quick demo's backbone (one epoch) must not pass for the full demo's, nor the reverse.
        check_kept_backbone(&bb_dir.join("config.json"), &pcfg)?;
        tracing::info!("step 1/2: backbone already pre-trained in {}", bb_dir.display());
    } else {
        tracing::info!(
            "step 1/2: MAE pre-training of a small ViT on PneumoniaMNIST (source domain), {bb_epochs} epochs"
        );
        super::compare::remove_unfinished(&bb_dir)?;
        let source = super::records::DataSource::new(data.join("pneumoniamnist.npz"));
        super::tpp::pretrain_backbone(&demo_arch(), &source, &pcfg, &bb_dir, device)?;
    }
    tracing::info!(
        "step 2/2: LoRA vs LoRA + TPP on BreastMNIST (target domain), 3 seeds, with linear-probe and full fine-tuning references"
    );
    // What the demo promises above stays spelt out here, whatever compare's defaults become.
    let backbone = BackboneSource::new(bb_dir.join("backbone.safetensors"));
    let cfg = CompareConfig {
        norm: Normalization::Half,
        methods: vec![MethodSet(vec![Method::LORA])],
        pretext: Pretext::Mae,
        seeds: vec![0, 1, 2],
        references: vec![Reference::Linear, Reference::Full],
        tpp: TppSection {
            config: PretrainConfig { epochs: tpp_epochs, ..PretrainConfig::default() },
            decoder: DecoderSource::Fresh,
        },
        finetune: FinetuneSection {
            config: FinetuneConfig { epochs: ft_epochs, ..FinetuneConfig::default() },
            ..FinetuneSection::default()
        },
        ..CompareConfig::new(backbone, data.join("breastmnist.npz"))
    };
    let results = super::compare::run(&cfg, &out.join("compare"), device)?;
    Ok((cfg, results))
}

/// An error ([`crate::Error::StaleRun`]) when the backbone kept in a demo folder was pre-trained with other
/// settings than `want` (a `--quick` demo's folder reused for the full demo).
fn check_kept_backbone(file: &Path, want: &PretrainConfig) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not valid JSON ({e})", file.display()))?;
    let changes = super::compare::changes(&v["config"], &serde_json::to_value(want)?)?;
    if changes.is_empty() {
        return Ok(());
    }
    Err(crate::Error::StaleRun { file: file.to_path_buf(), changes }.into())
}
