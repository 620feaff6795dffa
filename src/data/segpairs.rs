//! Segmentation pairs: `root/images/*` and `root/masks/*` matched by file stem (Kvasir-SEG's layout).
//! A mask pixel's value is its largest channel (grey, or a red-only RGB mask). Masks are binarised unless
//! `mask_classes` > 2, in which case pixel values are class ids: 0/255 masks at 127, and masks whose values
//! are only 0 and 1 at 1. Images and masks must have the same size. Seeded 70/10/20 split; the training
//! masks must hold some foreground.
use super::dataset::{Dataset, Split, Task};
use super::decode::{decode_all, stack};
use super::folder::{FileOptions, split_indices};
use super::images::is_image;
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

fn stems(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list folder", dir.display()))? {
        let p = e?.path();
        if p.is_file()
            && is_image(&p)
            && let Some(s) = p.file_stem().and_then(|s| s.to_str())
        {
            m.insert(s.to_string(), p);
        }
    }
    Ok(m)
}

/// Whether a folder holds `images/` and `masks/`.
pub fn is_segpairs(root: &Path) -> bool {
    root.join("images").is_dir() && root.join("masks").is_dir()
}

/// Image/mask pairs matched by name, with their files and split.
pub fn open(root: &Path, opts: FileOptions, mask_classes: i64) -> Result<(Dataset, Vec<PathBuf>, [Vec<i64>; 3])> {
    let imgs = stems(&root.join("images"))?;
    let masks = stems(&root.join("masks"))?;
    let mut pairs: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (s, p) in &imgs {
        match masks.get(s) {
            Some(m) => pairs.push((p.clone(), m.clone())),
            None if opts.skip_bad => tracing::warn!("skipped {}: no mask with the same name", p.display()),
            None => bail!(
                "{}: no mask with the same name in {} (use --skip-bad, or skip_bad = true in a compare config, to skip)",
                p.display(),
                root.join("masks").display()
            ),
        }
    }
    if pairs.is_empty() {
        bail!("{}: no image/mask pairs", root.display());
    }
    // Sizes must agree before anything is resized.
    let mismatched: Vec<(usize, String)> = pairs
        .par_iter()
        .enumerate()
        .filter_map(|(i, (a, b))| match (image::image_dimensions(a), image::image_dimensions(b)) {
            (Ok(x), Ok(y)) if x == y => None,
            (Ok(x), Ok(y)) => {
                Some((i, format!("{}: mask is {}x{} but the image is {}x{}", b.display(), y.0, y.1, x.0, x.1)))
            }
            (Err(e), _) => Some((i, format!("{}: cannot read image ({e})", a.display()))),
            (_, Err(e)) => Some((i, format!("{}: cannot read mask ({e})", b.display()))),
        })
        .collect();
    if let Some((_, e)) = mismatched.first()
        && !opts.skip_bad
    {
        bail!("{e} (use --skip-bad, or skip_bad = true in a compare config, to skip)");
    }
    for (_, e) in &mismatched {
        tracing::warn!("skipped: {e}");
    }
    let pairs: Vec<(PathBuf, PathBuf)> = pairs
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !mismatched.iter().any(|(j, _)| j == i))
        .map(|(_, p)| p)
        .collect();
    let size = opts.image_size;
    let files: Vec<PathBuf> = pairs.iter().map(|p| p.0.clone()).collect();
    let mfiles: Vec<PathBuf> = pairs.iter().map(|p| p.1.clone()).collect();
    let (decoded, bad) = decode_all(&files, size as u32, opts.grey, false, false)?;
    debug_assert!(bad.is_empty());
    let (mdecoded, _) = decode_all(&mfiles, size as u32, true, true, false)?;
    let images = stack(&decoded, if opts.grey { 1 } else { 3 }, size)?;
    let raw = stack(&mdecoded, 1, size)?.squeeze_dim(1).to_kind(Kind::Int64);
    let max = raw.max().int64_value(&[]);
    let (labels, k) = if mask_classes > 2 {
        if max >= mask_classes {
            bail!("{}: a mask holds class {max}, but --mask-classes is {mask_classes}", root.display());
        }
        (raw, mask_classes)
    } else {
        // 0/1 masks (no value above 1 anywhere) mark foreground with 1, 0/255 masks with 255.
        let threshold = if max <= 1 { 0 } else { 127 };
        (raw.gt(threshold).to_kind(Kind::Int64), 2)
    };
    if files.len() < 3 {
        bail!("{}: {} image/mask pairs; a train/val/test split needs at least 3", root.display(), files.len());
    }
    let parts = split_indices(&vec![0; files.len()], 0);
    let take = |idx: &[i64]| {
        let i = Tensor::from_slice(idx);
        Split { images: images.index_select(0, &i), labels: labels.index_select(0, &i) }
    };
    let name = root.file_name().and_then(|s| s.to_str()).unwrap_or("segmentation").to_string();
    let ds = Dataset {
        name,
        task: Task::Segmentation,
        num_classes: k,
        train: take(&parts[0]),
        val: take(&parts[1]),
        test: take(&parts[2]),
    };
    super::dataset::check_foreground(&ds.train, &root.join("masks"))?;
    Ok((ds, files, parts))
}
