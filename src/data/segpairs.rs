//! Segmentation pairs: `root/images/*` and `root/masks/*` matched by file stem (Kvasir-SEG's layout).
//! A mask pixel's value is its largest channel (grey, or a red-only RGB mask). Masks are binarised unless
//! `mask_classes` > 2, in which case pixel values are class ids: 0/255 masks at 127, and masks whose values
//! are only 0 and 1 at 1. Images and masks must have the same size. Seeded 70/10/20 split; the training
//! masks must hold some foreground. Decoded at a square size, or (size 0, native-resolution runs) at the
//! files' own size, which must then be one for all pairs.
use super::dataset::{Dataset, Split, Task};
use super::decode::{decode_all, stack_hw};
use super::folder::{FileOptions, split_indices};
use super::images::is_image;
use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// The images of `dir` by file stem; two files of one stem (`a.png`, `a.jpg`) cannot be paired by name.
fn stems(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list folder", dir.display()))? {
        let p = e?.path();
        if p.is_file()
            && is_image(&p)
            && let Some(s) = p.file_stem().and_then(|s| s.to_str())
            && let Some(other) = m.insert(s.to_string(), p.clone())
        {
            bail!("{} and {}: two files named '{s}'; pairs are matched by name", other.display(), p.display());
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
    // At their own size (image_size 0) all pairs must share one: they are stacked into one array.
    let own = if opts.image_size == 0 {
        let dims: Vec<(u32, u32)> = pairs.iter().filter_map(|(a, _)| image::image_dimensions(a).ok()).collect();
        if let Some(i) = dims.iter().position(|d| *d != dims[0]) {
            bail!(
                "{}: {}x{} but {} is {}x{}; native-resolution segmentation stores images at their own size, which \
                 must be one size for all (pass --seg-data-size N, data_size = N in a compare config, to store them \
                 at N x N)",
                pairs[i].0.display(),
                dims[i].0,
                dims[i].1,
                pairs[0].0.display(),
                dims[0].0,
                dims[0].1
            );
        }
        dims.first().map(|&(w, h)| (h as i64, w as i64))
    } else {
        None
    };
    let (pairs, images, raw) = decode_pairs(root, pairs, opts, own)?;
    let files: Vec<PathBuf> = pairs.iter().map(|p| p.0.clone()).collect();
    let (labels, k) = if mask_classes > 2 {
        let max = raw.max().int64_value(&[]);
        if max >= mask_classes {
            bail!("{}: a mask holds class {max}, but --mask-classes is {mask_classes}", root.display());
        }
        (raw, mask_classes)
    } else {
        // Each mask by its own encoding: 0/1 masks (no value above 1) mark foreground with 1, 0/255 masks
        // with 255 (a 0/1 mask among 0/255 ones must not be read as empty).
        let n = raw.size()[0];
        let max = raw.amax([1, 2], false);
        let threshold = max.gt(1).to_kind(Kind::Int64).g_mul_scalar(127).reshape([n, 1, 1]);
        (raw.gt_tensor(&threshold).to_kind(Kind::Int64), 2)
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

/// An image file and its mask file.
type Pair = (PathBuf, PathBuf);

/// Decodes the pairs at the model's size: images uint8 [N, C, S, S] and masks int64 [N, S, S]. With
/// `skip_bad` a pair whose image or mask cannot be decoded is dropped (and listed); the pairs kept are
/// returned with them.
fn decode_pairs(
    root: &Path,
    pairs: Vec<Pair>,
    opts: FileOptions,
    own: Option<(i64, i64)>,
) -> Result<(Vec<Pair>, Tensor, Tensor)> {
    let size = opts.image_size;
    let hw = own.unwrap_or((size, size));
    let files: Vec<PathBuf> = pairs.iter().map(|p| p.0.clone()).collect();
    let mfiles: Vec<PathBuf> = pairs.iter().map(|p| p.1.clone()).collect();
    let (decoded, bad) = decode_all(&files, size as u32, opts.grey, false, opts.skip_bad)?;
    let (mdecoded, mbad) = decode_all(&mfiles, size as u32, true, true, opts.skip_bad)?;
    let mut drop = vec![false; pairs.len()];
    for (i, e) in bad.iter().chain(&mbad) {
        tracing::warn!("skipped pair {}: {e}", pairs[*i].0.display());
        drop[*i] = true;
    }
    // decode_all returns the good ones in order: walk each list past its own bad indices.
    let keep = |list: Vec<Vec<u8>>, bad: &[(usize, String)]| -> Vec<Vec<u8>> {
        let own_bad: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
        let idx = (0..pairs.len()).filter(|i| !own_bad.contains(i));
        idx.zip(list).filter(|(i, _)| !drop[*i]).map(|(_, v)| v).collect()
    };
    let (decoded, mdecoded) = (keep(decoded, &bad), keep(mdecoded, &mbad));
    let pairs: Vec<_> = pairs.into_iter().zip(&drop).filter(|(_, d)| !**d).map(|(p, _)| p).collect();
    let name = root.display().to_string();
    let images = stack_hw(&name, decoded, if opts.grey { 1 } else { 3 }, hw)?;
    let masks = stack_hw(&name, mdecoded, 1, hw)?.squeeze_dim(1).to_kind(Kind::Int64);
    Ok((pairs, images, masks))
}
