//! MedMNIST v2 `.npz` files (`{train,val,test}_images`, `_labels`), with their official splits.
use super::dataset::{Dataset, Split, Task};
use anyhow::{Context, Result, anyhow, bail};
use std::path::Path;
use tch::{Kind, Tensor};

type Npz = npyz::npz::NpzArchive<std::io::BufReader<std::fs::File>>;

/// Where a split's images go: given the split ("train", ...), the array's shape (N, H, W) or (N, H, W, C)
/// and its values in C order, returns the uint8 NCHW tensor (in memory, or mapped from a file it wrote).
pub type ImageSink<'a> = dyn FnMut(&str, &[u64], &mut dyn std::io::Read) -> Result<Tensor> + 'a;

/// Opens array `name`, after checking that its header's shape fits the bytes the archive holds for it
/// (before anything that size is allocated); returns it with its element count.
fn open_array<'a>(
    npz: &'a mut Npz,
    path: &Path,
    name: &str,
) -> Result<(npyz::NpyFile<impl std::io::Read + 'a>, Vec<u64>, usize)> {
    let stored =
        npz.zip_archive().by_name(&npyz::npz::file_name_from_array_name(name)).map(|f| f.size()).unwrap_or(u64::MAX);
    let arr = npz
        .by_name(name)
        .map_err(|e| anyhow!("{}: cannot read array '{name}' ({e})", path.display()))?
        .ok_or_else(|| anyhow!("{}: array '{name}' missing (not a MedMNIST file?)", path.display()))?;
    let shape = arr.shape().to_vec();
    let n = super::npy::element_count(path, &format!("array '{name}'"), &shape)?;
    if n as u64 > stored {
        bail!("{}: array '{name}' has shape {shape:?}, more than its {stored} bytes hold (corrupt?)", path.display());
    }
    Ok((arr, shape, n))
}

/// A whole uint8 array in C order.
fn read_array(npz: &mut Npz, path: &Path, name: &str) -> Result<(Vec<u64>, Vec<u8>)> {
    let (arr, shape, n) = open_array(npz, path, name)?;
    let fortran = arr.order() == npyz::Order::Fortran;
    let data = arr
        .into_vec::<u8>()
        .map_err(|e| anyhow!("{}: array '{name}' is not uint8 or is corrupt ({e})", path.display()))?;
    if data.len() != n {
        bail!("{}: array '{name}' holds {} values for shape {shape:?}", path.display(), data.len());
    }
    Ok((shape.clone(), if fortran { super::npy::c_order(&data, &shape) } else { data }))
}

/// A split's images through `sink`, streamed in C order (a column-major array is reordered in memory).
fn read_images(npz: &mut Npz, path: &Path, which: &str, sink: &mut ImageSink) -> Result<Tensor> {
    let name = format!("{which}_images");
    let (arr, shape, n) = open_array(npz, path, &name)?;
    if !matches!(shape.len(), 3 | 4) {
        bail!("{}: {name} has shape {shape:?}, expected (N, H, W) or (N, H, W, 3)", path.display());
    }
    let corrupt = |e: std::io::Error| anyhow!("{}: array '{name}' is corrupt ({e})", path.display());
    if arr.order() == npyz::Order::Fortran {
        let data = arr.into_vec::<u8>().map_err(corrupt)?;
        if data.len() != n {
            bail!("{}: array '{name}' holds {} values for shape {shape:?}", path.display(), data.len());
        }
        let c = super::npy::c_order(&data, &shape);
        drop(data);
        return sink(which, &shape, &mut std::io::Cursor::new(c));
    }
    let header = arr.header().clone();
    if arr.data::<u8>().is_err() {
        bail!("{}: array '{name}' is not uint8 ({})", path.display(), header.dtype().descr());
    }
    // uint8 in C order: the raw bytes after the header, read straight from the archive entry.
    let file = npyz::npz::file_name_from_array_name(&name);
    let mut raw = npz.zip_archive().by_name(&file).map_err(|e| anyhow!("{}: {file}: {e}", path.display()))?;
    npyz::NpyHeader::from_reader(&mut raw).map_err(corrupt)?;
    sink(which, &shape, &mut raw).with_context(|| format!("{}: array '{name}'", path.display()))
}

/// Fills `buf` from `values`, an error if they end early or fail.
pub fn fill(values: &mut dyn std::io::Read, buf: &mut [u8]) -> Result<()> {
    values.read_exact(buf).map_err(|e| anyhow!("fewer values than its shape says, or corrupt ({e})"))
}

/// The in-memory sink: the whole array, then NCHW.
fn into_memory(_: &str, shape: &[u64], values: &mut dyn std::io::Read) -> Result<Tensor> {
    let mut data = vec![0u8; shape.iter().product::<u64>() as usize];
    fill(values, &mut data)?;
    let d: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
    let t = Tensor::from_slice(&data);
    drop(data);
    // (N, H, W) grey or (N, H, W, 3) colour -> NCHW.
    Ok(if d.len() == 3 {
        t.reshape([d[0], 1, d[1], d[2]])
    } else {
        t.reshape([d[0], d[1], d[2], d[3]]).permute([0, 3, 1, 2]).contiguous()
    })
}

fn split(npz: &mut Npz, path: &Path, which: &str, sink: &mut ImageSink) -> Result<Split> {
    let images = read_images(npz, path, which, sink)?;
    let (lshape, ldata) = read_array(npz, path, &format!("{which}_labels"))?;
    let n = images.size()[0];
    if lshape.first() != Some(&(n as u64)) {
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
    open_into(path, &mut into_memory)
}

/// As [`open`], each split's images through `sink` (the cache streams them to files).
pub fn open_into(path: &Path, sink: &mut ImageSink) -> Result<Dataset> {
    let mut npz = npyz::npz::NpzArchive::open(path)
        .with_context(|| format!("{}: cannot open as .npz", path.display()))
        .map_err(|e| anyhow!("{e:#}"))?;
    let mut train = split(&mut npz, path, "train", sink)?;
    let mut val = split(&mut npz, path, "val", sink)?;
    let mut test = split(&mut npz, path, "test", sink)?;
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
