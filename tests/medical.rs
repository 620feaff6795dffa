//! Real DICOM (PyPI `pydicom-data`) and NIfTI (Debian `mricron-data`) files, installed by .ci/run; each
//! test skips with a message when its package is absent.
mod common;

use std::path::{Path, PathBuf};
use tpp::data::{DataOptions, Task};

fn pydicom_data() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let found = std::fs::read_dir(&root)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/data_store/data"))
        .find(|p| p.is_dir());
    if found.is_none() {
        eprintln!("SKIPPED: pydicom-data is not installed in .venv (.ci/run installs it)");
    }
    found
}

fn mricron() -> Option<PathBuf> {
    let p = PathBuf::from("/usr/share/mricron/templates");
    if p.join("ch2.nii.gz").exists() && p.join("aal.nii.gz").exists() {
        Some(p)
    } else {
        eprintln!("SKIPPED: Debian mricron-data is not installed (.ci/run installs it)");
        None
    }
}

#[test]
fn dicom_files_decode_or_fail_with_one_line_naming_the_file() {
    let Some(dir) = pydicom_data() else { return };
    let mut ok = 0;
    let mut failed = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "dcm") {
            continue;
        }
        match tpp::data::dicom::decode(&p, 32, None) {
            Ok(img) => {
                assert_eq!(img.dimensions(), (32, 32));
                ok += 1;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(msg.contains(p.file_name().unwrap().to_str().unwrap()) && !msg.contains('\n'), "{msg}");
                eprintln!("  {msg}");
                failed.push(p.file_name().unwrap().to_string_lossy().to_string());
            }
        }
    }
    eprintln!("{ok} DICOM files decoded; not decodable: {failed:?}");
    assert!(ok >= 62, "only {ok} decoded");
    // Uncompressed, RLE and JPEG-baseline multi-frame files all decode.
    for f in [
        "eCT_Supplemental.dcm",
        "emri_small.dcm",
        "emri_small_RLE.dcm",
        "emri_small_big_endian.dcm",
        "OBXXXX1A_rle_2frame.dcm",
        "SC_rgb.dcm",
        "color3d_jpeg_baseline.dcm",
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "MR2_J2KR.dcm",
        "US1_J2KI.dcm",
    ] {
        if dir.join(f).exists() {
            assert!(!failed.contains(&f.to_string()), "{f} failed");
        }
    }
    // 32-bit samples (read from the decoded bytes): the big-endian twin of a file gives the same values.
    for (le, be) in
        [("SC_rgb_32bit.dcm", "SC_rgb_expb_32bit.dcm"), ("SC_rgb_32bit_2frame.dcm", "SC_rgb_expb_32bit_2frame.dcm")]
    {
        let (le, be) = (dir.join(le), dir.join(be));
        if le.exists() && be.exists() {
            let (a, ..) = tpp::data::dicom::read_frame(&le).unwrap();
            let (b, ..) = tpp::data::dicom::read_frame(&be).unwrap();
            assert!(a == b, "{}: big- and little-endian files differ", le.display());
            assert!(a.iter().any(|&x| x != a[0]), "{}: constant image", le.display());
        }
    }
    // JPEG 2000 lossless gives back exactly the uncompressed file's values (same image, other syntax).
    let (raw, jp2) = (dir.join("emri_small.dcm"), dir.join("emri_small_jpeg_2k_lossless.dcm"));
    if raw.exists() && jp2.exists() {
        let (a, ra, ca, _) = tpp::data::dicom::read_frame(&raw).unwrap();
        let (b, rb, cb, _) = tpp::data::dicom::read_frame(&jp2).unwrap();
        assert_eq!((ra, ca), (rb, cb));
        assert!(a == b, "JPEG 2000 lossless differs from the uncompressed values");
    }
}

#[test]
fn dicom_rescale_and_window_are_applied() {
    let Some(dir) = pydicom_data() else { return };
    // An enhanced CT: stored values are unsigned, so Hounsfield units below zero (air) prove the rescale.
    let p = dir.join("eCT_Supplemental.dcm");
    if !p.exists() {
        return;
    }
    let (v, rows, cols, window) = tpp::data::dicom::read_frame(&p).unwrap();
    assert_eq!(v.len(), (rows * cols) as usize);
    let min = v.iter().copied().fold(f32::INFINITY, f32::min);
    assert!(min < -500.0, "min {min}: rescale intercept not applied?");
    let w = tpp::data::dicom::window_u8(&v, Some((40.0, 400.0)));
    // A soft-tissue window maps -160 HU and below to 0 and 240 HU and above to 255.
    for (x, y) in v.iter().zip(&w) {
        if *x <= -160.0 {
            assert_eq!(*y, 0);
        } else if *x >= 240.0 {
            assert_eq!(*y, 255);
        }
    }
    let _ = window;
    // A manifest of DICOM files is a classification dataset.
    let tmp = common::tmp_dir("dcm-manifest");
    let mut csv = String::from("path,label\n");
    for (i, f) in [
        "eCT_Supplemental.dcm",
        "emri_small.dcm",
        "MR2_UNCR.dcm",
        "RG1_UNCR.dcm",
        "US1_UNCR.dcm",
        "693_UNCR.dcm",
        "RG3_UNCR.dcm",
        "MR2_UNCI.dcm",
        "emri_small_RLE.dcm",
        "OBXXXX1A.dcm",
    ]
    .iter()
    .enumerate()
    {
        if dir.join(f).exists() {
            csv.push_str(&format!("{},{}\n", dir.join(f).display(), i % 2));
        }
    }
    std::fs::write(tmp.join("m.csv"), csv).unwrap();
    let (ds, _) = tpp::data::open_with(
        &tmp.join("m.csv"),
        &DataOptions { image_size: Some(32), grey: true, ..Default::default() },
    )
    .unwrap();
    assert_eq!((ds.task, ds.channels()), (Task::Binary, 1));
}

#[test]
fn nifti_volume_with_atlas_labels_gives_axial_slice_masks() {
    let Some(dir) = mricron() else { return };
    let o = DataOptions {
        image_size: Some(32),
        mask_classes: 2,
        labels: Some(dir.join("aal.nii.gz")),
        ..Default::default()
    };
    let (ds, _) = tpp::data::open_with(&dir.join("ch2.nii.gz"), &o).unwrap();
    assert_eq!((ds.task, ds.num_classes), (Task::Segmentation, 2));
    assert_eq!(ds.train.len() + ds.val.len() + ds.test.len(), 181);
    assert_eq!(ds.train.images.size()[1..], [1, 32, 32]);
    // The atlas covers grey matter: some slices have labels, the top and bottom ones none.
    let fg = ds.train.labels.sum(tch::Kind::Int64).int64_value(&[]);
    assert!(fg > 0);
    // Multi-class: AAL's 116 regions do not fit 50 classes: a clear error.
    let o = DataOptions { mask_classes: 50, ..o };
    let e = format!("{:#}", tpp::data::open_with(&dir.join("ch2.nii.gz"), &o).err().unwrap());
    assert!(e.contains("aal.nii.gz") && e.contains("--mask-classes"), "{e}");
    // A label volume of another shape is refused, naming it.
    let o = DataOptions {
        image_size: Some(32),
        mask_classes: 2,
        labels: Some(dir.join("JHU-WhiteMatter-labels-2mm.nii.gz")),
        ..Default::default()
    };
    let e = format!("{:#}", tpp::data::open_with(&dir.join("ch2.nii.gz"), &o).err().unwrap());
    assert!(e.contains("JHU-WhiteMatter-labels-2mm.nii.gz") && e.contains("label volume is"), "{e}");
}
