//! A seeded mutation fuzz test on stable Rust: random byte mutations of valid npz, safetensors, PNG, DICOM,
//! NIfTI and CSV files, each read by its loader, which must return (an error is fine) and never panic.
//! `TPP_FUZZ_ITERS` sets the mutations per format (default 20, for CI); a failure names the seed and
//! iteration, which reproduce it.
mod common;

use common::{fixture, tmp_dir};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

fn iterations() -> usize {
    std::env::var("TPP_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

/// One random mutation: flipped bytes, a deleted or repeated run, a truncation, or bytes set to extremes.
fn mutate(bytes: &[u8], rng: &mut ChaCha8Rng) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let n = b.len().max(1);
    match rng.random_range(0..5) {
        0 => {
            for _ in 0..rng.random_range(1..16) {
                let i = rng.random_range(0..n.min(b.len()).max(1));
                if let Some(x) = b.get_mut(i) {
                    *x ^= 1 << rng.random_range(0..8);
                }
            }
        }
        1 => {
            let i = rng.random_range(0..n);
            let len = rng.random_range(1..64.min(n - i) + 1);
            b.drain(i..(i + len).min(b.len()));
        }
        2 => {
            let i = rng.random_range(0..n);
            let len = rng.random_range(1..256.min(n - i) + 1);
            let chunk: Vec<u8> = b[i..(i + len).min(b.len())].to_vec();
            b.splice(i..i, chunk);
        }
        3 => b.truncate(rng.random_range(0..n)),
        _ => {
            // Header-sized fields are where lengths and shapes live.
            let i = rng.random_range(0..n.min(512));
            for x in b.iter_mut().skip(i).take(rng.random_range(1..9)) {
                *x = if rng.random_bool(0.5) { 0xff } else { 0x00 };
            }
        }
    }
    b
}

/// Mutates `valid` `iterations()` times into `path` and calls `read` on each; panics are collected.
fn fuzz(name: &str, valid: &[u8], path: &Path, read: impl Fn(&Path)) {
    let mut panicked = Vec::new();
    for it in 0..iterations() {
        let seed = 0x7470_7000 + it as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        std::fs::write(path, mutate(valid, &mut rng)).unwrap();
        if catch_unwind(AssertUnwindSafe(|| read(path))).is_err() {
            panicked.push(format!("{name}: seed {seed:#x} (iteration {it})"));
        }
    }
    assert!(panicked.is_empty(), "loaders panicked on mutated input:\n{}", panicked.join("\n"));
}

#[test]
fn mutated_npz_files_never_panic() {
    let valid = std::fs::read(fixture("../../data/breastmnist.npz")).unwrap();
    let p = tmp_dir("fuzz-npz").join("m.npz");
    fuzz("npz", &valid, &p, |p| {
        let _ = tpp::data::open(p, None);
    });
}

#[test]
fn mutated_safetensors_files_never_panic() {
    let valid = std::fs::read(fixture("timm_vit_p16.safetensors")).unwrap();
    let p = tmp_dir("fuzz-st").join("m.safetensors");
    let opts = tpp::LoadOptions { num_heads: Some(4), ..Default::default() };
    fuzz("safetensors", &valid, &p, |p| {
        let _ = tpp::Backbone::load(p, &opts, tch::Device::Cpu);
    });
}

#[test]
fn mutated_png_files_never_panic() {
    let dir = tmp_dir("fuzz-png");
    let src = dir.join("valid.png");
    image::RgbImage::from_fn(24, 20, |x, y| image::Rgb([x as u8 * 9, y as u8 * 11, 77])).save(&src).unwrap();
    let valid = std::fs::read(&src).unwrap();
    let norm = tpp::data::transforms::Norm::IMAGENET;
    fuzz("png", &valid, &dir.join("m.png"), |p| {
        let _ = tpp::data::images::load_image(p, 16, false, &norm);
    });
}

/// A small valid NIfTI-1 volume (float32, 6 x 5 x 4), written by hand from the format's header layout.
fn nifti(values: impl Fn(usize) -> f32) -> Vec<u8> {
    let mut h = vec![0u8; 352];
    h[0..4].copy_from_slice(&348i32.to_le_bytes());
    for (i, d) in [3i16, 6, 5, 4, 1, 1, 1, 1].iter().enumerate() {
        h[40 + 2 * i..42 + 2 * i].copy_from_slice(&d.to_le_bytes());
    }
    h[70..72].copy_from_slice(&16i16.to_le_bytes()); // datatype float32
    h[72..74].copy_from_slice(&32i16.to_le_bytes()); // bitpix
    for (i, v) in [1f32, 1.0, 1.0, 1.0].iter().enumerate() {
        h[76 + 4 * i..80 + 4 * i].copy_from_slice(&v.to_le_bytes()); // pixdim
    }
    h[108..112].copy_from_slice(&352f32.to_le_bytes()); // vox_offset
    h[112..116].copy_from_slice(&1f32.to_le_bytes()); // scl_slope
    h[344..348].copy_from_slice(b"n+1\0");
    for i in 0..6 * 5 * 4 {
        h.extend_from_slice(&values(i).to_le_bytes());
    }
    h
}

#[test]
fn mutated_nifti_volumes_never_panic() {
    let dir = tmp_dir("fuzz-nii");
    let labels = dir.join("labels.nii");
    std::fs::write(&labels, nifti(|i| (i % 3 == 0) as u8 as f32)).unwrap();
    let image = nifti(|i| (i as f32 * 0.37).sin());
    let o = tpp::data::DataOptions {
        image_size: Some(8),
        mask_classes: 2,
        labels: Some(labels.clone()),
        ..Default::default()
    };
    // The valid pair reads (the fuzzing starts from something the loader accepts).
    std::fs::write(dir.join("valid.nii"), &image).unwrap();
    tpp::data::open_with(&dir.join("valid.nii"), &o).unwrap();
    fuzz("nifti", &image, &dir.join("m.nii"), |p| {
        let _ = tpp::data::open_with(p, &o);
    });
}

/// Small DICOM files from PyPI's pydicom-data (native, RLE and JPEG 2000 pixel data), when installed.
fn dicom_samples() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let Some(dir) = std::fs::read_dir(&root).ok().and_then(|d| {
        d.filter_map(|e| e.ok()).map(|e| e.path().join("site-packages/data_store/data")).find(|p| p.is_dir())
    }) else {
        return Vec::new();
    };
    ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect()
}

