//! TPP then LoRA fine-tuning through the library: MAE-pre-train a small ViT on PneumoniaMNIST, pre-train
//! LoRA's target parameters with MAE on BreastMNIST (labels unused, backbone frozen), fine-tune LoRA from
//! them and score the test split once. The data ships in `data/`.
//!
//! `cargo run --release --example tpp_then_lora [out-folder] [--quick]`
use std::path::{Path, PathBuf};
use tpp::data::transforms::Norm;
use tpp::experiment::{demo, finetune, tpp as stages};
use tpp::pretext::mae::DecoderSource;
use tpp::{
    BackboneSource, DataSource, FinetuneConfig, Method, PeftSpec, Pretext, PretrainConfig, RunRecord, TppRecord,
};

/// Runs the three stages into `out`; `quick`: one epoch each. Returns the test AUC.
pub fn run(out: &Path, quick: bool) -> tpp::Result<f64> {
    let (device, data) = (tch::Device::Cpu, Path::new(env!("CARGO_MANIFEST_DIR")).join("data"));
    let epochs = |n: i64| if quick { 1 } else { n };
    let half = |c: PretrainConfig| PretrainConfig { norm: Norm::HALF, ..c };
    // 1. A small ViT (patch 4, width 128, depth 4) pre-trained with MAE on the source domain.
    let arch = demo::demo_arch();
    let pcfg = half(PretrainConfig { epochs: epochs(12), image_size: 28, ..PretrainConfig::default() });
    let source = DataSource::new(data.join("pneumoniamnist.npz"));
    stages::pretrain_backbone(&arch, &source, &pcfg, &out.join("backbone"), device)?;
    let backbone = BackboneSource::new(out.join("backbone/backbone.safetensors"));
    // 2. TPP: LoRA's factors pre-trained with MAE on the target domain's training images.
    let lora = PeftSpec::with_methods(&[Method::LORA]);
    let tpp = TppRecord {
        backbone: backbone.clone(),
        peft: lora.clone(),
        data: DataSource::new(data.join("breastmnist.npz")),
        pretext: Pretext::Mae,
        config: half(PretrainConfig { epochs: epochs(30), ..PretrainConfig::default() }),
        decoder: DecoderSource::Fresh,
        freeze_decoder: false,
        dino: Default::default(),
        backbone_fingerprint: None,
    };
    stages::pretrain_targets(&tpp, &out.join("tpp"), device)?;
    // 3. LoRA fine-tuning starting from the TPP values; the best validation epoch meets the test split.
    let ds = DataSource::new(data.join("breastmnist.npz"));
    let (task, num_classes) = ds.describe()?;
    let config = FinetuneConfig { epochs: epochs(20), norm: Norm::HALF, ..FinetuneConfig::default() };
    let rec = RunRecord {
        backbone,
        peft: lora,
        init_targets: Some(out.join("tpp")),
        data: ds,
        train_fraction: 1.0,
        task,
        num_classes,
        config,
        fingerprints: Default::default(),
    };
    let done = finetune::run(&rec, &out.join("lora_tpp"), false, device)?;
    Ok(done.evaluation.metrics["auc"])
}

fn main() -> tpp::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args.iter().find(|a| !a.starts_with("--")).map_or_else(|| PathBuf::from("runs/example"), PathBuf::from);
    println!("LoRA + TPP: test AUC {:.3} (run folders in {})", run(&out, quick)?, out.display());
    Ok(())
}
