//! Dataset formats: image folders, CSV manifests, segmentation pairs, splits, bad files.
mod common;

use common::tmp_dir;
use std::path::Path;
use tpp::data::{DataOptions, Task, open_with};

fn write_png(p: &Path, w: u32, h: u32, seed: u8) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x as u8).wrapping_mul(seed), (y as u8).wrapping_add(seed), seed])
    });
    img.save(p).unwrap();
}

fn opts(size: i64) -> DataOptions {
    DataOptions { image_size: Some(size), mask_classes: 2, ..Default::default() }
}

#[test]
fn image_folder_and_csv_manifest_with_seeded_stratified_splits() {
    let root = tmp_dir("folder");
    for (c, n) in [("benign", 20), ("malignant", 10)] {
        std::fs::create_dir_all(root.join(c)).unwrap();
        for i in 0..n {
            write_png(&root.join(c).join(format!("{i}.png")), 20 + i as u32, 16, i as u8 + 1);
        }
    }
    let (ds, files) = open_with(&root, &opts(16)).unwrap();
    assert_eq!((ds.task, ds.num_classes), (Task::Binary, 2));
    assert_eq!(ds.train.images.size(), vec![ds.train.len(), 3, 16, 16]);
    assert_eq!(ds.train.len() + ds.val.len() + ds.test.len(), 30);
    // 20% test per class: 4 + 2.
    assert_eq!(ds.test.len(), 6);
    let counts = tpp::data::dataset::class_counts(&ds.test, 2);
    assert_eq!(counts, vec![4, 2]);
    // The same split every time (seeded), recorded with file names.
    let (ds2, files2) = open_with(&root, &opts(16)).unwrap();
    assert!(ds.test.labels.equal(&ds2.test.labels) && ds.test.images.equal(&ds2.test.images));
    assert_eq!(files.as_ref().unwrap().1, files2.unwrap().1);
    let (f, parts) = files.unwrap();
    tpp::data::folder::write_splits(&root.join("splits.csv"), &f, &parts).unwrap();
    assert_eq!(std::fs::read_to_string(root.join("splits.csv")).unwrap().lines().count(), 31);

    // CSV manifest with paths relative to it, multi-class labels by name.
    let mut csv = String::from("path,label\n");
    for i in 0..10 {
        csv.push_str(&format!("benign/{i}.png,{}\n", ["a", "b", "c"][i % 3]));
    }
    std::fs::write(root.join("m.csv"), &csv).unwrap();
    let (ds, _) = open_with(&root.join("m.csv"), &opts(8)).unwrap();
    assert_eq!((ds.task, ds.num_classes), (Task::Multiclass, 3));
    // Multi-label columns.
    std::fs::write(root.join("ml.csv"), "path,effusion,nodule\nbenign/0.png,1,0\nbenign/1.png,0,1\nbenign/2.png,1,1\nbenign/3.png,0,0\nbenign/4.png,1,0\nbenign/5.png,0,1\nbenign/6.png,1,1\nbenign/7.png,0,1\nbenign/8.png,1,0\nbenign/9.png,1,1\n").unwrap();
    let (ds, _) = open_with(&root.join("ml.csv"), &opts(8)).unwrap();
    assert_eq!((ds.task, ds.num_classes), (Task::Multilabel, 2));
    assert_eq!(ds.train.labels.size()[1], 2);
}

#[test]
fn bad_files_are_named_or_skipped() {
    let root = tmp_dir("badfolder");
    for c in ["a", "b"] {
        std::fs::create_dir_all(root.join(c)).unwrap();
        for i in 0..8 {
            write_png(&root.join(c).join(format!("{i}.png")), 12, 12, i + 1);
        }
    }
    std::fs::write(root.join("a").join("broken.png"), b"not a png").unwrap();
    let e = format!("{:#}", open_with(&root, &opts(8)).err().unwrap());
    assert!(e.contains("broken.png") && e.contains("cannot decode") && e.contains("--skip-bad"), "{e}");
    let (ds, _) = open_with(&root, &DataOptions { skip_bad: true, ..opts(8) }).unwrap();
    assert_eq!(ds.train.len() + ds.val.len() + ds.test.len(), 16);
    // Empty class folder.
    std::fs::create_dir_all(root.join("c")).unwrap();
    let e = format!("{:#}", open_with(&root, &DataOptions { skip_bad: true, ..opts(8) }).err().unwrap());
    assert!(e.contains("class folder has no images"), "{e}");
    // CSV with a missing field and a bad multi-label value.
    std::fs::write(root.join("x.csv"), "path,label\na/0.png\n").unwrap();
    assert!(format!("{:#}", open_with(&root.join("x.csv"), &opts(8)).err().unwrap()).contains("line 2"));
    std::fs::write(root.join("y.csv"), "path,l1,l2\na/0.png,1,7\n").unwrap();
    assert!(format!("{:#}", open_with(&root.join("y.csv"), &opts(8)).err().unwrap()).contains("must be 0 or 1"));
}