#[test]
fn mutated_dicom_files_never_panic() {
    let samples = dicom_samples();
    if samples.is_empty() {
        eprintln!("SKIPPED: pydicom-data is not installed in .venv (.ci/run installs it)");
        return;
    }
    let dir = tmp_dir("fuzz-dcm");
    for src in samples {
        let valid = std::fs::read(&src).unwrap();
        let name = src.file_name().unwrap().to_string_lossy().into_owned();
        fuzz(&name, &valid, &dir.join("m.dcm"), |p| {
            let _ = tpp::data::dicom::decode(p, 16, None);
        });
    }
}

#[test]
fn mutated_csv_manifests_never_panic() {
    let dir = tmp_dir("fuzz-csv");
    let mut text = String::from("path,label\n");
    for i in 0..9 {
        image::GrayImage::from_pixel(10, 10, image::Luma([i * 20])).save(dir.join(format!("{i}.png"))).unwrap();
        text.push_str(&format!("{i}.png,{}\n", ["x", "y", "z"][i as usize % 3]));
    }
    let o = tpp::data::DataOptions { image_size: Some(8), ..Default::default() };
    std::fs::write(dir.join("valid.csv"), &text).unwrap();
    tpp::data::open_with(&dir.join("valid.csv"), &o).unwrap();
    fuzz("csv", text.as_bytes(), &dir.join("m.csv"), |p| {
        let _ = tpp::data::open_with(p, &o);
    });
}
