//! `tpp demo`: the embedded default, offline on 2 CPU cores. MAE-pre-trains a small ViT on PneumoniaMNIST
//! (source domain), then compares LoRA with LoRA + TPP (and a linear probe and full fine-tuning) on
//! BreastMNIST (target domain) over 3 seeds and prints the report. Re-running continues where it stopped.
use super::compare::{CompareConfig, FinetuneSection, TppSection, run_config};
use super::pretrain::{Pretext, execute_backbone};
use crate::backbone::{Pool, VitConfig};
use crate::data::transforms::{Augment, Norm};
use crate::pretext::mae::MaeConfig;
use crate::train::pretrain::PretrainConfig;
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};
use tch::Device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder
    #[arg(long, default_value = "runs/demo")]
    pub out: PathBuf,
    /// Folder holding pneumoniamnist.npz and breastmnist.npz (default: the repository's data/)
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// A much shorter run (a smoke test of the whole pipeline, about a minute)
    #[arg(long)]
    pub quick: bool,
}

fn data_dir(given: Option<PathBuf>) -> Result<PathBuf> {
    let candidates = match given {
        Some(d) => vec![d],
        None => vec![PathBuf::from("data"), Path::new(env!("CARGO_MANIFEST_DIR")).join("data")],
    };
    for d in &candidates {
        if d.join("breastmnist.npz").exists() && d.join("pneumoniamnist.npz").exists() {
            return Ok(d.clone());
        }
    }
    bail!(
        "{}: pneumoniamnist.npz and breastmnist.npz not found (run from the repository, or pass --data-dir)",
        candidates[0].display()
    )
}

pub fn run(a: Args, device: Device) -> Result<()> {
    let data = data_dir(a.data_dir)?;
    let (bb_epochs, tpp_epochs, ft_epochs) = if a.quick { (1, 2, 2) } else { (12, 30, 20) };
    // A small ViT for 28x28 grey images: patch 4 (7x7 grid), width 128, depth 4, 4 heads.
    let arch = VitConfig {
        img_size: 28,
        patch_size: 4,
        in_chans: 1,
        embed_dim: 128,
        depth: 4,
        num_heads: 4,
        mlp_hidden: 512,
        pool: Pool::Cls,
        ..VitConfig::preset("vit_tiny_patch16_224").expect("preset exists")
    };
    let mae = MaeConfig {
        mask_ratio: 0.75,
        decoder_dim: 128,
        decoder_depth: 2,
        decoder_heads: 4,
        decoder_mlp_ratio: 4.0,
        norm_pix: true,
    };
    let bb_dir = a.out.join("backbone");
    let bb_path = bb_dir.join("backbone.safetensors");
    if bb_dir.join("config.json").exists() {
        eprintln!("step 1/2: backbone already pre-trained in {}", bb_dir.display());
    } else {
        eprintln!("step 1/2: MAE pre-training of a small ViT on PneumoniaMNIST (source domain), {bb_epochs} epochs");
        let pcfg = PretrainConfig {
            epochs: bb_epochs,
            batch_size: 256,
            lr: 1.5e-3,
            min_lr: 0.0,
            warmup: 0.05,
            weight_decay: 0.05,
            clip: 1.0,
            seed: 0,
            image_size: 28,
            norm: Norm::HALF,
            augment: Augment { hflip: true, crop_min_area: 0.8, ..Augment::NONE },
            mae: mae.clone(),
            preview_every: 0,
        };
        execute_backbone(&arch, &data.join("pneumoniamnist.npz"), None, &pcfg, &bb_dir, device)?;
    }
    eprintln!(
        "step 2/2: LoRA vs LoRA + TPP on BreastMNIST (target domain), 3 seeds, with linear-probe and full fine-tuning references"
    );
    // What the demo promises above stays spelt out here, whatever compare's defaults become.
    let cfg = CompareConfig {
        norm: "half".into(),
        methods: vec!["lora".into()],
        pretext: Pretext::Mae,
        seeds: vec![0, 1, 2],
        references: vec!["linear".into(), "full".into()],
        tpp: TppSection { epochs: tpp_epochs, decoder: "fresh".into(), ..TppSection::default() },
        finetune: FinetuneSection { epochs: ft_epochs, ..FinetuneSection::default() },
        ..CompareConfig::new(bb_path, data.join("breastmnist.npz"))
    };
    run_config(&cfg, &a.out.join("compare"), device)
}
