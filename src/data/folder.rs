//! Classification from files: an image folder (`root/<class>/*.png|jpg|tif|bmp`) or a CSV manifest
//! (`path,label` or `path,label1,label2,...` for multi-label; paths relative to the CSV). Without official
//! splits, a seeded stratified 70/10/20 train/val/test split is made (seed fixed, so every run and variant
//! of a comparison sees the same split) and written beside the run as `splits.csv`.
use super::dataset::{Dataset, Split, Task, stratified_subset};
use super::decode::{decode_all, stack};
use super::images::is_image;
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

/// How files become tensors.
#[derive(Debug, Clone, Copy)]
pub struct FileOptions {
    /// Decoded image size.
    pub image_size: i64,
    /// Decode as 1-channel grey.
    pub grey: bool,
    /// Skip unreadable files instead of stopping.
    pub skip_bad: bool,
}

/// Items (file, label row) before decoding.
pub struct Items {
    /// Image files.
    pub files: Vec<PathBuf>,
    /// One label row per file (a class index, or 0/1 per label).
    pub labels: Vec<Vec<f64>>,
    /// Class (or label) names.
    pub class_names: Vec<String>,
    /// The task.
    pub task: Task,
}

/// The items of an image folder `root/<class>/*`.
pub fn folder_items(root: &Path) -> Result<Items> {
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| format!("{}: cannot list folder", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && !super::images::is_hidden(p))
        .collect();
    classes.sort();
    if classes.len() < 2 {
        bail!("{}: an image-folder dataset needs one sub-folder per class (found {})", root.display(), classes.len());
    }
    let mut files = Vec::new();
    let mut labels = Vec::new();
    let mut names = Vec::new();
    for (k, dir) in classes.iter().enumerate() {
        let mut f: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list folder", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image(p))
            .collect();
        if f.is_empty() {
            bail!("{}: class folder has no images", dir.display());
        }
        f.sort();
        labels.extend(std::iter::repeat_n(vec![k as f64], f.len()));
        files.extend(f);
        names.push(dir.file_name().and_then(|s| s.to_str()).unwrap_or("?").to_string());
    }
    let task = if names.len() == 2 { Task::Binary } else { Task::Multiclass };
    Ok(Items { files, labels, class_names: names, task })
}

/// The items of a CSV manifest (`path,label` or `path,<l1>,<l2>,...`).
pub fn csv_items(csv: &Path) -> Result<Items> {
    let text = std::fs::read_to_string(csv).with_context(|| format!("{}: cannot read", csv.display()))?;
    let base = csv.parent().unwrap_or(Path::new("."));
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().ok_or_else(|| anyhow!("{}: empty manifest", csv.display()))?;
    let cols: Vec<&str> = header.split(',').map(str::trim).collect();
    if cols.len() < 2 {
        bail!("{}: header must be `path,label` or `path,<label1>,<label2>,...`", csv.display());
    }
    let multilabel = cols.len() > 2;
    let mut files = Vec::new();
    let mut raw: Vec<Vec<String>> = Vec::new();
    // Each image once: a repeated row would put one image in two splits (or give it two labels).
    let mut first_line: std::collections::HashMap<PathBuf, usize> = Default::default();
    for (i, line) in lines.enumerate() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != cols.len() {
            bail!("{}: line {} has {} fields, the header has {}", csv.display(), i + 2, f.len(), cols.len());
        }
        let file = base.join(f[0]);
        // One file under two spellings (`./a.png`, `x/../a.png`, a link) is still one image.
        let key = std::fs::canonicalize(&file).unwrap_or_else(|_| file.clone());
        if let Some(first) = first_line.insert(key, i + 2) {
            bail!("{}: line {} names {} again (first on line {first})", csv.display(), i + 2, f[0]);
        }
        files.push(file);
        raw.push(f[1..].iter().map(|s| s.to_string()).collect());
    }
    if files.is_empty() {
        bail!("{}: no rows", csv.display());
    }
    if multilabel {
        let labels = raw
            .iter()
            .enumerate()
            .map(|(i, r)| {
                r.iter()
                    .map(|v| match v.as_str() {
                        "0" => Ok(0.0),
                        "1" => Ok(1.0),
                        _ => Err(anyhow!(
                            "{}: line {}: multi-label values must be 0 or 1, got '{v}'",
                            csv.display(),
                            i + 2
                        )),
                    })
                    .collect::<Result<Vec<f64>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let names = cols[1..].iter().map(|s| s.to_string()).collect();
        return Ok(Items { files, labels, class_names: names, task: Task::Multilabel });
    }
    let mut names: Vec<String> = raw.iter().map(|r| r[0].clone()).collect();
    names.sort();
    names.dedup();
    // Integer labels keep their numeric order; names are sorted.
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
    }
    let labels = raw.iter().map(|r| vec![names.iter().position(|n| *n == r[0]).unwrap_or(0) as f64]).collect();
    let task = if names.len() == 2 { Task::Binary } else { Task::Multiclass };
    Ok(Items { files, labels, class_names: names, task })
}

