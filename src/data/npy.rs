//! `.npy` arrays: float32 image batches in (NCHW) and features out.
use anyhow::{Context, Result, anyhow, bail};
use npyz::{DType, TypeChar, WriterBuilder};
use std::io::BufWriter;
use std::path::Path;
use tch::{Kind, Tensor};

/// Elements stored in Fortran (column-major) order, rearranged into C (row-major) order for `shape`.
pub fn c_order<T: Copy>(data: &[T], shape: &[u64]) -> Vec<T> {
    let n = data.len();
    let mut out = Vec::with_capacity(n);
    // Element i in C order has multi-index (i_0, ..., i_k); its Fortran offset weighs axis 0 fastest.
    let mut strides = vec![1usize; shape.len()];
    for a in 1..shape.len() {
        strides[a] = strides[a - 1] * shape[a - 1] as usize;
    }
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        out.push(data[idx.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>()]);
        for a in (0..shape.len()).rev() {
            idx[a] += 1;
            if idx[a] < shape[a] as usize {
                break;
            }
            idx[a] = 0;
        }
    }
    out
}

/// The number of elements of an array of shape `dims` ("`what`" in `path`): every axis must have at least
/// one, and the product must be a size this machine can address (a corrupt header can claim anything).
pub(crate) fn element_count(path: &Path, what: &str, dims: &[u64]) -> Result<usize> {
    if dims.is_empty() || dims.contains(&0) {
        bail!("{}: {what} has shape {dims:?}; it needs at least one element along every axis", path.display());
    }
    dims.iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n <= i64::MAX as u64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| anyhow!("{}: {what} has shape {dims:?}, too many elements (corrupt header?)", path.display()))
}

/// Reads a float32 (or float64, converted) array of at least one element per axis and only finite
/// values; Fortran-order arrays are rearranged.
pub fn read_f32(path: &Path) -> Result<Tensor> {
    // Every failure here is a problem with the input named.
    crate::error::input((|| -> Result<Tensor> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read file", path.display()))?;
        let npy =
            npyz::NpyFile::new(&bytes[..]).map_err(|e| anyhow!("{}: not a valid .npy file ({e})", path.display()))?;
        let fortran = npy.order() == npyz::Order::Fortran;
        let dims = npy.shape().to_vec();
        let n = element_count(path, "array", &dims)?;
        let item = match npy.dtype() {
            DType::Plain(t) => t.size_field(),
            _ => 1,
        };
        // The header's shape must fit the bytes there are, before anything that size is allocated.
        if n.saturating_mul(item as usize) > bytes.len() {
            bail!("{}: shape {dims:?} needs more data than the file holds (truncated?)", path.display());
        }
        let shape: Vec<i64> = dims.iter().map(|&s| s as i64).collect();
        let data: Vec<f32> = match npy.dtype() {
            DType::Plain(t) if t.type_char() == TypeChar::Float && t.size_field() == 4 => npy.into_vec::<f32>(),
            DType::Plain(t) if t.type_char() == TypeChar::Float && t.size_field() == 8 => {
                npy.into_vec::<f64>().map(|v| v.into_iter().map(|x| x as f32).collect())
            }
            other => bail!("{}: dtype {} is not supported (expected float32)", path.display(), other.descr()),
        }
        .map_err(|e| anyhow!("{}: truncated or corrupt data ({e})", path.display()))?;
        if let Some(i) = data.iter().position(|x| !x.is_finite()) {
            bail!("{}: element {i} is {} (inputs must be finite)", path.display(), data[i]);
        }
        if data.len() != n {
            bail!("{}: holds {} values for shape {dims:?}", path.display(), data.len());
        }
        let data = if fortran { c_order(&data, &dims) } else { data };
        Ok(Tensor::from_slice(&data).reshape(&shape))
    })())
}

/// Writes a tensor as a C-order float32 `.npy`, atomically (a killed write never leaves a file that
/// looks complete).
pub fn write_f32(path: &Path, t: &Tensor) -> Result<()> {
    crate::peft::io::write_atomic(path, |tmp| write_f32_to(tmp, t))
}

fn write_f32_to(path: &Path, t: &Tensor) -> Result<()> {
    let t = t.to_kind(Kind::Float).to_device(tch::Device::Cpu).contiguous();
    let shape: Vec<u64> = t.size().iter().map(|&s| s as u64).collect();
    let data = Vec::<f32>::try_from(t.flatten(0, -1)).map_err(|e| anyhow!("tensor to vec: {e}"))?;
    let file = std::fs::File::create(path).with_context(|| format!("{}: cannot create file", path.display()))?;
    let mut w = npyz::WriteOptions::<f32>::new()
        .default_dtype()
        .shape(&shape)
        .writer(BufWriter::new(file))
        .begin_nd()
        .with_context(|| format!("{}: cannot write", path.display()))?;
    w.extend(data).with_context(|| format!("{}: cannot write", path.display()))?;
    w.finish().with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let dir = std::env::temp_dir().join(format!("tpp-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        let t = Tensor::arange(24, (Kind::Float, tch::Device::Cpu)).reshape([2, 3, 2, 2]);
        write_f32(&p, &t).unwrap();
        let back = read_f32(&p).unwrap();
        assert_eq!(back.size(), vec![2, 3, 2, 2]);
        assert!(back.equal(&t));
        // Truncated file: a clear error naming the file.
        let bytes = std::fs::read(&p).unwrap();
        let bad = dir.join("bad.npy");
        std::fs::write(&bad, &bytes[..bytes.len() - 10]).unwrap();
        let e = read_f32(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.npy"), "{e}");
        std::fs::write(&bad, b"hello").unwrap();
        assert!(read_f32(&bad).unwrap_err().to_string().contains("not a valid .npy"));
        // Column-major storage: [[0, 1, 2], [3, 4, 5]] is stored 0, 3, 1, 4, 2, 5.
        assert_eq!(c_order(&[0, 3, 1, 4, 2, 5], &[2, 3]), [0, 1, 2, 3, 4, 5]);
        assert_eq!(c_order(&[0, 1, 2, 3], &[4]), [0, 1, 2, 3]);
        // No element, or a non-finite one: errors naming the file.
        write_f32(&bad, &Tensor::zeros([0, 3], (Kind::Float, tch::Device::Cpu))).unwrap();
        assert!(read_f32(&bad).unwrap_err().to_string().contains("at least one element"));
        write_f32(&bad, &Tensor::from_slice(&[1f32, f32::NAN])).unwrap();
        let e = read_f32(&bad).unwrap_err().to_string();
        assert!(e.contains("bad.npy") && e.contains("NaN"), "{e}");
    }
}
