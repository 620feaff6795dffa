//! Bad input, crafted for every loader and command: each ends in one line on stderr that names the file or
//! flag and the problem, with exit code 2 (bad input; 1 is a failure while running, 101 a bug), never an
//! "internal error". And inputs that used to give wrong results in silence now give the right ones or an
//! error.
mod common;

use common::{fixture, tmp_dir};
use npyz::WriterBuilder;
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor};

fn run(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tpp")).args(args).env("RUST_LOG", "warn").output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// The command fails as bad input: exit code 2 and one line with every needle.
fn bad(args: &[&str], needles: &[&str]) {
    let (code, err) = run(args);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(lines[0].starts_with("error: "), "{args:?}: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "{args:?}: '{n}' not in: {err}");
    }
    assert!(!err.contains("internal error") && !err.contains("panicked"), "{args:?}: {err}");
    assert_eq!(code, 2, "{args:?}: exit code {code} for bad input: {err}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn backbone() -> String {
    fixture("timm_vit_avg_fcnorm.safetensors").to_str().unwrap().to_string()
}

/// `finetune` on the tiny 1-channel fixture backbone with these data and extra arguments (1 epoch unless
/// they say otherwise).
fn finetune<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut v: Vec<String> =
        ["--threads", "1", "finetune", "--backbone", &backbone(), "--heads", "3", "--img-size", "32"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    v.extend(["--data", data, "--norm", "half", "--out", out].iter().map(|s| s.to_string()));
    if !extra.contains(&"--epochs") {
        v.extend(["--epochs".to_string(), "1".to_string()]);
    }
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// A MedMNIST-like npz: `n` 8x8 grey images per split, one label column of two classes.
fn write_npz(path: &Path, n: u64, labels: impl Fn(u64) -> u8, edit: impl Fn(&str, &mut Vec<u64>, &mut Vec<u8>)) {
    let mut npz = npyz::npz::NpzWriter::create(path).unwrap();
    for split in ["train", "val", "test"] {
        for what in ["images", "labels"] {
            let name = format!("{split}_{what}");
            let (mut shape, mut data) = match what {
                "images" => (vec![n, 8, 8], (0..n * 64).map(|i| (i * 7 % 251) as u8).collect()),
                _ => (vec![n, 1], (0..n).map(&labels).collect()),
            };
            edit(&name, &mut shape, &mut data);
            let mut w =
                npz.array::<u8>(&name, Default::default()).unwrap().default_dtype().shape(&shape).begin_nd().unwrap();
            w.extend(data).unwrap();
            w.finish().unwrap();
        }
    }
}

#[test]
fn bad_flags_are_usage_errors_naming_the_flag() {
    let data = common::fixture("../../data/breastmnist.npz");
    let d = s(&data);
    for (extra, needles) in [
        (vec!["--warmup", "5"], vec!["--warmup", "[0, 1]", "5"]),
        (vec!["--rotate", "NaN"], vec!["--rotate", "NaN"]),
        (vec!["--lr=-1"], vec!["--lr", "> 0"]),
        (vec!["--label-smoothing", "2"], vec!["--label-smoothing"]),
        (vec!["--mask-classes", "1"], vec!["--mask-classes"]),
        (vec!["--select", "bogus"], vec!["--select", "bogus"]),
        (vec!["--batch-size", "0"], vec!["--batch-size"]),
        (vec!["--peft", "lora,ia4"], vec!["--peft", "ia4"]),
        (vec!["--rotate", "200"], vec!["--rotate", "[0, 180]"]),
        (vec!["--jitter", "2"], vec!["--jitter", "[0, 1]"]),
        (vec!["--batch-size", "100000"], vec!["--batch-size", "65536"]),
        (vec!["--select", "kappa"], vec!["--select", "kappa", "auc"]),
        (vec!["--lr", "0.1", "--min-lr", "1"], vec!["--min-lr", "--lr"]),
        (vec!["--device", "bogus"], vec!["--device", "bogus"]),
    ] {
        bad(&args(&finetune(d, "/nonexistent/out", &extra)), &needles);
    }
    bad(&["embed", "--backbone", "x", "--heads", "0", "--input", "y", "--output", "z"], &["--heads"]);
    bad(&["embed", "--backbone", "x", "--img-size", "100000", "--input", "y", "--output", "z"], &["--img-size"]);
    bad(&["bench", "--size", "0"], &["--size"]);
    bad(&["bench", "--steps", "0"], &["--steps"]);
    bad(&["evaluate", "--run", "r", "--labels", "l.csv"], &["--data"]);
    bad(&["compare", "--config", "c.toml", "--seeds", "0", "--out", "o"], &["--seeds", "0"]);
}

#[test]
fn bad_data_files_are_named_with_the_problem() {
    let dir = tmp_dir("adv-data");
    let p = |n: &str| dir.join(n);
    let out = s(&p("never")).to_string();
    let two = |i: u64| (i % 2) as u8;
    // npz: no element along an axis, a 0-d array, a multi-label value that is not 0 or 1, a truncated file.
    write_npz(&p("zero.npz"), 6, two, |n, shape, data| {
        if n == "train_images" {
            *shape = vec![0, 8, 8];
            data.clear();
        }
    });
    write_npz(&p("scalar.npz"), 6, two, |n, shape, data| {
        if n == "val_images" {
            *shape = vec![];
            data.truncate(1);
        }
    });
    write_npz(&p("five.npz"), 6, two, |n, shape, data| {
        if n.ends_with("labels") {
            *shape = vec![6, 2];
            *data = (0..12).map(|i| if i == 3 { 5 } else { (i % 2) as u8 }).collect();
        }
    });
    let good = std::fs::read(fixture("../../data/breastmnist.npz")).unwrap();
    std::fs::write(p("trunc.npz"), &good[..good.len() / 3]).unwrap();
    for (f, needles) in [
        ("zero.npz", vec!["zero.npz", "train_images", "at least one element"]),
        ("scalar.npz", vec!["scalar.npz", "val_images", "at least one element"]),
        ("five.npz", vec!["five.npz", "holds 5", "0 or 1"]),
        ("trunc.npz", vec!["trunc.npz"]),
    ] {
        bad(&args(&finetune(s(&p(f)), &out, &[])), &needles);
    }
    // Image folders: one class only, a class too small to split.
    for (c, n) in [("a", 5), ("b", 2)] {
        std::fs::create_dir_all(p("small").join(c)).unwrap();
        for i in 0..n {
            image::GrayImage::from_pixel(12, 12, image::Luma([i * 40]))
                .save(p("small").join(c).join(format!("{i}.png")))
                .unwrap();
        }
    }
    bad(&args(&finetune(s(&p("small")), &out, &[])), &["class 'b' has 2 image(s)", "at least 3"]);
    std::fs::create_dir_all(p("one/a")).unwrap();
    image::GrayImage::new(4, 4).save(p("one/a/0.png")).unwrap();
    bad(&args(&finetune(s(&p("one")), &out, &[])), &["one", "one sub-folder per class"]);
    // A manifest naming one image twice (it would land in two splits).
    std::fs::write(p("small/m.csv"), "path,label\na/0.png,x\na/1.png,y\na/0.png,y\n").unwrap();
    bad(&args(&finetune(s(&p("small/m.csv")), &out, &[])), &["m.csv", "line 4", "a/0.png again"]);
    std::fs::write(p("small/m.csv"), "path,label\na/0.png,x\na/1.png,y\n./a/../a/0.png,y\n").unwrap();
    bad(&args(&finetune(s(&p("small/m.csv")), &out, &[])), &["m.csv", "line 4", "./a/../a/0.png again"]);
    // Segmentation: masks without any foreground, too few pairs.
    for (root, n, value) in [("empty", 6, 0u8), ("few", 2, 255), ("seg", 6, 255)] {
        std::fs::create_dir_all(p(root).join("images")).unwrap();
        std::fs::create_dir_all(p(root).join("masks")).unwrap();
        for i in 0..n {
            image::GrayImage::from_pixel(16, 16, image::Luma([i * 30]))
                .save(p(root).join(format!("images/{i}.png")))
                .unwrap();
            image::GrayImage::from_pixel(16, 16, image::Luma([value]))
                .save(p(root).join(format!("masks/{i}.png")))
                .unwrap();
        }
    }
    bad(&args(&finetune(s(&p("empty")), &out, &[])), &["masks", "no training mask has a foreground"]);
    bad(&args(&finetune(s(&p("few")), &out, &[])), &["few", "2 image/mask pairs", "at least 3"]);
    bad(&args(&finetune(s(&p("seg")), &out, &["--mixup", "0.2"])), &["--mixup", "segmentation"]);
    // Two images with one stem would share one predicted-mask file and one mask.
    image::GrayImage::new(16, 16).save(p("seg/images/0.jpg")).unwrap();
    bad(&args(&finetune(s(&p("seg")), &out, &[])), &["0.jpg", "0.png"]);
    // .npy inputs: a 0-d array, a non-finite value.
    let scalar = p("scalar.npy");
    tpp::data::npy::write_f32(&scalar, &Tensor::from(1f32)).unwrap();
    let nan = p("nan.npy");
    tpp::data::npy::write_f32(&nan, &Tensor::from_slice(&[0f32, f32::NAN, 1.0, 2.0]).reshape([1, 1, 2, 2])).unwrap();
    for (f, needle) in [(&scalar, "at least one element"), (&nan, "NaN")] {
        let o = p("f.npy");
        bad(&["embed", "--backbone", &backbone(), "--heads", "3", "--input", s(f), "--output", s(&o)], &[s(f), needle]);
    }
}

#[test]
fn encodings_that_were_read_wrong_in_silence_are_read_right() {
    let dir = tmp_dir("adv-silent");
    // 0/1 masks, and red-only RGB masks: foreground where the disc is.
    for (root, fg) in [("zero_one", image::Rgb([1u8, 1, 1])), ("red", image::Rgb([255u8, 0, 0]))] {
        let r = dir.join(root);
        std::fs::create_dir_all(r.join("images")).unwrap();
        std::fs::create_dir_all(r.join("masks")).unwrap();
        for i in 0..6u32 {
            image::GrayImage::from_pixel(16, 16, image::Luma([i as u8 * 30]))
                .save(r.join(format!("images/{i}.png")))
                .unwrap();
            let mask = image::RgbImage::from_fn(16, 16, |x, y| if x < 8 && y < 8 { fg } else { image::Rgb([0, 0, 0]) });
            mask.save(r.join(format!("masks/{i}.png"))).unwrap();
        }
        let o = tpp::data::DataOptions { image_size: Some(16), mask_classes: 2, ..Default::default() };
        let (ds, _) = tpp::data::open_with(&r, &o).unwrap();
        let fg = ds.train.labels.sum(Kind::Int64).int64_value(&[]);
        assert_eq!(fg, ds.train.len() * 64, "{root}: foreground pixels");
    }
    // A column-major npz reads as the same data as its row-major twin.
    let a = dir.join("c.npz");
    let b = dir.join("f.npz");
    write_npz(&a, 6, |i| (i % 2) as u8, |_, _, _| {});
    let mut npz = npyz::npz::NpzWriter::create(&b).unwrap();
    for split in ["train", "val", "test"] {
        let images: Vec<u8> = (0..6u64 * 64).map(|i| (i * 7 % 251) as u8).collect();
        // The same array stored column-major: element (n, y, x) at n + 6 (y + 8 x).
        let mut f = vec![0u8; images.len()];
        for (i, v) in images.iter().enumerate() {
            let (n, y, x) = (i / 64, i / 8 % 8, i % 8);
            f[n + 6 * (y + 8 * x)] = *v;
        }
        let mut w = npz
            .array::<u8>(&format!("{split}_images"), Default::default())
            .unwrap()
            .default_dtype()
            .shape(&[6, 8, 8])
            .order(npyz::Order::Fortran)
            .begin_nd()
            .unwrap();
        w.extend(f).unwrap();
        w.finish().unwrap();
        let mut w = npz
            .array::<u8>(&format!("{split}_labels"), Default::default())
            .unwrap()
            .default_dtype()
            .shape(&[6, 1])
            .begin_nd()
            .unwrap();
        w.extend((0..6u8).map(|i| i % 2)).unwrap();
        w.finish().unwrap();
    }
    drop(npz);
    let (x, y) = (tpp::data::open(&a, None).unwrap(), tpp::data::open(&b, None).unwrap());
    assert!(x.train.images.equal(&y.train.images), "column-major images read scrambled");
}

/// A copy of the fixture backbone with `edit` applied to its tensors.
fn edited_backbone(dir: &Path, name: &str, edit: impl Fn(&mut std::collections::BTreeMap<String, Tensor>)) -> PathBuf {
    let mut t = tpp::backbone::checkpoint::read_safetensors(&fixture("timm_vit_avg_fcnorm.safetensors")).unwrap();
    edit(&mut t);
    let p = dir.join(name);
    let pairs: Vec<(&str, &Tensor)> = t.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&pairs, &p).unwrap();
    p
}

#[test]
fn bad_checkpoints_are_named_with_the_problem() {
    let dir = tmp_dir("adv-ckpt");
    let input = dir.join("x.npy");
    tpp::data::npy::write_f32(&input, &Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu))).unwrap();
    let int8 = edited_backbone(&dir, "int8.safetensors", |t| {
        let w = t["blocks.0.mlp.fc1.weight"].to_kind(Kind::Int8);
        t.insert("blocks.0.mlp.fc1.weight".into(), w);
    });
    let nan = edited_backbone(&dir, "nan.safetensors", |t| {
        let mut w = t["blocks.1.attn.qkv.weight"].copy();
        let _ = w.fill_diagonal_(f64::NAN, false);
        t.insert("blocks.1.attn.qkv.weight".into(), w);
    });
    let rank = edited_backbone(&dir, "rank.safetensors", |t| {
        let w = t["pos_embed"].squeeze_dim(0);
        t.insert("pos_embed".into(), w);
    });
    for (ck, needles) in [
        (&int8, vec!["int8.safetensors", "blocks.0.mlp.fc1.weight", "floating point"]),
        (&nan, vec!["nan.safetensors", "blocks.1.attn.qkv.weight", "non-finite"]),
        (&rank, vec!["rank.safetensors", "pos_embed", "dimensions"]),
    ] {
        let o = dir.join("f.npy");
        bad(&["embed", "--backbone", s(ck), "--heads", "3", "--input", s(&input), "--output", s(&o)], &needles);
    }
}

