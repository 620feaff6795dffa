//! Data formats and loading. Each format is one module producing a [`Dataset`]; errors name the file.
pub mod dataset;
pub mod images;
pub mod loader;
pub mod medmnist;
pub mod npy;
pub mod transforms;

pub use dataset::{Dataset, Split, Task};

use anyhow::{Result, bail};
use std::path::Path;

/// Opens a dataset, inferring the format from the path (`--format` overrides): a `.npz` (MedMNIST).
pub fn open(path: &Path, format: Option<&str>) -> Result<Dataset> {
    let fmt = match format {
        Some(f) => f.to_string(),
        None => match path.extension().and_then(|e| e.to_str()) {
            Some("npz") => "medmnist".into(),
            _ if !path.exists() => bail!("{}: no such file or folder", path.display()),
            _ => bail!("{}: cannot infer the dataset format (supported: .npz MedMNIST); use --format", path.display()),
        },
    };
    match fmt.as_str() {
        "medmnist" | "npz" => medmnist::open(path),
        other => bail!("unknown --format '{other}' (supported: medmnist)"),
    }
}
