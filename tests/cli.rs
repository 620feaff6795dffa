//! The `tpp` binary as a user runs it: inspect, embed, and one-line errors on bad input.
mod common;

use common::{fixture, rel_err, shared, tmp_dir};
use std::process::Command;
use tpp::backbone::checkpoint::read_safetensors;

fn tpp(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tpp")).args(args).env("RUST_LOG", "warn").output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn inspect_reports_format_architecture_and_unused_keys() {
    let f = fixture("hf_vitmae/model.safetensors");
    let (ok, out, err) = tpp(&["inspect", f.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("Hugging Face ViTMAE"), "{out}");
    assert!(out.contains("width 64, depth 2, heads 4"), "{out}");
    assert!(out.contains("MAE decoder:  width 32, depth 1, heads 4"), "{out}");
    assert!(out.contains("unused keys:  none"), "{out}");
    if let Some(real) = shared("weights/dinov2-vits14-imgfocus/model.safetensors") {
        let (ok, out, _) = tpp(&["inspect", real.to_str().unwrap()]);
        assert!(ok);
        assert!(out.contains("parameters:   22056192"), "{out}");
        assert!(out.contains("unused keys:  20") && out.contains("decoder.final_conv.weight"), "{out}");
    }
}

#[test]
fn embed_npy_matches_reference_features() {
    let dir = tmp_dir("embed");
    let io = read_safetensors(&fixture("timm_vit_p16_io.safetensors")).unwrap();
    let input = dir.join("x.npy");
    tpp::data::npy::write_f32(&input, &io["input"]).unwrap();
    let out = dir.join("f.npy");
    let ck = fixture("timm_vit_p16.safetensors");
    let (ok, _, err) = tpp(&[
        "embed",
        "--backbone",
        ck.to_str().unwrap(),
        "--heads",
        "4",
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--batch-size",
        "1",
    ]);
    assert!(ok, "{err}");
    let f = tpp::data::npy::read_f32(&out).unwrap();
    assert!(rel_err(&f, &io["pooled"]) < 1e-4);
}

#[test]
fn embed_image_folder_writes_one_row_per_image() {
    let dir = tmp_dir("embed-img");
    let imgs = dir.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    for i in 0..3u8 {
        let img = image::RgbImage::from_fn(40, 30, |x, y| image::Rgb([x as u8 * 5, y as u8 * 7, i * 60]));
        img.save(imgs.join(format!("{i}.png"))).unwrap();
    }
    std::fs::write(imgs.join("notes.txt"), "ignored").unwrap();
    let out = dir.join("f.npy");
    let ck = fixture("hf_dinov2/model.safetensors");
    let (ok, _, err) = tpp(&[
        "embed",
        "--backbone",
        ck.to_str().unwrap(),
        "--input",
        imgs.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let f = tpp::data::npy::read_f32(&out).unwrap();
    assert_eq!(f.size(), vec![3, 64]);
    // Different images, different features.
    assert!(rel_err(&f.get(0), &f.get(2)) > 1e-3);
}

#[test]
fn bad_input_is_one_line_error_naming_the_file() {
    let dir = tmp_dir("cli-bad");
    let ck = fixture("timm_vit_p16.safetensors");
    let cases: Vec<(Vec<String>, &str)> = {
        let junk = dir.join("junk.safetensors");
        std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
        let bad_img = dir.join("broken.png");
        std::fs::write(&bad_img, b"\x89PNG\r\n\x1a\n garbage").unwrap();
        let wrong = dir.join("wrong.npy");
        tpp::data::npy::write_f32(&wrong, &tch::Tensor::zeros([2, 3, 50, 50], (tch::Kind::Float, tch::Device::Cpu)))
            .unwrap();
        let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
        vec![
            (vec!["inspect".into(), s(&junk)], "junk.safetensors"),
            (vec!["inspect".into(), s(&dir.join("nope.safetensors"))], "nope.safetensors"),
            (
                vec![
                    "embed".into(),
                    "--backbone".into(),
                    s(&ck),
                    "--input".into(),
                    s(&bad_img),
                    "--output".into(),
                    s(&dir.join("o.npy")),
                ],
                "broken.png",
            ),
            (
                vec![
                    "embed".into(),
                    "--backbone".into(),
                    s(&ck),
                    "--input".into(),
                    s(&wrong),
                    "--output".into(),
                    s(&dir.join("o.npy")),
                ],
                "wrong.npy",
            ),
            (vec!["--device".into(), "cuda:7".into(), "inspect".into(), s(&ck)], "cuda:7"),
        ]
    };
    for (args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = tpp(&args);
        assert!(!ok, "{args:?} should fail");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}