#[test]
fn configs_with_bad_values_are_named_before_any_work() {
    let dir = tmp_dir("adv-config");
    let base = format!("backbone = {:?}\ndata = \"d.npz\"\n", backbone());
    for (name, body, needles) in [
        ("epochs0", "[tpp]\nepochs = 0\n", vec!["epochs0.toml", "[tpp]", "epochs must be >= 1"]),
        ("warmup", "[finetune]\nwarmup = 5\n", vec!["warmup.toml", "[finetune]", "warmup must be in [0, 1]"]),
        ("seed", "[finetune]\nseed = 3\n", vec!["seed.toml", "seed", "seeds"]),
        ("norm", "norm = \"imgnet\"\n", vec!["norm.toml", "imgnet"]),
        ("key", "sedes = [1]\n", vec!["key.toml", "unknown key `sedes`"]),
    ] {
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, format!("{base}{body}")).unwrap();
        bad(&["compare", "--config", s(&cfg), "--out", s(&dir.join("out"))], &needles);
    }
}

#[test]
fn outputs_are_never_overwritten_and_runs_check_their_inputs() {
    let dir = tmp_dir("adv-outputs");
    let data = dir.join("breast.npz");
    std::fs::copy(fixture("../../data/breastmnist.npz"), &data).unwrap();
    let run_dir = dir.join("run");
    let (code, err) = run(&args(&finetune(s(&data), s(&run_dir), &[])));
    assert_eq!(code, 0, "{err}");
    // predict, export, embed and pretrain-targets refuse an existing output.
    let taken = dir.join("taken.csv");
    std::fs::write(&taken, "mine").unwrap();
    let input = dir.join("x.npy");
    tpp::data::npy::write_f32(&input, &Tensor::zeros([2, 1, 28, 28], (Kind::Float, Device::Cpu))).unwrap();
    bad(&["predict", "--run", s(&run_dir), "--input", s(&input), "--out", s(&taken)], &["taken.csv", "exists"]);
    bad(&["export", "--run", s(&run_dir), "--merge", "--out", s(&taken)], &["taken.csv", "exists"]);
    bad(
        &["embed", "--backbone", &backbone(), "--heads", "3", "--input", s(&input), "--output", s(&taken)],
        &["taken.csv", "exists"],
    );
    let tpp_args =
        ["pretrain-targets", "--backbone", &backbone(), "--heads", "3", "--img-size", "32", "--data", s(&data)];
    bad(&[&tpp_args[..], &["--epochs", "1", "--out", s(&run_dir)]].concat(), &["run", "exists"]);
    assert_eq!(std::fs::read_to_string(&taken).unwrap(), "mine");
    // The run's data changed since: evaluating it on "its" data would score something else.
    let mut bytes = std::fs::read(&data).unwrap();
    bytes.extend_from_slice(b"appended");
    std::fs::write(&data, &bytes).unwrap();
    bad(&["evaluate", "--run", s(&run_dir)], &["breast.npz", "changed since the run"]);
    // Target parameters pre-trained on another backbone are refused.
    let other = edited_backbone(&dir, "other.safetensors", |t| {
        let w = &t["blocks.0.mlp.fc1.weight"] * 1.01;
        t.insert("blocks.0.mlp.fc1.weight".into(), w);
    });
    let good_data = s(&fixture("../../data/breastmnist.npz")).to_string();
    let tpp_out = dir.join("tpp");
    let o = Command::new(env!("CARGO_BIN_EXE_tpp"))
        .args(["--threads", "1", "pretrain-targets", "--backbone", s(&other), "--heads", "3", "--img-size", "32"])
        .args(["--data", &good_data, "--norm", "half", "--epochs", "1", "--decoder-dim", "32", "--decoder-depth", "1"])
        .args(["--decoder-heads", "2", "--out", s(&tpp_out)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let init = ["--init-targets", s(&tpp_out)];
    bad(&args(&finetune(&good_data, s(&dir.join("ft")), &init)), &["tpp", "pre-trained on", "other.safetensors"]);
}

#[test]
fn a_run_whose_best_value_is_null_resumes() {
    let dir = tmp_dir("adv-null");
    let data = s(&fixture("../../data/breastmnist.npz")).to_string();
    let out = dir.join("run");
    let (code, err) = run(&args(&finetune(&data, s(&out), &["--epochs", "2"])));
    assert_eq!(code, 0, "{err}");
    // As a run with no finite validation value yet would have written it: JSON has no -inf.
    let state = out.join("checkpoint/state.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    v["best_value"] = serde_json::Value::Null;
    v["best_epoch"] = (-1).into();
    v["epochs_done"] = 1.into();
    v["history"].as_array_mut().unwrap().truncate(1);
    std::fs::write(&state, v.to_string()).unwrap();
    std::fs::remove_file(out.join("metrics.json")).unwrap();
    let (code, err) = run(&args(&finetune(&data, s(&out), &["--epochs", "2", "--resume"])));
    assert_eq!(code, 0, "{err}");
    assert!(out.join("metrics.json").exists());
}

#[test]
fn full_fine_tuning_ignores_the_checkpoints_own_classifier() {
    // The fixture's classifier has 3 classes, the data 2: the checkpoint's head is dropped, so the best
    // weights reload (they were refused as "head.bias has shape [2] ... expects [3]").
    let dir = tmp_dir("adv-full-head");
    let data = s(&fixture("../../data/breastmnist.npz")).to_string();
    let out = dir.join("run");
    let (code, err) = run(&args(&finetune(&data, s(&out), &["--peft", "full"])));
    assert_eq!(code, 0, "{err}");
    let (code, err) = run(&["evaluate", "--run", s(&out)]);
    assert_eq!(code, 0, "{err}");
}
