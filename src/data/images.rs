//! Image files (PNG, JPEG, TIFF, BMP) to normalised tensors.
use super::transforms::Norm;
use anyhow::{Context, Result, anyhow, bail};
use image::imageops::FilterType;
use std::path::{Path, PathBuf};
use tch::Tensor;

const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "tif", "tiff", "bmp", "dcm"];

/// Whether a file name is an image tpp decodes (PNG, JPEG, TIFF, BMP, DICOM).
pub fn is_image(p: &Path) -> bool {
    !is_hidden(p)
        && p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Whether a file or folder is hidden (`.git`, `.ipynb_checkpoints`, macOS's `._x.png` copies): never
/// data.
pub fn is_hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// Image files of a folder (sorted, non-recursive), or the file itself.
pub fn list_images(path: &Path) -> Result<Vec<PathBuf>> {
    // Every failure here is a problem with the input named.
    crate::error::input((|| -> Result<Vec<PathBuf>> {
        if path.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .with_context(|| format!("{}: cannot list folder", path.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            files.sort();
            if files.is_empty() {
                bail!("{}: folder has no image files ({})", path.display(), EXTENSIONS.join(", "));
            }
            Ok(files)
        } else if path.is_file() {
            if !is_image(path) {
                bail!("{}: not an image file ({})", path.display(), EXTENSIONS.join(", "));
            }
            Ok(vec![path.to_path_buf()])
        } else {
            bail!("{}: no such file or folder", path.display())
        }
    })())
}

/// Loads one image as [C, size, size] (C = 3, or 1 when `grey`; size 0: its own size), resized bilinearly and normalised as
/// training batches are ([`Norm::apply`]).
pub fn load_image(path: &Path, size: u32, grey: bool, norm: &Norm) -> Result<Tensor> {
    // Every failure here is a problem with the input named.
    crate::error::input((|| -> Result<Tensor> {
        let img = if super::dicom::is_dicom(path) {
            image::DynamicImage::ImageLuma8(super::dicom::decode(path, size, None)?)
        } else {
            image::open(path).map_err(|e| anyhow!("{}: cannot decode image ({e})", path.display()))?
        };
        let img = if size == 0 { img } else { img.resize_exact(size, size, FilterType::Triangle) };
        let (h, w) = (img.height() as i64, img.width() as i64);
        let (c, data): (usize, Vec<u8>) =
            if grey { (1, img.to_luma8().into_raw()) } else { (3, img.to_rgb8().into_raw()) };
        let hw = (h * w) as usize;
        let mut planar = vec![0u8; c * hw];
        // Interleaved HWC bytes to planar CHW, normalised as training batches are.
        for (i, px) in data.chunks_exact(c).enumerate() {
            for ch in 0..c {
                planar[ch * hw + i] = px[ch];
            }
        }
        let x = Tensor::from_slice(&planar).reshape([1, c as i64, h, w]);
        Ok(norm.apply(&x).squeeze_dim(0))
    })())
}
