//! tpp as a stand-alone program: the demo from any folder with the data inside the binary, the
//! pre-trained demo's backbone missing or given, progress lines for batch jobs, `--device auto`.
mod common;

use common::{fixture, shared, tmp_dir};
use std::path::Path;
use std::process::{Command, Output};

fn tpp(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tpp"));
    c.current_dir(dir).args(args).env("RUST_LOG", "info");
    for (k, v) in envs {
        // An empty value removes the variable.
        if v.is_empty() {
            c.env_remove(k);
        } else {
            c.env(k, v);
        }
    }
    c.output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn finetune_args(out: &Path) -> Vec<String> {
    let bb = fixture("timm_vit_avg_fcnorm.safetensors");
    let data = fixture("../../data/breastmnist.npz");
    let v = ["finetune", "--backbone", bb.to_str().unwrap(), "--heads", "3", "--img-size", "32", "--norm", "half"];
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    let rest = ["--data", data.to_str().unwrap(), "--peft", "lora", "--epochs", "2", "--batch-size", "128"];
    v.extend(rest.iter().map(|s| s.to_string()));
    v.extend(["--out".to_string(), out.to_str().unwrap().to_string()]);
    v
}

#[test]
fn without_a_terminal_progress_comes_as_lines_and_quiet_silences_them() {
    let dir = tmp_dir("progress-lines");
    let args = finetune_args(&dir.join("a"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Interval 0: a line at every update (the default is one every 30 s), plus one per epoch.
    let o = tpp(&dir, &args, &[("TPP_LOG_INTERVAL", "0")]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("fine-tune ")).collect();
    // 546 training images in batches of 128: 5 updates per epoch, 10 in all, and 2 epoch lines.
    assert_eq!(lines.len(), 12, "{err}");
    assert!(lines[0].starts_with("fine-tune 1/10 (10%, ETA ") && lines[0].contains("epoch 1 loss "), "{err}");
    assert!(lines[0].ends_with(" img/s"), "{err}");
    assert!(lines.iter().any(|l| l.starts_with("fine-tune 5/10 (50%") && l.contains("val auc ")), "{err}");
    assert!(lines[11].starts_with("fine-tune 10/10 (100%") && lines[11].contains("epoch 2 loss"), "{err}");
    // The default interval: the epoch lines only, on so short a run.
    let o = tpp(&dir, &[&args[..args.len() - 1], &[dir.join("b").to_str().unwrap()]].concat(), &[]);
    let n = stderr(&o).lines().filter(|l| l.starts_with("fine-tune ")).count();
    assert!(o.status.success() && n == 2, "{}", stderr(&o));
    // -q: warnings and errors only.
    let mut quiet = vec!["-q"];
    quiet.extend(&args[..args.len() - 1]);
    let c = dir.join("c");
    quiet.push(c.to_str().unwrap());
    // (RUST_LOG, when set, would decide instead of -q.)
    let o = tpp(&dir, &quiet, &[("TPP_LOG_INTERVAL", "0"), ("RUST_LOG", "")]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o), "");
}

#[test]
fn device_auto_is_the_default_and_says_what_it_chose() {
    let dir = tmp_dir("device-auto");
    let args = finetune_args(&dir.join("a"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = tpp(&dir, &args, &[]);
    let first = stderr(&o).lines().next().unwrap_or_default().to_string();
    assert!(o.status.success());
    // This machine may or may not have a GPU: the line names what was chosen either way.
    assert!(
        first.starts_with("device: cpu, ") && first.ends_with("(--device auto: no CUDA device found)")
            || first.starts_with("device: cuda:0 (") && first.ends_with("(--device auto)"),
        "{first}"
    );
    let o = tpp(&dir, &["--device", "gpu", "inspect", "x"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--device 'gpu': unknown (expected auto, cpu, cuda or cuda:N)"), "{}", stderr(&o));
}

#[test]
fn the_demo_runs_anywhere_from_the_data_inside_the_binary() {
    // A folder outside the repository, as after `cargo install`: nothing but the binary.
    let dir = tmp_dir("demo-anywhere");
    let o = tpp(&dir, &["demo", "--from-scratch", "--quick", "--threads", "2"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.join("runs/demo-from-scratch");
    for f in ["breastmnist.npz", "pneumoniamnist.npz"] {
        let repo = std::fs::read(fixture("../../data").join(f)).unwrap();
        assert_eq!(std::fs::read(out.join("data").join(f)).unwrap(), repo, "{f}");
    }
    let report = std::fs::read_to_string(out.join("compare/report.md")).unwrap();
    assert!(report.contains("| lora+tpp |") && report.contains("| full |"), "{report}");
    // A data copy that is not the embedded one is never overwritten.
    std::fs::write(out.join("data/breastmnist.npz"), b"changed").unwrap();
    let o = tpp(&dir, &["demo", "--from-scratch", "--quick"], &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("differs from the demo's embedded copy"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("data/breastmnist.npz")).unwrap(), b"changed");
}

#[test]
fn the_pretrained_demo_says_how_to_get_its_backbone_and_runs_with_one() {
    let dir = tmp_dir("demo-pretrained");
    let cache = dir.join("cache");
    let o = tpp(&dir, &["demo", "--quick"], &[("TPP_CACHE_DIR", cache.to_str().unwrap())]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    let want = cache.join("models/dinov2-vits14-imgfocus/model.safetensors");
    assert!(err.contains(&format!("{}: the demo's backbone is not there; `make demo`", want.display())), "{err}");
    assert!(err.contains("--from-scratch") && err.lines().count() <= 3, "{err}");
    // With the real ViT-S/14 (development machines only) the quick pre-trained demo runs end to end.
    let Some(real) = shared("weights/dinov2-vits14-imgfocus/model.safetensors") else { return };
    let o = tpp(&dir, &["demo", "--quick", "--backbone", real.to_str().unwrap(), "--out", "d"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = std::fs::read_to_string(dir.join("d/compare/report.md")).unwrap();
    assert!(report.contains("| lora+tpp |") && report.contains("| linear |"), "{report}");
}

#[test]
fn tpp_names_a_model_in_its_models_folder() {
    let dir = tmp_dir("named-model");
    let cache = dir.join("cache");
    let env = [("TPP_CACHE_DIR", cache.to_str().unwrap())];
    let o = tpp(&dir, &["inspect", "tpp:dinov2-vits14-imgfocus"], &env);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("models/dinov2-vits14-imgfocus/model.safetensors does not exist (`make demo`"), "{err}");
    let o = tpp(&dir, &["inspect", "tpp:../x"], &env);
    assert!(o.status.code() == Some(2) && stderr(&o).contains("not a model name"), "{}", stderr(&o));
    let m = cache.join("models/small");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::copy(fixture("hf_vitmae/model.safetensors"), m.join("model.safetensors")).unwrap();
    std::fs::copy(fixture("hf_vitmae/config.json"), m.join("config.json")).unwrap();
    let o = tpp(&dir, &["inspect", "tpp:small"], &env);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("width 64, depth 2, heads 4"));
}
