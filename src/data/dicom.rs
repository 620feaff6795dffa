//! DICOM images (dicom-rs): single- and multi-frame, native or compressed (JPEG, JPEG 2000, RLE, deflate)
//! transfer syntaxes; 32-bit integer and planar colour samples, which dicom-pixeldata's converter refuses,
//! are read from the decoded bytes here. The modality LUT (rescale slope/intercept, e.g. to Hounsfield units) is applied, then a
//! window: the one given (`--window center,width`), else the file's first WindowCenter/WindowWidth, else the
//! frame's min-max. Multi-frame files give their middle frame (one image per file in a manifest).
use anyhow::{Result, anyhow};
use dicom_object::open_file;
use dicom_pixeldata::{
    ConvertOptions, DecodedPixelData, PixelDecoder, PixelRepresentation, PlanarConfiguration, VoiLutOption,
};
use std::path::Path;

/// Whether a file is DICOM (the `DICM` preamble or a `.dcm` name).
pub fn is_dicom(path: &Path) -> bool {
    if path.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("dcm")) {
        return true;
    }
    // Extension-less DICOM: "DICM" at offset 128.
    let mut buf = [0u8; 132];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf)).is_ok()
        && &buf[128..] == b"DICM"
}

/// Rescaled values of one frame (row-major), with rows, columns and the file's first window if any.
pub type Frame = (Vec<f32>, u32, u32, Option<(f64, f64)>);

/// The first frame's pixel values after the modality LUT, its size, and the file's window.
pub fn read_frame(path: &Path) -> Result<Frame> {
    crate::error::guard(path, "the DICOM decoder", || read_frame_unguarded(path))
}

fn read_frame_unguarded(path: &Path) -> Result<Frame> {
    let obj = open_file(path).map_err(|e| anyhow!("{}: cannot read DICOM ({e})", path.display()))?;
    let window = (|| {
        let c = obj.element(dicom_object::Tag(0x0028, 0x1050)).ok()?.to_multi_float64().ok()?;
        let w = obj.element(dicom_object::Tag(0x0028, 0x1051)).ok()?.to_multi_float64().ok()?;
        Some((*c.first()?, *w.first()?))
    })();
    let whole = obj.decode_pixel_data().map_err(|e| anyhow!("{}: cannot decode pixel data ({e})", path.display()))?;
    let frames = whole.number_of_frames().max(1);
    let (rows, cols, spp) = (whole.rows(), whole.columns(), whole.samples_per_pixel() as usize);
    let opts = ConvertOptions::new().with_voi_lut(VoiLutOption::Identity);
    let big_endian = obj.meta().transfer_syntax().trim_end_matches('\0') == "1.2.840.10008.1.2.2";
    let v: Vec<f32> = match whole.to_vec_frame_with_options(frames / 2, &opts) {
        // Colour DICOM (e.g. ultrasound captures): average the samples to grey.
        Ok(v) if spp > 1 => v.chunks(spp).map(|c| c.iter().sum::<f32>() / spp as f32).collect(),
        Ok(v) => v,
        Err(e) => raw_frame(&whole, frames / 2, big_endian)
            .ok_or_else(|| anyhow!("{}: cannot convert pixel data ({e})", path.display()))?,
    };
    if v.len() != (rows * cols) as usize {
        return Err(anyhow!("{}: pixel data has {} values for {rows}x{cols}", path.display(), v.len()));
    }
    Ok((v, rows, cols, window))
}

/// Grey values of one frame straight from the decoded bytes, for sample layouts the converter refuses
/// (32-bit integers, planar colour); `None` for anything else (floats, odd bit depths).
fn raw_frame(px: &DecodedPixelData, frame: u32, big_endian: bool) -> Option<Vec<f32>> {
    let bytes = px.frame_data(frame).ok()?;
    let signed = px.pixel_representation() == PixelRepresentation::Signed;
    let width = match px.bits_allocated() {
        8 | 16 | 32 => px.bits_allocated() as usize / 8,
        _ => return None,
    };
    let samples: Vec<f64> = bytes
        .chunks_exact(width)
        .map(|b| {
            let mut a = [0u8; 4];
            a[..width].copy_from_slice(b);
            if big_endian {
                a[..width].reverse();
            }
            let u = u32::from_le_bytes(a);
            // Sign-extend from the sample width.
            if signed { ((u << (32 - 8 * width)) as i32 >> (32 - 8 * width)) as f64 } else { u as f64 }
        })
        .collect();
    let spp = px.samples_per_pixel() as usize;
    let n = (px.rows() * px.columns()) as usize;
    if samples.len() != n * spp {
        return None;
    }
    let r = px.rescale().ok()?;
    let r = r.get(frame as usize).or(r.first())?;
    let grey = |i: usize| -> f64 {
        let sum: f64 = match px.planar_configuration() {
            PlanarConfiguration::Standard => samples[i * spp..(i + 1) * spp].iter().sum(),
            PlanarConfiguration::PixelFirst => (0..spp).map(|s| samples[s * n + i]).sum(),
        };
        sum / spp as f64
    };
    Some((0..n).map(|i| (grey(i) * r.slope + r.intercept) as f32).collect())
}

/// Maps values to 0..255 through a window (center, width), or min-max when none.
pub fn window_u8(v: &[f32], window: Option<(f64, f64)>) -> Vec<u8> {
    let (lo, hi) = match window {
        Some((c, w)) if w > 0.0 => (c - w / 2.0, c + w / 2.0),
        _ => {
            let lo = v.iter().copied().fold(f32::INFINITY, f32::min) as f64;
            let hi = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            (lo, hi.max(lo + 1e-6))
        }
    };
    v.iter().map(|&x| (((x as f64 - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0).round() as u8).collect()
}

/// A DICOM file as a grey image of `size` x `size` bytes (bilinear resize; 0: its own size).
pub fn decode(path: &Path, size: u32, window: Option<(f64, f64)>) -> Result<image::GrayImage> {
    let (v, rows, cols, file_window) = read_frame(path)?;
    let px = window_u8(&v, window.or(file_window));
    let img =
        image::GrayImage::from_raw(cols, rows, px).ok_or_else(|| anyhow!("{}: bad image size", path.display()))?;
    if size == 0 {
        return Ok(img);
    }
    Ok(image::imageops::resize(&img, size, size, image::imageops::FilterType::Triangle))
}
