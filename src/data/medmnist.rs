//! MedMNIST v2 `.npz` files (`{train,val,test}_images`, `_labels`), with their official splits.
use super::dataset::{Dataset, Split, Task};
use anyhow::{Context, Result, anyhow, bail};
use std::path::Path;
use tch::{Kind, Tensor};

fn read_array(
    npz: &mut npyz::npz::NpzArchive<std::io::BufReader<std::fs::File>>,
    path: &Path,
    name: &str,
) -> Result<(Vec<u64>, Vec<u8>)> {
    let stored =
        npz.zip_archive().by_name(&npyz::npz::file_name_from_array_name(name)).map(|f| f.size()).unwrap_or(u64::MAX);
    let arr = npz
        .by_name(name)
        .map_err(|e| anyhow!("{}: cannot read array '{name}' ({e})", path.display()))?
        .ok_or_else(|| anyhow!("{}: array '{name}' missing (not a MedMNIST file?)", path.display()))?;
    let shape = arr.shape().to_vec();
    let n = super::npy::element_count(path, &format!("array '{name}'"), &shape)?;
    // The header's shape must fit the bytes the archive says it holds, before anything that size is
    // allocated.
    if n as u64 > stored {
        bail!("{}: array '{name}' has shape {shape:?}, more than its {stored} bytes hold (corrupt?)", path.display());
    }
    let fortran = arr.order() == npyz::Order::Fortran;
    let data = arr
        .into_vec::<u8>()
        .map_err(|e| anyhow!("{}: array '{name}' is not uint8 or is corrupt ({e})", path.display()))?;
    if data.len() != n {
        bail!("{}: array '{name}' holds {} values for shape {shape:?}", path.display(), data.len());
    }
    Ok((shape.clone(), if fortran { super::npy::c_order(&data, &shape) } else { data }))
}

fn split(
    npz: &mut npyz::npz::NpzArchive<std::io::BufReader<std::fs::File>>,
    path: &Path,
    which: &str,
) -> Result<Split> {
    let (ishape, idata) = read_array(npz, path, &format!("{which}_images"))?;
    let (lshape, ldata) = read_array(npz, path, &format!("{which}_labels"))?;
    let n = ishape[0] as i64;
    // (N, H, W) grey or (N, H, W, 3) colour -> NCHW.
    let images = match ishape.len() {
        3 => Tensor::from_slice(&idata).reshape([n, 1, ishape[1] as i64, ishape[2] as i64]),
        4 => Tensor::from_slice(&idata)
            .reshape([n, ishape[1] as i64, ishape[2] as i64, ishape[3] as i64])
            .permute([0, 3, 1, 2])
            .contiguous(),
        _ => bail!("{}: {which}_images has shape {ishape:?}, expected (N, H, W) or (N, H, W, 3)", path.display()),
    };
    if lshape.first() != Some(&ishape[0]) {
        bail!("{}: {which}_labels has {:?} rows for {n} images", path.display(), lshape.first());
    }
    if n == 0 {
        bail!("{}: split '{which}' is empty", path.display());
    }
    let labels = Tensor::from_slice(&ldata).reshape([n, (ldata.len() as i64) / n]).to_kind(Kind::Int64);
    Ok(Split { images, labels })
}

/// Reads a MedMNIST `.npz` (official splits; 1 or 3 channels; any size).
pub fn open(path: &Path) -> Result<Dataset> {
    let mut npz = npyz::npz::NpzArchive::open(path)
        .with_context(|| format!("{}: cannot open as .npz", path.display()))
        .map_err(|e| anyhow!("{e:#}"))?;
    let mut train = split(&mut npz, path, "train")?;
    let mut val = split(&mut npz, path, "val")?;
    let mut test = split(&mut npz, path, "test")?;
    for (s, which) in [(&val, "val"), (&test, "test")] {
        let (a, b) = (&train.images.size()[1..], &s.images.size()[1..]);
        if a != b {
            bail!("{}: {which}_images are {b:?} (C, H, W) but train_images are {a:?}", path.display());
        }
        let (a, b) = (train.labels.size()[1], s.labels.size()[1]);
        if a != b {
            bail!("{}: {which}_labels have {b} columns but train_labels have {a}", path.display());
        }
    }
    let width = train.labels.size()[1];
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("medmnist").to_string();
    let (task, num_classes) = if width > 1 {
        for (s, which) in [(&mut train, "train"), (&mut val, "val"), (&mut test, "test")] {
            let max = s.labels.max().int64_value(&[]);
            if max > 1 {
                bail!("{}: {which}_labels holds {max}; multi-label values must be 0 or 1", path.display());
            }
            s.labels = s.labels.to_kind(Kind::Float);
        }
        (Task::Multilabel, width)
    } else {
        for s in [&mut train, &mut val, &mut test] {
            s.labels = s.labels.squeeze_dim(1);
        }
        let max = [&train, &val, &test].iter().map(|s| s.labels.max().int64_value(&[])).max().unwrap_or(0);
        let k = max + 1;
        // RetinaMNIST's grades are ordered (the MedMNIST task "ordinal-regression").
        let task = if name.starts_with("retinamnist") {
            Task::Ordinal
        } else if k == 2 {
            Task::Binary
        } else {
            Task::Multiclass
        };
        let counts = super::dataset::class_counts(&train, k);
        if let Some(c) = counts.iter().position(|&c| c == 0) {
            bail!("{}: class {c} has no training image", path.display());
        }
        (task, k)
    };
    Ok(Dataset { name, task, num_classes, train, val, test })
}
