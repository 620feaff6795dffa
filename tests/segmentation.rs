//! Fine-structure segmentation: the unetr head's full-resolution path resolves 1-px lines the token-only
//! head cannot; native-resolution crops and sliding-window inference (equal to a whole-image prediction
//! where one window covers the image, exact blending, bounded memory on a 4000 x 4000 image); losses.
mod common;

use common::{fixture, tmp_dir, tpp_bin};
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tpp::heads::segmentation::{SegLoss, loss, sliding_window, soft_skeleton};

/// A tiny timm ViT (patch 8, 32 px, 1 channel, width 48, depth 2).
fn backbone() -> String {
    fixture("timm_vit_avg_fcnorm.safetensors").to_str().unwrap().to_string()
}

/// `n` grey `w` x `h` images of noise crossed by one horizontal and one vertical 1-px bright line at
/// seeded positions; the masks are the lines.
fn write_line_pairs(root: &Path, n: u32, w: u32, h: u32) {
    let on = |x: u32, y: u32, i: u32| y == 3 + (i * 7) % (h - 6) || x == 3 + (i * 11 + 5) % (w - 6);
    let noise = |x: u32, y: u32, i: u32| ((x * 37 + y * 101 + i * 53) % 70) as u8;
    common::write_pairs(root, n, (w, h), on, 230, noise);
}

fn finetune(root: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--threads",
        "1",
        "finetune",
        "--backbone",
        &*Box::leak(backbone().into_boxed_str()),
        "--heads",
        "3",
        "--data",
        root.to_str().unwrap(),
        "--norm",
        "half",
        "--peft",
        "lora",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    tpp_bin(&args)
}

fn metrics(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap()
}

