//! Parallel decoding of image files into a uint8 NCHW tensor at a fixed size (rayon over all cores), with
//! per-file errors that name the file, and an option to skip bad files and list them.
use anyhow::{Result, anyhow, bail};
use image::imageops::FilterType;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// How a file's pixels become bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pixels {
    /// Three channels.
    Rgb,
    /// One grey channel (luma).
    Grey,
    /// One channel, each pixel's largest channel value, resized nearest-neighbour: masks, where a red-only
    /// or a grey class map must keep its values.
    Mask,
}

/// One decoded image: C x size x size bytes, channel-planar.
pub fn decode(path: &Path, size: u32, grey: bool, nearest: bool) -> Result<Vec<u8>> {
    let pixels = match (grey, nearest) {
        (_, true) => Pixels::Mask,
        (true, false) => Pixels::Grey,
        (false, false) => Pixels::Rgb,
    };
    decode_as(path, size, pixels)
}

/// One decoded image in `pixels`' layout at `size` x `size` (0: at its own size).
pub fn decode_as(path: &Path, size: u32, pixels: Pixels) -> Result<Vec<u8>> {
    let nearest = pixels == Pixels::Mask;
    let grey = pixels == Pixels::Grey;
    let img = if super::dicom::is_dicom(path) {
        image::DynamicImage::ImageLuma8(super::dicom::decode(path, size, None)?)
    } else {
        image::open(path).map_err(|e| anyhow!("{}: cannot decode image ({e})", path.display()))?
    };
    let filter = if nearest { FilterType::Nearest } else { FilterType::Triangle };
    let img = if size == 0 { img } else { img.resize_exact(size, size, filter) };
    if grey {
        return Ok(img.to_luma8().into_raw());
    }
    if nearest {
        return Ok(img.to_rgb8().into_raw().chunks_exact(3).map(|p| p[0].max(p[1]).max(p[2])).collect());
    }
    let rgb = img.to_rgb8().into_raw();
    let hw = (img.width() * img.height()) as usize;
    let mut out = vec![0u8; 3 * hw];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        out[i] = px[0];
        out[hw + i] = px[1];
        out[2 * hw + i] = px[2];
    }
    Ok(out)
}

/// Decoded images, and (index, error) of the files skipped.
pub type Decoded = (Vec<Vec<u8>>, Vec<(usize, String)>);

/// Decodes `files` in parallel. With `skip_bad`, undecodable files are dropped and returned in the second
/// list; otherwise the first bad file is the error.
pub fn decode_all(files: &[PathBuf], size: u32, grey: bool, nearest: bool, skip_bad: bool) -> Result<Decoded> {
    let task = crate::progress::start(if nearest { "decode masks" } else { "decode" }, files.len() as u64);
    let done = std::sync::atomic::AtomicU64::new(0);
    let results: Vec<Result<Vec<u8>>> = files
        .par_iter()
        .map(|f| {
            let r = decode(f, size, grey, nearest);
            task.set_position(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1);
            r
        })
        .collect();
    drop(task);
    let mut ok = Vec::with_capacity(files.len());
    let mut bad = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(v) => ok.push(v),
            Err(e) if skip_bad => bad.push((i, format!("{e:#}"))),
            Err(e) => {
                return Err(
                    e.context("use --skip-bad (skip_bad = true in a compare config) to skip and list bad files")
                );
            }
        }
    }
    Ok((ok, bad))
}

/// Decodes `files` in parallel chunks and hands each good image to `sink` in file order (index, bytes), so
/// only one chunk is held at a time. Returns the (index, error) of the files skipped with `skip_bad`;
/// without it the first bad file is the error.
pub fn decode_each(
    files: &[PathBuf],
    size: u32,
    grey: bool,
    skip_bad: bool,
    mut sink: impl FnMut(usize, Vec<u8>) -> Result<()>,
) -> Result<Vec<(usize, String)>> {
    let task = crate::progress::start("decode", files.len() as u64);
    let mut bad = Vec::new();
    // Enough per chunk to keep every core busy; small next to any data set worth streaming.
    let chunk = 64 * rayon::current_num_threads().max(1);
    for (c, part) in files.chunks(chunk).enumerate() {
        let results: Vec<Result<Vec<u8>>> = part.par_iter().map(|f| decode(f, size, grey, false)).collect();
        for (j, r) in results.into_iter().enumerate() {
            let i = c * chunk + j;
            match r {
                Ok(v) => sink(i, v)?,
                Err(e) if skip_bad => bad.push((i, format!("{e:#}"))),
                Err(e) => {
                    return Err(
                        e.context("use --skip-bad (skip_bad = true in a compare config) to skip and list bad files")
                    );
                }
            }
        }
        task.set_position((c * chunk + part.len()) as u64);
    }
    Ok(bad)
}

/// Stacks decoded images of `source` (named in errors) into uint8 [N, C, size, size]. Each image is freed
/// as soon as it is copied, so the peak is about one data set, not two.
pub fn stack(source: &str, images: Vec<Vec<u8>>, channels: i64, size: i64) -> Result<Tensor> {
    stack_hw(source, images, channels, (size, size))
}

/// As [`stack`], for images of `h` x `w`.
pub fn stack_hw(source: &str, images: Vec<Vec<u8>>, channels: i64, (h, w): (i64, i64)) -> Result<Tensor> {
    if images.is_empty() {
        bail!("{source}: no readable images");
    }
    let out = Tensor::empty([images.len() as i64, channels, h, w], (tch::Kind::Uint8, tch::Device::Cpu));
    for (i, v) in images.into_iter().enumerate() {
        if v.len() as i64 != channels * h * w {
            bail!("{source}: image {i} decoded to {} bytes, not {channels} x {h} x {w}", v.len());
        }
        out.get(i as i64).copy_(&Tensor::from_slice(&v).reshape([channels, h, w]));
    }
    Ok(out)
}