#[test]
fn segmentation_pairs_binarise_masks_and_check_sizes() {
    let root = tmp_dir("seg");
    std::fs::create_dir_all(root.join("images")).unwrap();
    std::fs::create_dir_all(root.join("masks")).unwrap();
    for i in 0..12u32 {
        write_png(&root.join("images").join(format!("{i}.png")), 32, 24, i as u8 + 1);
        // Left half foreground (with "compression noise" values 250 and 3).
        let m = image::GrayImage::from_fn(32, 24, |x, _| image::Luma([if x < 16 { 250 } else { 3 }]));
        m.save(root.join("masks").join(format!("{i}.png"))).unwrap();
    }
    let (ds, _) = open_with(&root, &opts(16)).unwrap();
    assert_eq!((ds.task, ds.num_classes), (Task::Segmentation, 2));
    assert_eq!(ds.train.labels.size(), vec![ds.train.len(), 16, 16]);
    let fg = ds.train.labels.sum(tch::Kind::Int64).int64_value(&[]);
    assert_eq!(fg, ds.train.len() * 16 * 8, "left half is foreground");
    // A mask of another size is an error naming it.
    image::GrayImage::new(10, 10).save(root.join("masks").join("3.png")).unwrap();
    let e = format!("{:#}", open_with(&root, &opts(16)).err().unwrap());
    assert!(e.contains("3.png") && e.contains("mask is 10x10 but the image is 32x24"), "{e}");
    let (ds, _) = open_with(&root, &DataOptions { skip_bad: true, ..opts(16) }).unwrap();
    assert_eq!(ds.train.len() + ds.val.len() + ds.test.len(), 11);
}

#[test]
fn kvasir_seg_from_shared_loads() {
    let Some(root) = common::shared("data/kvasir-seg") else { return };
    let (ds, _) = open_with(&root, &opts(32)).unwrap();
    assert_eq!((ds.task, ds.num_classes), (Task::Segmentation, 2));
    assert_eq!(ds.train.len() + ds.val.len() + ds.test.len(), 1000);
    let frac = ds.test.labels.to_kind(tch::Kind::Float).mean(tch::Kind::Float).double_value(&[]);
    assert!(frac > 0.05 && frac < 0.4, "polyp pixel fraction {frac}");
}

#[test]
fn chase_db1_from_shared_loads_at_its_own_resolution() {
    let Some(root) = common::shared("data/chase-db1") else { return };
    // Size 0: the files' own size (native-resolution segmentation).
    let (ds, _) = open_with(&root, &opts(0)).unwrap();
    assert_eq!(ds.train.len() + ds.val.len() + ds.test.len(), 28);
    assert_eq!(ds.train.images.size()[1..], [3, 960, 999]);
    assert_eq!(ds.train.labels.size()[1..], [960, 999]);
    // Vessels are a thin minority of the pixels.
    let frac = ds.train.labels.to_kind(tch::Kind::Float).mean(tch::Kind::Float).double_value(&[]);
    assert!(frac > 0.03 && frac < 0.15, "vessel pixel fraction {frac}");
}

#[test]
fn dataset_normalisation_uses_training_statistics() {
    use tpp::data::transforms::Norm;
    let x = tch::Tensor::from_slice(&[0u8, 255, 0, 255]).reshape([4, 1, 1, 1]);
    let n = Norm::DATASET.resolve(&x);
    assert!((n.mean[0] - 0.5).abs() < 1e-9 && (n.mean[2] - 0.5).abs() < 1e-9);
    assert!((n.std[0] - 0.5).abs() < 1e-9, "population std of {{0, 1}} is 0.5: {:?}", n.std);
    assert_eq!(Norm::IMAGENET.resolve(&x), Norm::IMAGENET);
    use clap::ValueEnum;
    let parsed = tpp::data::transforms::Normalization::from_str("dataset", false).unwrap();
    assert_eq!(parsed.norm(), Norm::DATASET);
}

/// The pad-crop augmentation (the pilot protocol's): every output is a crop of the reflect-padded input,
/// flipped or not, masks move exactly with their images, and the offsets are seeded yet vary.
#[test]
fn pad_crop_augmentation_crops_the_reflect_padded_image_and_moves_masks_along() {
    use rand::SeedableRng;
    use tch::{Kind, Tensor};
    use tpp::data::transforms::Augment;
    let (b, s, p) = (3i64, 8i64, 2i64);
    let m = Tensor::randint(5, [b, s, s], (Kind::Int64, tch::Device::Cpu));
    let x = m.unsqueeze(1).to_kind(Kind::Float);
    let aug = Augment { hflip: true, pad_crop: p, ..Augment::NONE };
    let padded = x.reflection_pad2d([p, p, p, p]);
    let mut offsets = std::collections::HashSet::new();
    for seed in 0..12u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (y, ym) = aug.apply(&x, Some(&m), &mut rng);
        let ym = ym.unwrap();
        assert_eq!(y.size(), x.size());
        // Flips through grid_sample are exact at pixel centres, so image and mask still agree everywhere.
        assert!(y.squeeze_dim(1).to_kind(Kind::Int64).equal(&ym), "mask and image moved differently");
        let mut rng2 = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        assert!(aug.apply(&x, Some(&m), &mut rng2).0.equal(&y), "not reproducible from the seed");
        // One offset per batch: find it from the first sample, then every sample must be that crop.
        let found = (0..=2 * p).flat_map(|dy| (0..=2 * p).map(move |dx| (dy, dx))).find(|&(dy, dx)| {
            let c = padded.narrow(2, dy, s).narrow(3, dx, s);
            (0..b).all(|i| {
                let (yi, ci) = (y.get(i), c.get(i));
                yi.equal(&ci) || yi.equal(&ci.flip([2]))
            })
        });
        offsets.insert(found.unwrap_or_else(|| panic!("seed {seed}: output is no flipped/unflipped crop")));
    }
    assert!(offsets.len() > 3, "offsets do not vary: {offsets:?}");
}