#[test]
fn unetr_head_segments_one_pixel_lines_that_the_token_head_cannot() {
    let root = tmp_dir("seglines");
    write_line_pairs(&root, 80, 32, 32);
    let mut dice = Vec::new();
    for head in ["pup", "unetr"] {
        let out = root.join(head);
        let o = finetune(&root, &out, &["--img-size", "32", "--epochs", "25", "--seg-head", head]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        dice.push(metrics(&out)["dice"].as_f64().unwrap());
    }
    let (pup, unetr) = (dice[0], dice[1]);
    eprintln!("test Dice of 1-px lines: pup {pup:.3}, unetr {unetr:.3}");
    assert!(unetr > 0.8, "unetr test Dice {unetr} (pup {pup})");
    assert!(unetr > pup + 0.2, "unetr {unetr} vs pup {pup}");
    // The run records its head; a bad head name is one line naming the flag.
    let rec = std::fs::read_to_string(root.join("unetr").join("run.json")).unwrap();
    assert!(rec.contains("\"head\": \"unetr\""), "{rec}");
    let o = finetune(&root, &root.join("bad"), &["--seg-head", "unet"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--seg-head") && err.contains("pup, unetr"), "{err}");
}

#[test]
fn native_resolution_trains_on_crops_and_predicts_whole_images_by_sliding_windows() {
    // Non-square images larger than the 32 px model input: crops in training, windows in evaluation.
    let dir = tmp_dir("segnative");
    let root = dir.join("data");
    write_line_pairs(&root, 24, 72, 56);
    let out = dir.join("run");
    let o = finetune(
        &root,
        &out,
        &["--img-size", "32", "--epochs", "3", "--seg-head", "unetr", "--seg-native", "--seg-crops-per-image", "2"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m = metrics(&out);
    assert!(m["dice"].as_f64().unwrap() > 0.0 && m["sensitivity"].as_f64().is_some(), "{m}");
    // 2 crops of each of the 16 training images per epoch, in batches of 16: 2 updates per epoch.
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    // Predicted masks have each image's own size.
    let pred = dir.join("pred");
    common::predict(&out, &root.join("images"), &pred);
    assert_eq!(image::image_dimensions(pred.join("3.png")).unwrap(), (72, 56));
    // evaluate re-scores the same test split to the same numbers.
    let o = tpp_bin(&["evaluate", "--run", out.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{text}");
    let d = m["dice"].as_f64().unwrap();
    assert!(text.contains(&format!("{d:.4}")), "evaluate printed {text}, the run's test Dice is {d}");
}

#[test]
fn native_resolution_refuses_mixed_sizes_with_one_line_and_accepts_a_data_size() {
    let root = tmp_dir("segmixed");
    write_line_pairs(&root, 12, 48, 40);
    // One pair of another size.
    image::GrayImage::from_pixel(40, 40, image::Luma([9])).save(root.join("images").join("odd.png")).unwrap();
    let mut m = image::GrayImage::from_pixel(40, 40, image::Luma([0]));
    m.put_pixel(3, 3, image::Luma([255]));
    m.save(root.join("masks").join("odd.png")).unwrap();
    let o = finetune(&root, &root.join("a"), &["--img-size", "32", "--epochs", "1", "--seg-native"]);
    let err = String::from_utf8_lossy(&o.stderr);
    let last = err.trim().lines().last().unwrap_or_default();
    assert!(!o.status.success() && last.contains("--seg-data-size") && last.contains("40x40"), "{err}");
    assert_eq!(err.lines().filter(|l| l.starts_with("error")).count(), 1, "{err}");
    let o = finetune(
        &root,
        &root.join("b"),
        &["--img-size", "32", "--epochs", "1", "--seg-native", "--seg-data-size", "48"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A native-only option without --seg-native is refused, naming it.
    let o = finetune(&root, &root.join("c"), &["--img-size", "32", "--epochs", "1", "--seg-data-size", "48"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--seg-native"), "{err}");
}

/// A translation-equivariant, pointwise stand-in for a model: 1x1 convolution to 2 classes.
fn pointwise(x: &Tensor) -> Tensor {
    let w = Tensor::from_slice(&[0.7f32, -0.2, 0.4, -0.5, 0.3, 0.1]).reshape([2, 3, 1, 1]);
    let b = Tensor::from_slice(&[0.05f32, -0.1]);
    x.conv2d(&w, Some(&b), [1, 1], [0, 0], [1, 1], 1)
}

#[test]
fn sliding_window_blends_exactly_at_any_size() {
    tch::manual_seed(0);
    for (h, w) in [(999, 960), (64, 64), (50, 100), (20, 13)] {
        let img = Tensor::randn([3, h, w], (Kind::Float, Device::Cpu));
        let probs = sliding_window(&img, 64, 0.5, 8, &mut |x| Ok(pointwise(x))).unwrap();
        // Every window gives a pointwise model the same values, so any blend must return them.
        let whole = pointwise(&img.unsqueeze(0)).softmax(1, Kind::Float).squeeze_dim(0);
        assert_eq!(probs.size(), vec![2, h, w]);
        let err = (&probs - &whole).abs().max().double_value(&[]);
        assert!(err < 1e-5, "{h}x{w}: {err}");
    }
}

#[test]
fn sliding_window_equals_a_whole_image_prediction_when_one_window_covers_the_image() {
    // A real model: the tiny ViT with the unetr head, image = window = its input size.
    let (mut model, _) = tpp::model::PeftModel::build(
        Path::new(&backbone()),
        &tpp::backbone::LoadOptions { num_heads: Some(3), ..Default::default() },
        &tpp::peft::PeftSpec::with_methods(&[tpp::peft::Method::LORA]),
        Device::Cpu,
        0,
    )
    .unwrap();
    model.add_seg_head(tpp::heads::segmentation::HeadKind::Unetr, 2);
    let _g = tch::no_grad_guard();
    let img = Tensor::randn([1, 32, 32], (Kind::Float, Device::Cpu));
    let t = tpp::data::loader::Tiles { size: 32, overlap: 0.5, per_image: 1 };
    let slid = model.segment(&img, t, 4).unwrap();
    let whole = model.logits(&img.unsqueeze(0), false).softmax(1, Kind::Float).squeeze_dim(0);
    let err = (&slid - &whole).abs().max().double_value(&[]);
    assert!(err < 1e-6, "{err}");
}

#[test]
fn sliding_window_memory_is_bounded_on_a_4000_px_image() {
    let img = Tensor::zeros([3, 4000, 4000], (Kind::Float, Device::Cpu));
    let _ = img.narrow(1, 1000, 5).fill_(1.0);
    let (mut calls, mut largest) = (0, 0);
    let probs = sliding_window(&img, 256, 0.25, 4, &mut |x| {
        calls += 1;
        largest = largest.max(x.numel());
        Ok(pointwise(x))
    })
    .unwrap();
    // 21 x 21 windows of 256 px at stride 192, 4 per call: no call sees more than 4 windows.
    assert_eq!(calls, (21 * 21 + 3) / 4);
    assert_eq!(largest, 4 * 3 * 256 * 256);
    assert_eq!(probs.size(), vec![2, 4000, 4000]);
    let whole_row = pointwise(&img.narrow(1, 1000, 1).unsqueeze(0)).softmax(1, Kind::Float);
    let err = (probs.narrow(1, 1000, 1) - whole_row.squeeze_dim(0)).abs().max().double_value(&[]);
    assert!(err < 1e-5, "{err}");
}

#[test]
fn losses_agree_on_a_perfect_prediction_and_punish_a_broken_line() {
    // A 1-px vertical line on 16 x 16.
    let mask = Tensor::zeros([1, 16, 16], (Kind::Int64, Device::Cpu));
    let _ = mask.narrow(2, 8, 1).fill_(1);
    let perfect = (mask.one_hot(2).permute([0, 3, 1, 2]).to_kind(Kind::Float) - 0.5) * 40.0;
    // The same line cut in the middle: Dice loses 2/16 of it, clDice its connectivity too.
    let broken_mask = mask.copy();
    let _ = broken_mask.narrow(1, 7, 2).fill_(0);
    let broken = (broken_mask.one_hot(2).permute([0, 3, 1, 2]).to_kind(Kind::Float) - 0.5) * 40.0;
    for kind in [SegLoss::CeDice, SegLoss::FocalDice, SegLoss::Cldice] {
        let good = loss(&perfect, &mask, kind).double_value(&[]);
        let bad = loss(&broken, &mask, kind).double_value(&[]);
        assert!(good < 0.01, "{kind}: perfect prediction loss {good}");
        assert!(bad > good + 0.04, "{kind}: broken {bad} vs perfect {good}");
    }
    // The soft skeleton of a 5-px wide bar lies inside it and is thinner.
    let bar = Tensor::zeros([1, 1, 16, 16], (Kind::Float, Device::Cpu));
    let _ = bar.narrow(3, 6, 5).fill_(1.0);
    let skel = soft_skeleton(&bar, 3);
    let (s, b) = (skel.sum(Kind::Float).double_value(&[]), bar.sum(Kind::Float).double_value(&[]));
    assert!(s > 0.0 && s < 0.5 * b, "skeleton mass {s} of {b}");
    assert_eq!((&skel * (-&bar + 1.0)).abs().sum(Kind::Float).double_value(&[]), 0.0);
}

#[test]
fn segmentation_options_on_classification_data_are_refused() {
    let npz = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/breastmnist.npz");
    let out = tmp_dir("segcls").join("run");
    let o = finetune(&npz, &out, &["--img-size", "32", "--epochs", "1", "--seg-head", "unetr"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--seg-*") && err.contains("breastmnist"), "{err}");
    assert!(!out.join("run.json").exists());
}
