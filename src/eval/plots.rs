//! PNG charts (plotters, drawn into a buffer and saved with the image crate): training curves, metric bars
//! with error bars, confusion matrices. The font is embedded (DejaVu Sans, see assets/), so no system
//! font is needed.
use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: Once = Once::new();
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn init_font() {
    FONT.call_once(|| {
        let bytes: &'static [u8] = include_bytes!("../../assets/DejaVuSans.ttf");
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, bytes);
    });
}

fn save(buf: Vec<u8>, w: u32, h: u32, path: &Path) -> Result<()> {
    let img = image::RgbImage::from_raw(w, h, buf).ok_or_else(|| anyhow!("plot buffer size"))?;
    img.save(path).with_context(|| format!("{}: cannot write image", path.display()))
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Lines of (x, y) points, one per named series.
pub fn lines(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    init_font();
    let (w, h) = (800u32, 500u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let pts = series.iter().flat_map(|(_, v)| v.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts.filter(|p| p.1.is_finite()) {
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        if x0 > x1 {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1.max(x0 + 1e-9), (y0 - pad)..(y1 + pad))
            .map_err(err)?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc(x_label)
            .y_desc(y_label)
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        for (i, (name, v)) in series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(v.iter().copied().filter(|p| p.1.is_finite()), c.stroke_width(2)))
                .map_err(err)?
                .label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    save(buf, w, h, path)
}

/// One bar per (name, mean, std), with +-std error bars.
pub fn bars(path: &Path, title: &str, y_label: &str, bars: &[(String, f64, f64)]) -> Result<()> {
    init_font();
    let (w, h) = (900u32, 500u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let lo = bars.iter().map(|b| b.1 - b.2).fold(f64::MAX, f64::min).min(0.5);
        let hi = bars.iter().map(|b| b.1 + b.2).fold(f64::MIN, f64::max).max(lo + 1e-3);
        let n = bars.len().max(1);
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..n as f64, (lo - 0.02)..(hi + 0.02))
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .light_line_style(WHITE)
            .y_desc(y_label)
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        for (i, (_, m, s)) in bars.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let x = i as f64;
            chart
                .draw_series(std::iter::once(Rectangle::new([(x + 0.15, lo - 0.02), (x + 0.85, *m)], c.filled())))
                .map_err(err)?
                .label(format!("{}: {m:.3} ± {s:.3}", names[i]))
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(x + 0.5, m - s), (x + 0.5, m + s)],
                    BLACK.stroke_width(2),
                )))
                .map_err(err)?;
            for y in [m - s, m + s] {
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x + 0.4, y), (x + 0.6, y)],
                        BLACK.stroke_width(2),
                    )))
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    save(buf, w, h, path)
}

/// A confusion matrix as a heat map with counts.
pub fn confusion(path: &Path, cm: &[Vec<i64>]) -> Result<()> {
    init_font();
    let k = cm.len().max(1);
    let cell = (400 / k).clamp(30, 120) as i32;
    let (w, h) = ((cell * k as i32 + 120) as u32, (cell * k as i32 + 100) as u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let max = cm.iter().flatten().copied().max().unwrap_or(1).max(1) as f64;
        let style = ("sans-serif", 14).into_font();
        root.draw(&Text::new("truth (rows) vs prediction (columns)", (10, 10), style.clone())).map_err(err)?;
        for (i, row) in cm.iter().enumerate() {
            root.draw(&Text::new(format!("{i}"), (70, 60 + i as i32 * cell + cell / 2), style.clone())).map_err(err)?;
            for (j, &v) in row.iter().enumerate() {
                let t = v as f64 / max;
                let c = RGBColor((255.0 - 200.0 * t) as u8, (255.0 - 140.0 * t) as u8, 255);
                let (x, y) = (90 + j as i32 * cell, 50 + i as i32 * cell);
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], c.filled())).map_err(err)?;
                root.draw(&Rectangle::new([(x, y), (x + cell, y + cell)], BLACK)).map_err(err)?;
                root.draw(&Text::new(format!("{v}"), (x + cell / 3, y + cell / 3), style.clone())).map_err(err)?;
            }
        }
        for j in 0..k {
            root.draw(&Text::new(format!("{j}"), (90 + j as i32 * cell + cell / 2, 35), style.clone())).map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    save(buf, w, h, path)
}
