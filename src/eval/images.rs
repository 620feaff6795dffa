//! Image grids as PNG (reconstruction previews, predictions).
use crate::data::transforms::Norm;
use anyhow::{Context, Result};
use std::path::Path;
use tch::{Kind, Tensor};

/// Saves rows of image batches (each [B, C, H, W], normalised with `norm`) as one PNG grid.
pub fn save_grid(rows: &[Tensor], norm: &Norm, path: &Path) -> Result<()> {
    let (b, c, h, w) = rows[0].size4()?;
    let pad = 2i64;
    let (gw, gh) = (b * (w + pad) + pad, rows.len() as i64 * (h + pad) + pad);
    let mut img = image::RgbImage::from_pixel(gw as u32, gh as u32, image::Rgb([255, 255, 255]));
    for (r, batch) in rows.iter().enumerate() {
        let x = batch.to_kind(Kind::Float).to_device(tch::Device::Cpu);
        let chans: Vec<Tensor> = (0..c)
            .map(|ch| {
                let (m, s) = if c == 3 {
                    (norm.mean[ch as usize], norm.std[ch as usize])
                } else {
                    (norm.mean.iter().sum::<f64>() / 3.0, norm.std.iter().sum::<f64>() / 3.0)
                };
                (x.select(1, ch) * s + m).clamp(0.0, 1.0)
            })
            .collect();
        let x = Tensor::stack(&chans, 1);
        let px = Vec::<f32>::try_from(x.flatten(0, -1))?;
        for i in 0..b {
            for yy in 0..h {
                for xx in 0..w {
                    let get = |ch: i64| (px[(((i * c + ch) * h + yy) * w + xx) as usize] * 255.0).round() as u8;
                    let rgb = if c == 3 { [get(0), get(1), get(2)] } else { [get(0); 3] };
                    let (ox, oy) = (pad + i * (w + pad) + xx, pad + r as i64 * (h + pad) + yy);
                    img.put_pixel(ox as u32, oy as u32, image::Rgb(rgb));
                }
            }
        }
    }
    img.save(path).with_context(|| format!("{}: cannot write image", path.display()))
}
