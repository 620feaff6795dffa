//! Data formats and loading. Each format is one module producing a [`Dataset`]; errors name the file.
pub mod cache;
pub mod dataset;
pub mod decode;
pub mod dicom;
pub mod fetch;
pub mod folder;
pub mod images;
pub mod loader;
pub mod medmnist;
pub mod nifti;
pub mod npy;
pub mod segpairs;
pub mod transforms;

pub use dataset::{Dataset, Split, Task};

/// The files of a file-based dataset and its split (train, val, test indices into them).
pub type SplitRecord = (Vec<PathBuf>, [Vec<i64>; 3]);

use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// How a dataset is read. `image_size` and `grey` apply to formats decoded from files (MedMNIST keeps its
/// own size; batches are resized to the model's input anyway).
#[derive(Debug, Clone, Default)]
pub struct DataOptions {
    /// Format name, when the path does not tell.
    pub format: Option<String>,
    /// Decoded image size of file-based formats (default 224).
    pub image_size: Option<i64>,
    /// Decode file-based images as 1-channel grey.
    pub grey: bool,
    /// Skip unreadable files instead of stopping.
    pub skip_bad: bool,
    /// Segmentation masks: number of classes (2: binarised at 127).
    pub mask_classes: i64,
    /// NIfTI: the label volume.
    pub labels: Option<PathBuf>,
    /// The decoded-data cache folder (see [`cache`]); None decodes into memory at every open.
    pub cache: Option<PathBuf>,
}

/// `p` as an absolute path: canonical (links and `..` resolved) when it exists, else joined to the working
/// folder; as given if even that fails.
pub fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).or_else(|_| std::path::absolute(p)).unwrap_or_else(|_| p.to_path_buf())
}

/// The format name for a path: `.npz` -> medmnist, `.csv` -> csv, `.nii(.gz)` -> nifti, a folder with
/// images/ and masks/ -> segpairs, another folder -> folder (DICOM files count as images in folders and
/// manifests).
pub fn infer_format(path: &Path) -> Result<&'static str> {
    if !path.exists() {
        bail!("{}: no such file or folder", path.display());
    }
    Ok(match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("npz") => "medmnist",
        Some("csv") => "csv",
        _ if nifti::is_nifti(path) => "nifti",
        _ if path.is_dir() && segpairs::is_segpairs(path) => "segpairs",
        _ if path.is_dir() => "folder",
        _ => {
            let detail = "cannot infer the dataset format (.npz MedMNIST, .csv manifest, image folder, or images/ + \
                          masks/); use --format";
            return Err(crate::Error::UnknownFormat { path: path.to_path_buf(), detail: detail.into() }.into());
        }
    })
}

/// The task and number of classes of a dataset, without decoding any image of file-based formats.
pub fn describe(path: &Path, o: &DataOptions) -> Result<(Task, i64)> {
    // Every failure here is a problem with the input named.
    crate::error::input((|| -> Result<(Task, i64)> {
        let fmt = match &o.format {
            Some(f) => f.as_str(),
            None => infer_format(path)?,
        };
        Ok(match fmt {
            "folder" => {
                let i = folder::folder_items(path)?;
                (i.task, i.class_names.len() as i64)
            }
            "csv" => {
                let i = folder::csv_items(path)?;
                (i.task, i.class_names.len() as i64)
            }
            "segpairs" | "nifti" => (Task::Segmentation, o.mask_classes.max(2)),
            _ => {
                let d = open_with(path, o)?.0;
                (d.task, d.num_classes)
            }
        })
    })())
}

/// Opens a dataset, inferring the format from the path (`--format` overrides).
pub fn open(path: &Path, format: Option<&str>) -> Result<Dataset> {
    open_with(path, &DataOptions { format: format.map(str::to_string), ..Default::default() }).map(|(d, _)| d)
}

/// Opens a dataset; for file-based formats also returns (files, split indices) to record the split. With
/// `o.cache` set, through the decoded-data cache there.
pub fn open_with(path: &Path, o: &DataOptions) -> Result<(Dataset, Option<SplitRecord>)> {
    // Every failure here is a problem with the input named.
    crate::error::input((|| -> Result<(Dataset, Option<SplitRecord>)> {
        let fmt = match &o.format {
            Some(f) => f.as_str(),
            None => infer_format(path)?,
        };
        match &o.cache {
            Some(dir) => cache::open(path, o, fmt, dir),
            None => open_uncached(path, o, fmt),
        }
    })())
}

/// Decodes a dataset of format `fmt` into memory.
pub(crate) fn open_uncached(path: &Path, o: &DataOptions, fmt: &str) -> Result<(Dataset, Option<SplitRecord>)> {
    {
        let fo = folder::FileOptions { image_size: o.image_size.unwrap_or(224), grey: o.grey, skip_bad: o.skip_bad };
        let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("data").to_string();
        match fmt {
            "medmnist" | "npz" => Ok((medmnist::open(path)?, None)),
            "folder" => {
                let (d, f, p) = folder::build(&name, folder::folder_items(path)?, fo)?;
                Ok((d, Some((f, p))))
            }
            "csv" => {
                let (d, f, p) = folder::build(&name, folder::csv_items(path)?, fo)?;
                Ok((d, Some((f, p))))
            }
            "segpairs" => {
                let (d, f, p) = segpairs::open(path, fo, o.mask_classes)?;
                Ok((d, Some((f, p))))
            }
            "nifti" => {
                let Some(labels) = &o.labels else {
                    bail!("{}: a NIfTI volume needs its label volume (--labels <file.nii.gz>)", path.display());
                };
                Ok((nifti::open(path, labels, fo.image_size, o.mask_classes)?, None))
            }
            other => {
                bail!("format '{other}' (--format) is unknown (supported: medmnist, folder, csv, segpairs, nifti)")
            }
        }
    }
}
