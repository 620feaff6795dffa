//! Training: the TPP stage trains only target parameters (+ pretext head) and lowers the MAE loss; TPP
//! values reach fine-tuning exactly; fine-tuning resumes after SIGKILL to the same result; non-finite
//! losses stop cleanly; metrics match scikit-learn; `compare` skips finished cells.
mod common;

use common::{fixture, tmp_dir, tpp_bin};
use std::path::{Path, PathBuf};
use std::process::Command;
use tch::{Device, Kind, Tensor, nn};
use tpp::backbone::{Backbone, Pool, VitConfig};
use tpp::data::transforms::{Augment, Norm};
use tpp::peft::{Method, PeftSpec, Targets};
use tpp::pretext::mae::{MaeConfig, MaeDecoder};
use tpp::train::pretrain::{PretrainConfig, train_mae};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").join(name)
}

#[test]
fn tpp_stage_trains_only_targets_and_lowers_mae_loss() {
    let ds = tpp::data::open(&data("breastmnist.npz"), None).unwrap();
    let split = ds.train.subset(&(0..64).collect::<Vec<i64>>());
    let cfg = VitConfig {
        img_size: 28,
        patch_size: 4,
        in_chans: 1,
        embed_dim: 64,
        depth: 4,
        num_heads: 4,
        mlp_hidden: 128,
        pool: Pool::Cls,
        ..VitConfig::preset("vit_tiny_patch16_224").unwrap()
    };
    tch::manual_seed(0);
    let mut bb = Backbone::fresh(&cfg, Device::Cpu).unwrap();
    let targets = Targets::attach(&mut bb.vit, &PeftSpec::with_methods(&[Method::LORA]), Device::Cpu).unwrap();
    bb.freeze();
    let before: Vec<(String, Tensor)> = bb.vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let t_before: Vec<(String, Tensor)> = targets.store().variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let dec_vs = nn::VarStore::new(Device::Cpu);
    let mae = MaeConfig {
        mask_ratio: 0.75,
        decoder_dim: 64,
        decoder_depth: 2,
        decoder_heads: 4,
        decoder_mlp_ratio: 4.0,
        norm_pix: true,
    };
    let dec = MaeDecoder::new(&dec_vs.root(), &cfg, &mae, 1).unwrap();
    let mut params: Vec<(String, Tensor)> = targets.store().variables().into_iter().collect();
    params.extend(dec_vs.variables().into_iter().map(|(k, v)| (format!("pretext.{k}"), v)));
    let pcfg = PretrainConfig {
        epochs: 250,
        batch_size: 64,
        lr: 3e-3,
        min_lr: 0.0,
        warmup: 0.05,
        weight_decay: 0.05,
        clip: 1.0,
        seed: 0,
        image_size: 28,
        norm: Norm::HALF,
        augment: Augment::NONE,
        mae,
        preview_every: 0,
        native_crops: 0,
        native_size: 0,
        cpu_bf16: false,
    };
    let out = tmp_dir("tpp-stage");
    let summary = train_mae(&bb.vit, &dec, params, &split, &pcfg, Device::Cpu, &out, "TPP", &mut || Ok(())).unwrap();
    assert_eq!(summary.steps, 250);
    // The loss over the first and last 20 steps (loss.csv has one row per step).
    let csv = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    let header = csv.lines().next().unwrap();
    assert!(header.split(',').any(|c| c == "loss"), "{header}");
    let losses: Vec<f64> = csv.lines().skip(1).map(|l| l.split(',').nth(2).unwrap().parse().unwrap()).collect();
    assert_eq!(losses.len(), 250);
    // Norm-pix targets have unit variance: predicting zeros scores ~1.0, the untrained model more.
    let first = losses[0];
    let last: f64 = losses[230..].iter().sum::<f64>() / 20.0;
    eprintln!("MAE loss {first:.4} -> {last:.4}");
    assert!(
        first > 0.9 && last < 0.85 * first && last < 0.8,
        "MAE loss did not decrease clearly: {first:.4} -> {last:.4}"
    );
    assert!(out.join("preview_final.png").exists());
    for (k, v) in &before {
        assert!(bb.vs.variables()[k].equal(v), "backbone tensor {k} changed");
    }
    let now = targets.store().variables();
    assert!(t_before.iter().all(|(k, v)| !now[k].equal(v)), "every LoRA factor should have trained");
}

