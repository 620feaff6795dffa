//! Helpers shared by the integration tests.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use tch::Tensor;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// `../shared` beside the project, or None (with a message) when absent: tests over it then skip.
pub fn shared(rel: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared").join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is absent (the ../shared material is not available here)", p.display());
        None
    }
}

/// max |a - b| / max |b|: the relative error the parity tests bound.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    let diff = (a - b).abs().max().double_value(&[]);
    let scale = b.abs().max().double_value(&[]).max(1e-12);
    diff / scale
}

pub fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tpp-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The `tpp` binary run with `args`.
pub fn tpp_bin(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tpp")).args(args).output().unwrap()
}

/// `tpp predict` of the run in `run` for `input` into `out`; asserts it succeeded.
pub fn predict(run: &Path, input: &Path, out: &Path) {
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let o = tpp_bin(&["predict", "--run", &s(run), "--input", &s(input), "--out", &s(out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `n` grey `w` x `h` segmentation pairs in `root/images` and `root/masks` (`{i}.png`): a pixel is
/// foreground (bright, mask 255) where `fg(x, y, i)`, else background `bg(x, y, i)` (mask 0).
pub fn write_pairs(
    root: &Path,
    n: u32,
    (w, h): (u32, u32),
    fg: impl Fn(u32, u32, u32) -> bool,
    bright: u8,
    bg: impl Fn(u32, u32, u32) -> u8,
) {
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    for i in 0..n {
        let px = |x, y| image::Luma([if fg(x, y, i) { bright } else { bg(x, y, i) }]);
        image::GrayImage::from_fn(w, h, px).save(root.join("images").join(format!("{i}.png"))).unwrap();
        let m = |x, y| image::Luma([if fg(x, y, i) { 255u8 } else { 0 }]);
        image::GrayImage::from_fn(w, h, m).save(root.join("masks").join(format!("{i}.png"))).unwrap();
    }
}
