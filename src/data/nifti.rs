//! NIfTI volumes (`.nii`, `.nii.gz`) as 2-D axial slices, with a label volume of the same shape giving
//! per-slice segmentation masks (label values > 0 are foreground, or class ids with `mask_classes` > 2).
//! Intensities are windowed to the volume's 0.5-99.5 percentiles. Slices are split 70/10/20 (seeded).
use super::dataset::{Dataset, Split, Task};
use super::folder::split_indices;
use anyhow::{Result, anyhow, bail};
use nifti::{IntoNdArray, NiftiObject, ReaderOptions};
use std::path::Path;
use tch::{Kind, Tensor};

/// Whether a path names a NIfTI volume (`.nii`, `.nii.gz`).
pub fn is_nifti(path: &Path) -> bool {
    let n = path.file_name().and_then(|s| s.to_str()).unwrap_or("").to_ascii_lowercase();
    n.ends_with(".nii") || n.ends_with(".nii.gz")
}

/// The volume as (values in x-fastest order, [nx, ny, nz]).
pub fn read_volume(path: &Path) -> Result<(Vec<f32>, [usize; 3])> {
    // The nifti crate panics on some inconsistent headers (found by the fuzz tests).
    crate::error::guard(path, "the NIfTI reader", || read_volume_unguarded(path))
}

fn read_volume_unguarded(path: &Path) -> Result<(Vec<f32>, [usize; 3])> {
    let obj =
        ReaderOptions::new().read_file(path).map_err(|e| anyhow!("{}: cannot read NIfTI ({e})", path.display()))?;
    let arr = obj
        .into_volume()
        .into_ndarray::<f32>()
        .map_err(|e| anyhow!("{}: cannot convert volume ({e})", path.display()))?;
    let shape = arr.shape().to_vec();
    if shape.len() < 3 || shape[3..].iter().any(|&d| d != 1) {
        bail!("{}: expected a 3-D volume, got shape {shape:?}", path.display());
    }
    let (nx, ny, nz) = (shape[0], shape[1], shape[2]);
    let mut v = vec![0f32; nx * ny * nz];
    for ((idx, x), _) in arr.indexed_iter().zip(0..) {
        let (i, j, k) = (idx[0], idx[1], idx[2]);
        v[i + nx * (j + ny * k)] = *x;
    }
    Ok((v, [nx, ny, nz]))
}

fn percentile(v: &[f32], q: f64) -> f32 {
    let mut s: Vec<f32> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return 0.0;
    }
    let k = ((s.len() - 1) as f64 * q).round() as usize;
    *s.select_nth_unstable_by(k, f32::total_cmp).1
}

/// Axial slice `k` as rows (y) x columns (x), resized to `size` (bilinear for images, nearest for labels).
fn slice(v: &[f32], dims: [usize; 3], k: usize, size: u32, nearest: bool, map: impl Fn(f32) -> u8) -> Vec<u8> {
    let [nx, ny, _] = dims;
    // Image rows run from anterior to posterior: flip y so the slice looks as radiology viewers show it.
    let px: Vec<u8> =
        (0..ny).rev().flat_map(|j| (0..nx).map(move |i| (i, j))).map(|(i, j)| map(v[i + nx * (j + ny * k)])).collect();
    let img = image::GrayImage::from_raw(nx as u32, ny as u32, px).expect("slice buffer matches its size");
    let f = if nearest { image::imageops::FilterType::Nearest } else { image::imageops::FilterType::Triangle };
    image::imageops::resize(&img, size, size, f).into_raw()
}

/// Axial slices of a volume with per-slice masks from its label volume, split by slice.
pub fn open(image: &Path, labels: &Path, size: i64, mask_classes: i64) -> Result<Dataset> {
    let (v, dims) = read_volume(image)?;
    let (l, ldims) = read_volume(labels)?;
    if dims != ldims {
        bail!("{}: label volume is {ldims:?} but the image volume {} is {dims:?}", labels.display(), image.display());
    }
    let (lo, hi) = (percentile(&v, 0.005), percentile(&v, 0.995));
    let span = (hi - lo).max(1e-6);
    let n = dims[2];
    let s = size as u32;
    let mut imgs = Vec::with_capacity(n * (s * s) as usize);
    let mut masks = Vec::with_capacity(n * (s * s) as usize);
    if let Some(x) = l.iter().find(|x| !x.is_finite() || **x < 0.0) {
        bail!("{}: label value {x} (labels must be finite and >= 0)", labels.display());
    }
    let max_label = l.iter().copied().fold(0f32, f32::max).round() as i64;
    if mask_classes > 2 && max_label >= mask_classes {
        bail!("{}: label {max_label} found, but --mask-classes is {mask_classes}", labels.display());
    }
    if n < 3 {
        bail!("{}: {n} axial slices; a train/val/test split needs at least 3", image.display());
    }
    for k in 0..n {
        imgs.extend(slice(&v, dims, k, s, false, |x| (((x - lo) / span).clamp(0.0, 1.0) * 255.0).round() as u8));
        masks.extend(slice(
            &l,
            dims,
            k,
            s,
            true,
            |x| if mask_classes > 2 { x.round() as u8 } else { u8::from(x > 0.0) },
        ));
    }
    let images = Tensor::from_slice(&imgs).reshape([n as i64, 1, size, size]);
    let labels_t = Tensor::from_slice(&masks).reshape([n as i64, size, size]).to_kind(Kind::Int64);
    let parts = split_indices(&vec![0; n], 0);
    let take = |idx: &[i64]| {
        let i = Tensor::from_slice(idx);
        Split { images: images.index_select(0, &i), labels: labels_t.index_select(0, &i) }
    };
    super::dataset::check_foreground(&take(&parts[0]), labels)?;
    let name = image
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("nifti")
        .trim_end_matches(".gz")
        .trim_end_matches(".nii")
        .to_string();
    Ok(Dataset {
        name,
        task: Task::Segmentation,
        num_classes: mask_classes.max(2),
        train: take(&parts[0]),
        val: take(&parts[1]),
        test: take(&parts[2]),
    })
}