/// A tiny backbone for CLI runs: the 1-channel timm fixture (patch 8) at 32 px, 3 heads.
fn backbone() -> String {
    fixture("timm_vit_avg_fcnorm.safetensors").to_str().unwrap().to_string()
}

fn finetune_args(out: &Path, epochs: &str) -> Vec<String> {
    let b = data("breastmnist.npz");
    [
        "--threads",
        "1",
        "finetune",
        "--backbone",
        &backbone(),
        "--heads",
        "3",
        "--img-size",
        "32",
        "--data",
        b.to_str().unwrap(),
        "--norm",
        "half",
        "--peft",
        "lora",
        "--epochs",
        epochs,
        "--batch-size",
        "32",
        "--seed",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn test_metrics(out: &Path) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    serde_json::json!({"auc": v["auc"], "accuracy": v["accuracy"], "f1": v["f1"], "best_epoch": v["run"]["best_epoch"]})
}

#[test]
fn finetune_resume_after_sigkill_reaches_the_same_result() {
    let dir = tmp_dir("resume");
    let (a, b) = (dir.join("uninterrupted"), dir.join("killed"));
    let args_a = finetune_args(&a, "6");
    let o = Command::new(env!("CARGO_BIN_EXE_tpp")).args(&args_a).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let args_b = finetune_args(&b, "6");
    let mut child =
        Command::new(env!("CARGO_BIN_EXE_tpp")).args(&args_b).stderr(std::process::Stdio::null()).spawn().unwrap();
    // Kill it (SIGKILL) once at least two epochs are checkpointed, before it finishes.
    let state = b.join("checkpoint").join("state.json");
    let t0 = std::time::Instant::now();
    loop {
        let done = std::fs::read_to_string(&state)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v["epochs_done"].as_i64());
        if done.is_some_and(|d| d >= 2) || t0.elapsed().as_secs() > 120 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert!(
        !b.join("metrics.json").exists(),
        "the run finished before it could be killed; the test needs a slower run"
    );
    // Without --resume the run refuses to overwrite the folder.
    let o = Command::new(env!("CARGO_BIN_EXE_tpp")).args(&args_b).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let mut resumed = args_b.clone();
    resumed.push("--resume".into());
    let o = Command::new(env!("CARGO_BIN_EXE_tpp")).args(&resumed).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(test_metrics(&a), test_metrics(&b));
    let wa = std::fs::read(a.join("adapter/adapter_model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(wa == wb, "final adapters differ");
    // Resuming with other arguments is refused.
    let mut other = finetune_args(&b, "7");
    other.push("--resume".into());
    let o = Command::new(env!("CARGO_BIN_EXE_tpp")).args(&other).output().unwrap();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("differ"));
}

#[test]
fn tpp_targets_reach_finetuning_exactly() {
    let dir = tmp_dir("init-targets");
    let tpp_out = dir.join("tpp");
    let b = data("breastmnist.npz");
    let o = tpp_bin(&[
        "--threads",
        "1",
        "pretrain-targets",
        "--backbone",
        &backbone(),
        "--heads",
        "3",
        "--img-size",
        "32",
        "--data",
        b.to_str().unwrap(),
        "--norm",
        "half",
        "--peft",
        "lora",
        "--pretext",
        "mae",
        "--epochs",
        "1",
        "--batch-size",
        "128",
        "--decoder-dim",
        "32",
        "--decoder-depth",
        "1",
        "--decoder-heads",
        "2",
        "--out",
        tpp_out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for f in [
        "targets/adapter_model.safetensors",
        "targets/adapter_config.json",
        "pretext_head.safetensors",
        "config.json",
        "loss.csv",
    ] {
        assert!(tpp_out.join(f).exists(), "missing {f}");
    }
    let saved =
        tpp::backbone::checkpoint::read_safetensors(&tpp_out.join("targets/adapter_model.safetensors")).unwrap();
    let rec = tpp::experiment::RunRecord {
        backbone: tpp::experiment::BackboneSource { heads: Some(3), img_size: Some(32), ..tpp::experiment::BackboneSource::new(backbone()) },
        peft: PeftSpec::with_methods(&[Method::LORA]),
        init_targets: Some(tpp_out.clone()),
        data: tpp::experiment::DataSource::new(b.clone()),
        train_fraction: 1.0,
        task: tpp::data::Task::Binary,
        fingerprints: Default::default(),
        num_classes: 2,
        config: serde_json::from_value(serde_json::json!({
            "epochs": 1, "batch_size": 32, "lr": 1e-3, "min_lr": 0.0, "warmup": 0.0, "weight_decay": 0.05, "clip": 1.0,
            "seed": 9, "label_smoothing": 0.0, "mixup": 0.0, "patience": 0, "accum": 1, "layer_decay": 1.0, "image_size": 32,
            "norm": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
            "augment": {"hflip": true, "vflip": false, "crop_min_area": 1.0, "crop_max_area": 1.0, "rotate_deg": 0.0, "jitter": 0.0}, "select": "auc"
        }))
        .unwrap(),
    };
    let model = tpp::experiment::finetune::prepare(&rec, Device::Cpu).unwrap().model;
    let vars = model.targets.store().variables();
    let mut n = 0;
    for (k, v) in &saved {
        let name = k.strip_prefix("base_model.model.").unwrap();
        assert!(vars[name].equal(v), "{name} differs from the TPP value at step 0");
        n += 1;
    }
    assert_eq!(n, 4, "2 blocks x (lora_A, lora_B)");
    // And LoRA B is no longer its usual zero init.
    assert!(saved.iter().any(|(k, v)| k.contains("lora_B") && v.abs().sum(Kind::Float).double_value(&[]) > 0.0));
}

#[test]
fn non_finite_loss_stops_with_a_clear_message_and_keeps_the_checkpoint() {
    let dir = tmp_dir("nan");
    let out = dir.join("run");
    let mut args = finetune_args(&out, "4");
    args.extend(["--lr".to_string(), "1e30".to_string(), "--clip".to_string(), "0".to_string()]);
    let o = Command::new(env!("CARGO_BIN_EXE_tpp")).args(&args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.lines().last().unwrap().contains("loss became"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn metrics_match_scikit_learn() {
    let text = std::fs::read_to_string(fixture("metrics_sklearn.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for case in v["cases"].as_array().unwrap() {
        let task: tpp::data::Task = serde_json::from_value(case["task"].clone()).unwrap();
        let grid = |k: &str| -> Vec<Vec<f64>> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
                .collect()
        };
        let got = tpp::eval::metrics::classification(task, &grid("truth"), &grid("probs"));
        for (name, want) in case["expected"].as_object().unwrap() {
            let want = want.as_f64().unwrap();
            let g = got.get(name).unwrap_or_else(|| panic!("{task:?}: metric {name} missing"));
            assert!((g - want).abs() < 1e-9, "{task:?} {name}: {g} vs sklearn {want}");
        }
    }
}

/// A compare config on the small test backbone and BreastMNIST at 32 px, with `rest` (seeds, sections)
/// after the common keys; returns the config's path and the output folder beside it.
fn small_compare(name: &str, rest: &str) -> (PathBuf, PathBuf) {
    let dir = tmp_dir(name);
    let cfg = dir.join("c.toml");
    let head = format!(
        "backbone = {:?}\ndata = {:?}\nheads = 3\nimg_size = 32\nnorm = \"half\"\n",
        backbone(),
        data("breastmnist.npz").to_str().unwrap()
    );
    std::fs::write(&cfg, head + rest).unwrap();
    (cfg, dir.join("out"))
}

/// `tpp compare --config cfg --out out` on one thread, with `extra` flags.
fn compare_run(cfg: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["--threads", "1", "compare", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    tpp_bin(&args)
}

#[test]
fn compare_keeps_finished_cells() {
    let (cfg, out) = small_compare(
        "compare",
        "seeds = [0]\nreferences = [\"linear\"]\n\
         [tpp]\nepochs = 1\ndecoder_dim = 32\ndecoder_depth = 1\ndecoder_heads = 2\n[finetune]\nepochs = 1\n",
    );
    let dir = cfg.parent().unwrap().to_path_buf();
    let run = || compare_run(&cfg, &out, &[]);
    let o = run();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        report.contains("| lora |") && report.contains("| lora+tpp |") && report.contains("| linear |"),
        "{report}"
    );
    assert!(report.contains("pretext MAE") && report.contains("MAE, mask 0.75, decoder auto 1x32"), "{report}");
    for f in ["results.json", "auc.png", "curves_lora.png"] {
        assert!(out.join(f).exists(), "missing {f}");
    }
    // predict: more inputs than one device batch (64) give one row each, in input order.
    let x = tch::Tensor::randn([70, 1, 28, 28], (tch::Kind::Float, tch::Device::Cpu));
    let (all, tail) = (dir.join("all.npy"), dir.join("tail.npy"));
    tpp::data::npy::write_f32(&all, &x).unwrap();
    tpp::data::npy::write_f32(&tail, &x.narrow(0, 64, 6)).unwrap();
    let run_dir = out.join("runs/lora/seed0");
    let predict = |input: &Path, csv: &Path| {
        common::predict(&run_dir, input, csv);
        let text = std::fs::read_to_string(csv).unwrap();
        text.lines().skip(1).map(|l| l.split_once(',').unwrap().1.to_string()).collect::<Vec<_>>()
    };
    let rows = predict(&all, &dir.join("all.csv"));
    assert_eq!(rows.len(), 70);
    assert_eq!(rows[64..], predict(&tail, &dir.join("tail.csv"))[..], "second device batch out of order");
    let t = std::fs::metadata(out.join("runs/lora/seed0/metrics.json")).unwrap().modified().unwrap();
    let o = run();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("done before, kept").count(), 4, "{err}");
    assert_eq!(std::fs::metadata(out.join("runs/lora/seed0/metrics.json")).unwrap().modified().unwrap(), t);
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), report);
    // The linear probe ran on features computed once, and the report says so.
    assert!(report.contains("features computed once per image"), "{report}");
    // A stage recorded before DINO's newer options existed is still this MAE stage: kept, not stale.
    let stage = out.join("tpp/lora/seed0/config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&stage).unwrap()).unwrap();
    let dino = v["record"]["dino"].as_object_mut().unwrap();
    for k in ["centering", "sk_iters", "freeze_last_layer", "koleo"] {
        assert!(dino.remove(k).is_some(), "{k}");
    }
    std::fs::write(&stage, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.matches("done before, kept").count() == 4, "{err}");
    // An edited config is not answered with the old results: the first stale record is named, with what changed.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("[finetune]\nepochs = 1", "[finetune]\nepochs = 2")).unwrap();
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("run.json") && err.contains("config.epochs: 1 -> 2"), "{err}");
    std::fs::write(&cfg, text.replace("[tpp]\nepochs = 1", "[tpp]\nepochs = 1\nlr = 0.01")).unwrap();
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("config.json") && err.contains("config.lr: 0.0015 -> 0.01"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), report);
    assert!(!std::fs::read_to_string(out.join("compare.toml")).unwrap().contains("lr = 0.01"), "config overwritten");
    // A config error names the file.
    std::fs::write(&cfg, "backbone = 3").unwrap();
    let o = run();
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("c.toml"));
}

#[test]
fn compare_picks_the_tpp_setting_on_validation_and_tests_only_the_pick() {
    let (cfg, out) = small_compare(
        "compare-sweep",
        "seeds = [0, 1]\nreferences = []\n[tpp]\nepochs = [1, 2]\nlr = [1.5e-3, 1e-2]\ndecoder_dim = 32\n\
         decoder_depth = 1\ndecoder_heads = 2\n[finetune]\nepochs = 1\n",
    );
    let run = |extra: &[&str]| compare_run(&cfg, &out, extra);
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let labels = ["epochs-1_lr-0.0015", "epochs-1_lr-0.01", "epochs-2_lr-0.0015", "epochs-2_lr-0.01"];
    for seed in [0, 1] {
        let pick: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("runs/lora+tpp/pick-seed{seed}.json"))).unwrap(),
        )
        .unwrap();
        // The pick is the best validation value (the first on a tie), from each candidate's own record.
        let mut best: Option<(f64, &str)> = None;
        for l in labels {
            let run = out.join(format!("runs/lora+tpp/{l}/seed{seed}"));
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(run.join("validation.json")).unwrap()).unwrap();
            let x = v["best_val"].as_f64().unwrap();
            if best.is_none_or(|(b, _)| x > b) {
                best = Some((x, l));
            }
            assert!(out.join(format!("tpp/lora/{l}/seed{seed}/config.json")).exists(), "{l}");
            // The test split is read for the pick alone.
            assert_eq!(run.join("metrics.json").exists(), pick["picked"] == l, "seed {seed} {l}: {pick}");
        }
        assert_eq!(pick["picked"], best.unwrap().1, "{pick}");
        assert_eq!(pick["validation"].as_array().unwrap().len(), 4);
    }
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("## TPP settings picked on validation") && report.contains("| (plain lora) |"), "{report}");
    for l in labels {
        assert!(report.contains(&format!("| {l} |")), "{l}: {report}");
    }
    assert!(report.contains("TPP: [1, 2] epochs, batch 256, lr [0.0015, 0.01]"), "{report}");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(results["picks"]["lora"].as_array().unwrap().len(), 2);
    assert_eq!(results["variants"]["lora+tpp"]["per_seed"].as_array().unwrap().len(), 2);
    // Everything is kept on a second run: 8 stages and 10 runs, no pick made again.
    let o = run(&[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.matches("done before, kept").count() == 18 && !err.contains("picked"), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), report);
    let o = run(&["--list-cells"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().collect::<Vec<_>>(),
        ["0\tdone\tlora seed 0", "1\tdone\tlora seed 1"]
    );
    // A pick whose test was lost is made again from the kept validation records, and only it is tested.
    let picked = |seed: u64| -> String {
        let p = std::fs::read_to_string(out.join(format!("runs/lora+tpp/pick-seed{seed}.json"))).unwrap();
        serde_json::from_str::<serde_json::Value>(&p).unwrap()["picked"].as_str().unwrap().to_string()
    };
    let p0 = picked(0);
    std::fs::remove_file(out.join(format!("runs/lora+tpp/{p0}/seed0/metrics.json"))).unwrap();
    let o = run(&["--cell", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && err.contains(&format!("seed 0: picked {p0}")), "{err}");
    assert_eq!(std::fs::read_to_string(out.join("report.md")).unwrap(), report);
    // A second tested candidate (as an earlier pick of other lists would leave) is refused, not re-picked.
    let other = labels.iter().find(|&&l| l != picked(1)).unwrap();
    let tested = out.join(format!("runs/lora+tpp/{}/seed1/metrics.json", picked(1)));
    std::fs::copy(&tested, out.join(format!("runs/lora+tpp/{other}/seed1/metrics.json"))).unwrap();
    std::fs::remove_file(out.join("runs/lora+tpp/pick-seed1.json")).unwrap();
    let o = run(&["--cell", "1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(other) && err.contains("earlier pick"), "{err}");
    // A pick whose trained run lost its checkpoint is not trained again silently before its test.
    let p0 = picked(0);
    std::fs::remove_file(out.join(format!("runs/lora+tpp/{p0}/seed0/metrics.json"))).unwrap();
    std::fs::remove_dir_all(out.join(format!("runs/lora+tpp/{p0}/seed0/checkpoint"))).unwrap();
    let o = run(&["--cell", "0"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains(&p0) && err.contains("checkpoint/ or best/ is missing"), "{err}");
    // The epochs flag takes a list too; a repeated value is an error naming the flag.
    let o = run(&["--tpp-epochs", "1,1"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--tpp-epochs") && err.contains("given twice"), "{err}");
}

#[test]
fn compare_of_references_only_reports_no_tpp() {
    let (cfg, out) =
        small_compare("compare-refs", "seeds = [0]\nmethods = []\nreferences = [\"linear\"]\n[finetune]\nepochs = 2\n");
    let o = compare_run(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| linear |") && report.contains("features computed once per image"), "{report}");
    assert!(!report.contains("PEFT + TPP") && !report.contains("pretext") && !report.contains("TPP:"), "{report}");
    assert!(!out.join("tpp").exists());
}

#[test]
fn dino_tpp_stage_student_learns_to_match_the_ema_teacher() {
    use tpp::pretext::dino::{self, DinoConfig, DinoHead};
    let ds = tpp::data::open(&data("breastmnist.npz"), None).unwrap();
    let split = ds.train.subset(&(0..64).collect::<Vec<i64>>());
    let opts = tpp::backbone::LoadOptions { num_heads: Some(3), img_size: Some(32), pool: None };
    let (bb, _) = Backbone::load(&fixture("timm_vit_avg_fcnorm.safetensors"), &opts, Device::Cpu).unwrap();
    let frozen: Vec<(String, Tensor)> = bb.vs.variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let mut teacher = bb.vit.share_backbone();
    let spec = PeftSpec::with_methods(&[Method::LORA]);
    let student = tpp::model::PeftModel::from_backbone(bb, &spec, Device::Cpu, 0).unwrap();
    let mut t_targets = Targets::attach(&mut teacher, &spec, Device::Cpu).unwrap();
    t_targets.store_mut().copy(student.targets.store()).unwrap();
    t_targets.store_mut().freeze();
    // DINO's teacher temperature: the KL below is measured against the sharpened target, which the
    // default 0.01 would make far harder to match in 30 steps than the mechanics tested here need.
    let cfg = DinoConfig {
        out_dim: 64,
        hidden_dim: 128,
        bottleneck_dim: 32,
        local_crops: 2,
        teacher_temp: 0.04,
        warmup_teacher_temp: 0.04,
        ..Default::default()
    };
    let s_vs = nn::VarStore::new(Device::Cpu);
    let s_head = DinoHead::new(&s_vs.root(), 48, &cfg);
    let mut t_vs = nn::VarStore::new(Device::Cpu);
    let t_head = DinoHead::new(&t_vs.root(), 48, &cfg);
    t_vs.copy(&s_vs).unwrap();
    t_vs.freeze();
    // KL(teacher || student) on a fixed batch of global views, with the same temperatures as training.
    let x = Norm::HALF.apply(&split.images.narrow(0, 0, 32));
    let x = tpp::data::transforms::resize(&x, 32);
    // The training target: the centred, sharpened teacher (centre as at the end of training).
    let kl = |center: &Tensor| {
        let _g = tch::no_grad_guard();
        let t = ((dino::project(&teacher, &t_head, &x, false) - center) / cfg.teacher_temp).softmax(-1, Kind::Float);
        let s = (dino::project(&student.bb.vit, &s_head, &x, false) / cfg.student_temp).log_softmax(-1, Kind::Float);
        (&t * (t.clamp_min(1e-12).log() - s))
            .sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)
            .mean(Kind::Float)
            .double_value(&[])
    };
    let mut params: Vec<(String, Tensor)> = student.targets.store().variables().into_iter().collect();
    params.extend(s_vs.variables().into_iter().map(|(k, v)| (format!("pretext.{k}"), v)));
    let pcfg = PretrainConfig {
        epochs: 15,
        batch_size: 32,
        lr: 1e-3,
        min_lr: 0.0,
        warmup: 0.1,
        weight_decay: 0.04,
        clip: 3.0,
        seed: 0,
        image_size: 32,
        norm: Norm::HALF,
        augment: Augment::NONE,
        mae: MaeConfig::default(),
        preview_every: 0,
        native_crops: 0,
        native_size: 0,
        cpu_bf16: false,
    };
    let out = tmp_dir("dino-stage");
    let t_before: Vec<(String, Tensor)> =
        t_targets.store().variables().into_iter().map(|(k, v)| (k, v.copy())).collect();
    let s_before: Vec<(String, Tensor)> =
        student.targets.store().variables().into_iter().chain(s_vs.variables()).map(|(k, v)| (k, v.copy())).collect();
    let parts = tpp::train::pretrain::DinoParts {
        student: &student.bb.vit,
        teacher: &teacher,
        s_head: &s_head,
        t_head: &t_head,
        ema: vec![(t_targets.store(), student.targets.store()), (&t_vs, &s_vs)],
    };
    let summary =
        tpp::train::pretrain::train_dino(&parts, params, &split, &pcfg, &cfg, Device::Cpu, &out, &mut || Ok(()))
            .unwrap();
    let center = summary.center.expect("DINO reports its centre");
    let kl1 = kl(&center);
    // The same target against the student as it was before training.
    let trained: Vec<(String, Tensor)> =
        student.targets.store().variables().into_iter().chain(s_vs.variables()).map(|(k, v)| (k, v.copy())).collect();
    tch::no_grad(|| {
        let vars: std::collections::HashMap<String, Tensor> =
            student.targets.store().variables().into_iter().chain(s_vs.variables()).collect();
        for (k, v) in &s_before {
            vars[k].shallow_clone().copy_(v);
        }
    });
    let kl0 = kl(&center);
    tch::no_grad(|| {
        let vars: std::collections::HashMap<String, Tensor> =
            student.targets.store().variables().into_iter().chain(s_vs.variables()).collect();
        for (k, v) in &trained {
            vars[k].shallow_clone().copy_(v);
        }
    });
    eprintln!("KL(teacher || student): untrained {kl0:.4}, trained {kl1:.4}");
    assert_eq!(summary.steps, 30);
    assert!(kl1 < 0.5 * kl0, "the student did not learn to match the teacher: KL {kl0:.4} -> {kl1:.4}");
    assert!(std::fs::read_to_string(out.join("loss.csv")).unwrap().lines().count() == 31);
    // The teacher moved (EMA of a moving student) but the shared backbone did not.
    let now = t_targets.store().variables();
    assert!(t_before.iter().any(|(k, v)| !now[k].equal(v)));
    let bbv = student.bb.vs.variables();
    // The checkpoint's own classifier is dropped when target parameters are attached; the rest is frozen.
    assert!(!bbv.keys().any(|k| k.starts_with("head.")));
    let kept = frozen.iter().filter(|(k, _)| !k.starts_with("head."));
    assert!(kept.clone().count() == bbv.len() && kept.clone().all(|(k, v)| bbv[k].equal(v)), "backbone changed");
}

/// `n` 32x32 grey image/mask pairs under `root/{images,masks}`: a bright disc (centre and radius from
/// `disc(i)`) on `background(x, y, i)`; the mask is the disc.
fn write_disc_pairs(
    root: &Path,
    n: u32,
    disc: impl Fn(u32) -> (f32, f32, f32),
    background: impl Fn(u32, u32, u32) -> u8,
) {
    let inside = |x: u32, y: u32, i: u32| {
        let (cx, cy, r) = disc(i);
        ((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)).sqrt() < r
    };
    common::write_pairs(root, n, (32, 32), inside, 220, background);
}

#[test]
fn segmentation_finetuning_learns_and_reports_dice() {
    // Synthetic polyps: a bright disc on noise; the mask is the disc.
    let root = tmp_dir("segtrain");
    write_disc_pairs(
        &root,
        60,
        |i| (8.0 + (i % 5) as f32 * 4.0, 8.0 + (i / 12) as f32 * 4.0, 5.0 + (i % 3) as f32),
        |x, y, i| ((x * 7 + y * 13 + i) % 60) as u8,
    );
    let out = root.join("run");
    let o = tpp_bin(&[
        "--threads",
        "1",
        "finetune",
        "--backbone",
        &backbone(),
        "--heads",
        "3",
        "--img-size",
        "32",
        "--data",
        root.to_str().unwrap(),
        "--norm",
        "half",
        "--peft",
        "lora",
        "--epochs",
        "12",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let dice = m["dice"].as_f64().unwrap();
    assert!(dice > 0.6, "test Dice {dice}");
    assert!(m["iou"].as_f64().unwrap() > 0.4 && m["ci95"]["dice"]["low"].as_f64().unwrap() <= dice);
    assert!(out.join("splits.csv").exists());
    // predict writes one mask per input image.
    let pred = root.join("pred");
    common::predict(&out, &root.join("images"), &pred);
    assert_eq!(std::fs::read_dir(&pred).unwrap().count(), 60);
}

#[test]
fn compare_on_segmentation_reports_dice() {
    let root = tmp_dir("segcompare");
    write_disc_pairs(&root, 30, |i| (10.0 + (i % 5) as f32 * 3.0, 10.0 + (i / 6) as f32 * 3.0, 6.0), |_, _, _| 20);
    let cfg = root.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "backbone = {:?}\ndata = {:?}\nheads = 3\nimg_size = 32\nnorm = \"half\"\nseeds = [0]\nreferences = []\n\
             [tpp]\nepochs = 1\ndecoder_dim = 32\ndecoder_depth = 1\ndecoder_heads = 2\n[finetune]\nepochs = 2\nbatch_size = 8\n",
            backbone(),
            root.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = root.join("out");
    let o = compare_run(&cfg, &out, &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("test metric `dice`") && report.contains("test iou"), "{report}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let m = r["variants"]["lora"]["mean"].as_f64().unwrap();
    let per = r["variants"]["lora"]["per_seed"][0]["metrics"]["dice"].as_f64().unwrap();
    assert!((m - per).abs() < 1e-12 && m > 0.0);
}

#[test]
fn linear_probe_on_cached_features_is_the_unaugmented_probe() {
    // Same seed, same shuffles, no augmentation: training the head on features computed once must give
    // the head that training through the frozen backbone gives.
    let dir = tmp_dir("cached-probe");
    let run = |name: &str, extra: &[&str]| {
        let out = dir.join(name);
        let mut args = finetune_args(&out, "4");
        let i = args.iter().position(|a| a == "lora").unwrap();
        args[i] = "linear".into();
        args.extend(["--crop-min-area", "1", "--no-hflip"].iter().chain(extra).map(|s| s.to_string()));
        let o = tpp_bin(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    let (a, b) = (run("through", &[]), run("cached", &["--cached-features"]));
    let load =
        |d: &Path| tpp::backbone::checkpoint::read_safetensors(&d.join("adapter/adapter_model.safetensors")).unwrap();
    let (ta, tb) = (load(&a), load(&b));
    assert_eq!(ta.keys().collect::<Vec<_>>(), tb.keys().collect::<Vec<_>>());
    for (k, v) in &ta {
        let d = (v - &tb[k]).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{k} differs by {d}");
    }
    let m = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("metrics.json")).unwrap()).unwrap()
    };
    let (x, y) = (m(&a)["auc"].as_f64().unwrap(), m(&b)["auc"].as_f64().unwrap());
    assert!((x - y).abs() < 1e-6, "test AUC {x} vs {y}");
    // The run's cost counts the feature pass, not the head's epochs alone.
    let h: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(b.join("history.json")).unwrap()).unwrap();
    let epochs: f64 = h.as_array().unwrap().iter().map(|e| e["seconds"].as_f64().unwrap()).sum();
    let secs = m(&b)["run"]["seconds"].as_f64().unwrap();
    assert!(secs > epochs, "run seconds {secs} leave out the feature pass (epochs {epochs})");
    // Resumed with no epoch left, it trains nothing and makes no second feature pass.
    run("cached", &["--cached-features", "--resume"]);
    let again = m(&b)["run"]["seconds"].as_f64().unwrap();
    assert_eq!(again, secs, "a resumed finished probe computed its features again");
}
