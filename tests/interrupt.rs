//! Killed long-running commands (SIGKILL at a random point after they started writing): no output looks
//! finished, and running the same command again reaches the result of an uninterrupted run. (Fine-tuning's
//! resume is tested in `train.rs`.)
mod common;

use common::{fixture, tmp_dir};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn data() -> String {
    fixture("../../data/breastmnist.npz").to_str().unwrap().to_string()
}

fn tpp(args: &[String]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tpp"));
    c.args(["--threads", "1"]).args(args).env("RUST_LOG", "warn");
    c
}

fn succeed(args: &[String]) {
    let o = tpp(args).output().unwrap();
    assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Starts the command, waits until `started` exists, kills it (SIGKILL) and returns.
fn kill_once(args: &[String], started: &Path) {
    let mut child = tpp(args).stderr(std::process::Stdio::null()).spawn().unwrap();
    let t0 = Instant::now();
    while !started.exists() && t0.elapsed() < Duration::from_secs(120) {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let _ = child.wait();
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn partial(out: &Path) -> PathBuf {
    out.with_file_name(format!("{}.partial", out.file_name().unwrap().to_str().unwrap()))
}

#[test]
fn a_killed_tpp_stage_leaves_nothing_finished_and_its_rerun_matches() {
    let dir = tmp_dir("kill-tpp");
    let stage = |out: &Path| {
        let b = fixture("timm_vit_avg_fcnorm.safetensors");
        let mut v =
            strings(&["pretrain-targets", "--backbone", b.to_str().unwrap(), "--heads", "3", "--img-size", "32"]);
        v.extend(strings(&[
            "--data",
            &data(),
            "--norm",
            "half",
            "--peft",
            "lora",
            "--epochs",
            "8",
            "--batch-size",
            "32",
        ]));
        v.extend(strings(&["--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2"]));
        v.extend(strings(&["--out", out.to_str().unwrap()]));
        v
    };
    let (a, b) = (dir.join("a"), dir.join("b"));
    succeed(&stage(&a));
    // Killed once the first epoch saved its targets.
    kill_once(&stage(&b), &partial(&b).join("targets/adapter_model.safetensors"));
    assert!(!b.exists(), "a killed stage must not look finished");
    assert!(partial(&b).exists(), "the stage was killed before it started writing; the test needs a slower run");
    succeed(&stage(&b));
    assert!(!partial(&b).exists());
    let read = |d: &Path| std::fs::read(d.join("targets/adapter_model.safetensors")).unwrap();
    assert!(read(&a) == read(&b), "the rerun's target parameters differ from an uninterrupted run's");
}

#[test]
fn a_killed_backbone_pretraining_leaves_nothing_loadable_and_its_rerun_matches() {
    let dir = tmp_dir("kill-backbone");
    let stage = |out: &Path| {
        let mut v =
            strings(&["pretrain-backbone", "--arch", "vit_tiny_patch16_224", "--patch-size", "4", "--embed-dim", "32"]);
        v.extend(strings(&["--depth", "2", "--heads", "2", "--data", &data(), "--norm", "half", "--epochs", "6"]));
        v.extend(strings(&[
            "--batch-size",
            "64",
            "--decoder-dim",
            "32",
            "--decoder-depth",
            "1",
            "--decoder-heads",
            "2",
        ]));
        v.extend(strings(&["--out", out.to_str().unwrap()]));
        v
    };
    let (a, b) = (dir.join("a"), dir.join("b"));
    succeed(&stage(&a));
    kill_once(&stage(&b), &partial(&b).join("backbone.safetensors"));
    // Before: a partial backbone.safetensors without config.json, later read with the wrong heads.
    assert!(!b.join("backbone.safetensors").exists(), "a killed pre-training left a loadable backbone");
    assert!(partial(&b).exists(), "killed before it started writing; the test needs a slower run");
    succeed(&stage(&b));
    let read = |d: &Path| std::fs::read(d.join("backbone.safetensors")).unwrap();
    assert!(read(&a) == read(&b), "the rerun's backbone differs from an uninterrupted run's");
}

#[test]
fn a_killed_comparison_continues_to_the_uninterrupted_results() {
    let dir = tmp_dir("kill-compare");
    let cfg = dir.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "backbone = {:?}\ndata = {:?}\nheads = 3\nimg_size = 32\nnorm = \"half\"\nseeds = [0]\nreferences = [\"linear\"]\n\
             [tpp]\nepochs = 2\ndecoder_dim = 32\ndecoder_depth = 1\ndecoder_heads = 2\n[finetune]\nepochs = 4\n",
            fixture("timm_vit_avg_fcnorm.safetensors").to_str().unwrap(),
            data()
        ),
    )
    .unwrap();
    let compare = |out: &Path| strings(&["compare", "--config", cfg.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    let (a, b) = (dir.join("a"), dir.join("b"));
    succeed(&compare(&a));
    // Killed in the middle of the second fine-tuning run (after its first checkpoint).
    kill_once(&compare(&b), &b.join("runs/lora+tpp/seed0/checkpoint/state.json"));
    assert!(!b.join("report.md").exists(), "the comparison finished before it could be killed");
    succeed(&compare(&b));
    let results = |d: &Path| -> serde_json::Value {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("results.json")).unwrap()).unwrap();
        let metrics = |variant: &str| v["variants"][variant]["per_seed"][0]["metrics"].clone();
        serde_json::json!([metrics("lora"), metrics("lora+tpp"), metrics("linear"), v["delta"].clone()])
    };
    assert_eq!(results(&a), results(&b));
}