/// Seeded stratified split of `n` items: 70% train, 10% val, 20% test per stratum (at least one test
/// and one val item per class when the class has three or more).
pub fn split_indices(keys: &[i64], seed: u64) -> [Vec<i64>; 3] {
    let split = Split {
        images: Tensor::zeros([keys.len() as i64, 1, 1, 1], (Kind::Uint8, tch::Device::Cpu)),
        labels: Tensor::from_slice(keys),
    };
    let test = stratified_subset(&split, Task::Multiclass, 0.2, seed);
    let rest: Vec<i64> = (0..keys.len() as i64).filter(|i| test.binary_search(i).is_err()).collect();
    let rest_keys: Vec<i64> = rest.iter().map(|&i| keys[i as usize]).collect();
    let rsplit = Split {
        images: Tensor::zeros([rest.len() as i64, 1, 1, 1], (Kind::Uint8, tch::Device::Cpu)),
        labels: Tensor::from_slice(&rest_keys),
    };
    let val_local = stratified_subset(&rsplit, Task::Multiclass, 0.125, seed + 1);
    let val: Vec<i64> = val_local.iter().map(|&j| rest[j as usize]).collect();
    let train: Vec<i64> = rest.iter().copied().filter(|i| val.binary_search(i).is_err()).collect();
    [train, val, test]
}

/// Every class (single-label tasks) needs 3 images for a train/val/test split to give it a training one.
fn check_class_sizes(name: &str, items: &Items, keep: &[usize]) -> Result<()> {
    if items.task == Task::Multilabel {
        return Ok(());
    }
    let mut counts = vec![0usize; items.class_names.len()];
    for &i in keep {
        counts[items.labels[i][0] as usize] += 1;
    }
    if let Some((k, n)) = counts.iter().enumerate().find(|(_, n)| **n < 3) {
        bail!(
            "{name}: class '{}' has {n} image(s); a train/val/test split needs at least 3 per class",
            items.class_names[k]
        );
    }
    Ok(())
}

/// Decodes items into a dataset with a seeded split; `bad` files (with --skip-bad) are reported.
pub fn build(name: &str, items: Items, opts: FileOptions) -> Result<(Dataset, Vec<PathBuf>, [Vec<i64>; 3])> {
    let size = opts.image_size;
    let (decoded, bad) = decode_all(&items.files, size as u32, opts.grey, false, opts.skip_bad)?;
    let kept = Kept::of(name, &items, &bad)?;
    let channels = if opts.grey { 1 } else { 3 };
    let images = stack(name, decoded, channels, size)?;
    let take = |idx: &[i64]| Split {
        images: images.index_select(0, &Tensor::from_slice(idx)),
        labels: kept.labels.index_select(0, &Tensor::from_slice(idx)),
    };
    let ds = Dataset {
        name: name.to_string(),
        task: items.task,
        num_classes: items.class_names.len() as i64,
        train: take(&kept.parts[0]),
        val: take(&kept.parts[1]),
        test: take(&kept.parts[2]),
    };
    Ok((ds, kept.files, kept.parts))
}

/// The items kept after decoding (bad ones dropped with `--skip-bad`), their labels and seeded split: the
/// same whether the images are decoded into memory or streamed into the cache.
pub(crate) struct Kept {
    /// The files kept, in order.
    pub files: Vec<PathBuf>,
    /// Their labels: int64 [N] classes, or float [N, L] multi-label.
    pub labels: Tensor,
    /// train/val/test indices into `files`.
    pub parts: [Vec<i64>; 3],
}

impl Kept {
    /// Reports the `bad` (index, error) files, checks the class sizes and makes the split.
    pub(crate) fn of(name: &str, items: &Items, bad: &[(usize, String)]) -> Result<Kept> {
        for (i, e) in bad {
            tracing::warn!("skipped bad file {}: {e}", items.files[*i].display());
        }
        let keep: Vec<usize> = (0..items.files.len()).filter(|i| !bad.iter().any(|(b, _)| b == i)).collect();
        if keep.is_empty() {
            bail!("{name}: no readable images");
        }
        check_class_sizes(name, items, &keep)?;
        let files: Vec<PathBuf> = keep.iter().map(|&i| items.files[i].clone()).collect();
        let labels: Vec<Vec<f64>> = keep.iter().map(|&i| items.labels[i].clone()).collect();
        let width = labels[0].len() as i64;
        let flat: Vec<f64> = labels.concat();
        let lab = Tensor::from_slice(&flat).reshape([labels.len() as i64, width]);
        let (lab, keys): (Tensor, Vec<i64>) = if items.task == Task::Multilabel {
            let keys = Vec::<i64>::try_from(lab.argmax(1, false)).unwrap_or_default();
            (lab.to_kind(Kind::Float), keys)
        } else {
            let l = lab.squeeze_dim(1).to_kind(Kind::Int64);
            (l.shallow_clone(), Vec::<i64>::try_from(&l).unwrap_or_default())
        };
        let parts = split_indices(&keys, 0);
        for (idx, n) in parts.iter().zip(["train", "val", "test"]) {
            if idx.is_empty() {
                bail!("{name}: the {n} split is empty (too few images per class)");
            }
        }
        Ok(Kept { files, labels: lab, parts })
    }
}

/// Writes `splits.csv` (file, split) so a run's split is on record.
pub fn write_splits(path: &Path, files: &[PathBuf], parts: &[Vec<i64>; 3]) -> Result<()> {
    let mut s = String::from("file,split\n");
    for (name, idx) in ["train", "val", "test"].iter().zip(parts) {
        for &i in idx {
            s.push_str(&format!("{},{name}\n", files[i as usize].display()));
        }
    }
    crate::peft::io::write_text_atomic(path, &s)
}
