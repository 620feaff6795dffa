//! Using what a run produced: test metrics of a finished run on its data or other data
//! ([`evaluate_run`]), predictions for new images ([`predict`]: a CSV of probabilities, or mask PNGs for
//! segmentation runs), a merged timm checkpoint ([`export_merged`]), and pooled backbone features
//! ([`embed`]).
use super::records::{BackboneSource, DataSource, RunRecord};
use crate::data::loader::{LoaderConfig, Tiles};
use crate::data::transforms::resize;
use crate::data::{Task, images, npy};
use crate::eval::evaluate::{Evaluation, evaluate};
use crate::model::PeftModel;
use anyhow::{Context, Result, anyhow, bail};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Test metrics (with 95% bootstrap intervals) of the finished run in `run`, on its data or on `data`
/// (another data set of the same task; its test split), read as `format` when given. Returns them with
/// the data set used.
pub fn evaluate_run(run: &Path, data: Option<&OtherData>, device: Device) -> Result<(Evaluation, PathBuf)> {
    let rec = RunRecord::read(run)?;
    // Another data set is read with its own format and label volume, and the run's mask classes.
    let other = data.map(|o| DataSource {
        data: o.data.clone(),
        format: o.format.clone(),
        labels: o.labels.clone(),
        skip_bad: o.skip_bad,
        ..rec.data.clone()
    });
    let model = rec.load_trained(run, device)?;
    let (ds, _) = rec.open_data(&model, other.as_ref())?;
    let used = other.as_ref().map_or(&rec.data.data, |o| &o.data).to_path_buf();
    if ds.task != rec.task || ds.num_classes != rec.num_classes {
        return Err(crate::error::bad_input!(
            "{}: task {:?} with {} classes, but the run was trained for {:?} with {}",
            used.display(),
            ds.task,
            ds.num_classes,
            rec.task,
            rec.num_classes
        ));
    }
    let loader = LoaderConfig {
        batch_size: 128,
        image_size: model.bb.vit.config().img_size,
        norm: rec.config.norm,
        device,
        drop_last: false,
        tiles: rec.config.seg.tiles(model.bb.vit.config().img_size),
    };
    Ok((evaluate(&model, &ds.test, ds.task, ds.num_classes, loader, "test")?, used))
}

/// A data set other than a run's own to evaluate it on.
#[derive(Debug, Clone)]
pub struct OtherData {
    /// The data set (any format tpp reads).
    pub data: PathBuf,
    /// Its format, when the path does not tell.
    pub format: Option<String>,
    /// A NIfTI volume's label volume.
    pub labels: Option<PathBuf>,
    /// Skip unreadable files.
    pub skip_bad: bool,
}

/// Images to predict: a float32 `.npy` [N, C, H, W] already normalised, or image files (an image or a
/// folder) normalised as the run was. Returns their names and the batch (at the files' own size).
fn read_inputs(input: &Path, rec: &RunRecord, model: &PeftModel) -> Result<(Vec<String>, Tensor)> {
    let size = model.bb.vit.config().img_size;
    let (names, x) = if input.extension().is_some_and(|e| e == "npy") {
        let x = npy::read_f32(input)?;
        ((0..x.size()[0]).map(|i| format!("{}[{i}]", input.display())).collect(), x)
    } else {
        let files = images::list_images(input)?;
        let grey = model.bb.vit.config().in_chans == 1;
        let norm = &rec.config.norm;
        let imgs = files.iter().map(|f| images::load_image(f, size as u32, grey, norm)).collect::<Result<Vec<_>>>()?;
        (files.iter().map(|f| f.display().to_string()).collect(), Tensor::stack(&imgs, 0))
    };
    check_inputs(model, input, &x, size)?;
    Ok((names, x))
}

/// An error naming `input` unless images `x` [N, C, H, W] fit the model once resized (or windowed) to
/// `size`: only their rank and channel count must fit.
fn check_inputs(model: &PeftModel, input: &Path, x: &Tensor, size: i64) -> Result<()> {
    let mut shape = x.size();
    if shape.len() == 4 {
        (shape[2], shape[3]) = (size, size);
    }
    model.bb.check_input(&shape).map_err(|e| anyhow!("{}: {e}", input.display()))
}

/// Predictions of the finished run in `run` for `input` (an image, a folder of images, or a float32
/// `.npy`), written to `out`: a CSV (input, label, one probability column per class) or, for
/// segmentation runs, a folder of PNG masks. Returns how many were written.
pub fn predict(run: &Path, input: &Path, out: &Path, device: Device) -> Result<usize> {
    let rec = RunRecord::read(run)?;
    let model = rec.load_trained(run, device)?;
    if rec.task == Task::Segmentation
        && let Some(t) = rec.config.seg.tiles(model.bb.vit.config().img_size)
    {
        return predict_native(&model, &rec, input, out, t);
    }
    let (names, x) = read_inputs(input, &rec, &model)?;
    if rec.task != Task::Segmentation && out.exists() {
        return Err(crate::error::bad_input!(
            "{}: exists; choose another --out (nothing is overwritten)",
            out.display()
        ));
    }
    let size = model.bb.vit.config().img_size;
    let _g = tch::no_grad_guard();
    // The inputs stay on the host; only one batch at a time goes to the device (any number of files).
    let batch = |i: i64, b: i64| resize(&x.narrow(0, i, b).to_device(device), size);
    if rec.task == Task::Segmentation {
        let mut scores = |i: i64, b: i64| Ok(model.logits(&batch(i, b), false));
        return write_masks(&mut scores, 16, &names, out);
    }
    let n = x.size()[0];
    let chunks: Vec<Tensor> = (0..n).step_by(64).map(|i| model.logits(&batch(i, 64.min(n - i)), false)).collect();
    let logits = Tensor::cat(&chunks, 0);
    check_finite(&logits, "predictions")?;
    let probs = if rec.task == Task::Multilabel { logits.sigmoid() } else { logits.softmax(-1, Kind::Float) };
    let probs = probs.to_kind(Kind::Double).to_device(Device::Cpu);
    let k = probs.size()[1] as usize;
    let flat = Vec::<f64>::try_from(probs.flatten(0, -1))?;
    let mut csv = String::from("input,label");
    for j in 0..k {
        let _ = write!(csv, ",prob_{j}");
    }
    csv.push('\n');
    for (name, p) in names.iter().zip(flat.chunks(k)) {
        let label = if rec.task == Task::Multilabel {
            (0..k).filter(|&j| p[j] > 0.5).map(|j| j.to_string()).collect::<Vec<_>>().join(";")
        } else {
            (0..k).max_by(|&x, &y| p[x].total_cmp(&p[y])).unwrap_or(0).to_string()
        };
        let _ = write!(csv, "\"{}\",{label}", name.replace('"', "'"));
        for v in p {
            let _ = write!(csv, ",{v:.6}");
        }
        csv.push('\n');
    }
    crate::peft::io::write_text_atomic(out, &csv)?;
    Ok(names.len())
}

/// Output file stems for the inputs: a file's own stem, `<stem>_<i>` for the i-th array of a `.npy`; when
/// two inputs share a stem, each gets its index appended, so no mask overwrites another.
fn mask_stems(names: &[String]) -> Vec<String> {
    let stems: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let p = Path::new(n);
            match p.file_stem().and_then(|s| s.to_str()) {
                Some(s) if p.is_file() => s.to_string(),
                _ => format!(
                    "{}_{i}",
                    n.split('[').next().and_then(|f| Path::new(f).file_stem()?.to_str()).unwrap_or("input")
                ),
            }
        })
        .collect();
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for s in &stems {
        *seen.entry(s.as_str()).or_default() += 1;
    }
    // A suffixed name can equal another input's own stem ("a" twice and "a_1"): every name is checked
    // against those already given.
    let mut used = std::collections::HashSet::new();
    stems
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut name = if seen[s.as_str()] > 1 { format!("{s}_{i}") } else { s.clone() };
            let mut k = 1;
            while !used.insert(name.clone()) {
                name = format!("{s}_{i}_{k}");
                k += 1;
            }
            name
        })
        .collect()
}

/// An error when a model output holds NaN or infinity (broken weights or inputs): such numbers must
/// never be written as predictions or embeddings.
fn check_finite(t: &Tensor, what: &str) -> Result<()> {
    if t.isfinite().all().int64_value(&[]) == 0 {
        bail!("the model produced non-finite {what} (NaN or infinity): its weights or the inputs are broken");
    }
    Ok(())
}

/// Per-pixel classes of one image at `(h, w)`: the logits [1, K, h0, w0] resized bilinearly band by band
/// (the same values as one bilinear resize; memory bounded by a band, not by the image), then argmax.
fn class_map(logits: &Tensor, h: i64, w: i64) -> Result<Vec<u8>> {
    const BAND: i64 = 256;
    let dev = logits.device();
    let xs = Tensor::arange(w, (Kind::Float, dev)).g_add_scalar(0.5).g_mul_scalar(2.0 / w as f64).g_sub_scalar(1.0);
    let mut out = Vec::with_capacity((h * w) as usize);
    for y0 in (0..h).step_by(BAND as usize) {
        let rows = BAND.min(h - y0);
        let ys = Tensor::arange_start(y0, y0 + rows, (Kind::Float, dev))
            .g_add_scalar(0.5)
            .g_mul_scalar(2.0 / h as f64)
            .g_sub_scalar(1.0);
        // grid [1, rows, w, 2] of (x, y) in [-1, 1], align_corners = false: the resize's sampling points.
        let grid =
            Tensor::stack(&[xs.unsqueeze(0).expand([rows, w], false), ys.unsqueeze(1).expand([rows, w], false)], 2)
                .unsqueeze(0);
        // Bilinear (0), border padding (1): the resize clamps at the edges too.
        let band = logits.grid_sampler(&grid, 0, 1, false).argmax(1, false).to_kind(Kind::Uint8).to_device(Device::Cpu);
        out.extend(Vec::<u8>::try_from(band.flatten(0, -1))?);
    }
    Ok(out)
}

/// Writes one PNG mask per input into the new folder `out` (built as `<out>.partial`, renamed when
/// complete): `scores(i, b)` gives class scores [b, K, h, w] of inputs i..i+b, resized to each input
/// file's own size (`chunk` inputs at a time).
fn write_masks(
    scores: &mut dyn FnMut(i64, i64) -> Result<Tensor>,
    chunk: i64,
    names: &[String],
    out: &Path,
) -> Result<usize> {
    if out.exists() {
        return Err(crate::error::bad_input!(
            "{}: exists; choose another --out (nothing is overwritten)",
            out.display()
        ));
    }
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("masks");
    let work = out.with_file_name(format!("{name}.partial"));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("{}: cannot create folder", work.display()))?;
    let paths: Vec<PathBuf> = mask_stems(names).iter().map(|s| work.join(format!("{s}.png"))).collect();
    let n = names.len() as i64;
    for i in (0..n).step_by(chunk.max(1) as usize) {
        let b = chunk.max(1).min(n - i);
        let logits = scores(i, b)?;
        check_finite(&logits, "mask logits")?;
        let classes = logits.size()[1];
        for j in 0..b {
            let k = (i + j) as usize;
            let l = logits.get(j).unsqueeze(0);
            let (h, w) = match image::image_dimensions(&names[k]) {
                Ok((w, h)) => (h as i64, w as i64),
                Err(_) => (l.size()[2], l.size()[3]),
            };
            let mut m = class_map(&l, h, w)?;
            if classes == 2 {
                m.iter_mut().for_each(|v| *v *= 255);
            }
            image::GrayImage::from_raw(w as u32, h as u32, m)
                .ok_or_else(|| anyhow!("mask buffer"))?
                .save(&paths[k])
                .with_context(|| format!("{}: cannot write", paths[k].display()))?;
        }
    }
    std::fs::rename(&work, out).with_context(|| format!("{}: cannot move the masks into place", out.display()))?;
    Ok(names.len())
}

/// Native-resolution segmentation runs: masks of `input` (image files, or a float32 `.npy` of normalised
/// images) by sliding windows over each whole image at the run's stored resolution (its own size, or
/// `data_size`), one image at a time, written at each file's own size.
fn predict_native(model: &PeftModel, rec: &RunRecord, input: &Path, out: &Path, t: Tiles) -> Result<usize> {
    let cfg = model.bb.vit.config();
    let (names, npy): (Vec<String>, Option<Tensor>) = if input.extension().is_some_and(|e| e == "npy") {
        let x = npy::read_f32(input)?;
        check_inputs(model, input, &x, t.size)?;
        ((0..x.size()[0]).map(|i| format!("{}[{i}]", input.display())).collect(), Some(x))
    } else {
        let files = images::list_images(input)?;
        (files.iter().map(|f| f.display().to_string()).collect(), None)
    };
    let size = rec.config.seg.data_size as u32;
    let grey = cfg.in_chans == 1;
    let _g = tch::no_grad_guard();
    let mut scores = |i: i64, _b: i64| -> Result<Tensor> {
        let x = match &npy {
            Some(x) => x.get(i),
            None => {
                let f = Path::new(&names[i as usize]);
                let x = images::load_image(f, size, grey, &rec.config.norm)?;
                check_inputs(model, f, &x.unsqueeze(0), t.size)?;
                x
            }
        };
        Ok(model.segment(&x.to_device(model.device), t, 16)?.unsqueeze(0))
    };
    write_masks(&mut scores, 1, &names, out)
}

/// Folds the PEFT updates of the finished run in `run` into the backbone (in fp32 on the CPU, whatever
/// device trained it) and writes a plain timm checkpoint with the task head to `out`. Returns the
/// number of tensors written.
pub fn export_merged(run: &Path, out: &Path) -> Result<usize> {
    if out.exists() {
        return Err(crate::error::bad_input!(
            "{}: exists; choose another --out (nothing is overwritten)",
            out.display()
        ));
    }
    let rec = RunRecord::read(run)?;
    let mut model = rec.load_trained(run, Device::Cpu)?;
    crate::peft::merge(&mut model.bb.vit, &rec.peft).with_context(|| run.display().to_string())?;
    let named = model.bb.vit.state_dict().map_err(|e| anyhow!("{}: {e}", run.display()))?;
    crate::peft::io::write_safetensors_atomic(out, &named)?;
    Ok(named.len())
}

/// What to embed and how.
pub struct EmbedInput {
    /// An image file, a folder of images, or a float32 `.npy` of preprocessed images [N, C, H, W].
    pub input: PathBuf,
    /// Normalisation of image files.
    pub norm: crate::data::transforms::Norm,
    /// Read image files as 1-channel grey.
    pub grey: bool,
    /// Images per forward pass.
    pub batch_size: i64,
}

/// Pooled backbone features [N, D] (fp32, on the CPU) of the images of `what`, in sorted file order.
pub fn embed(backbone: &BackboneSource, what: &EmbedInput, device: Device) -> Result<Tensor> {
    if what.batch_size <= 0 {
        return Err(crate::error::bad_input!("--batch-size must be positive"));
    }
    let (bb, _) = backbone.load(device)?;
    let size = bb.vit.config().img_size;
    let input = if what.input.extension().is_some_and(|e| e == "npy") {
        npy::read_f32(&what.input)?
    } else {
        let files = images::list_images(&what.input)?;
        let imgs = files
            .iter()
            .map(|f| images::load_image(f, size as u32, what.grey, &what.norm))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&imgs, 0)
    };
    bb.check_input(&input.size()).map_err(|e| crate::error::bad_input!("{}: {e}", what.input.display()))?;
    let _g = tch::no_grad_guard();
    let n = input.size()[0];
    let mut outs = Vec::new();
    for i in (0..n).step_by(what.batch_size as usize) {
        let x = input.narrow(0, i, what.batch_size.min(n - i)).to_device(device);
        let f = crate::device::autocast(device, || bb.vit.embed(&x));
        outs.push(f.to_kind(Kind::Float).to_device(Device::Cpu));
    }
    let out = Tensor::cat(&outs, 0);
    check_finite(&out, "embeddings")?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn band_by_band_resize_gives_the_classes_of_one_bilinear_resize() {
        tch::manual_seed(3);
        let l = Tensor::randn([1, 3, 7, 9], (Kind::Float, Device::Cpu));
        for (h, w) in [(7, 9), (600, 300), (5, 4), (257, 513)] {
            let want = l.upsample_bilinear2d([h, w], false, None, None).argmax(1, false).to_kind(Kind::Uint8);
            let want = Vec::<u8>::try_from(want.flatten(0, -1)).unwrap();
            let got = class_map(&l, h, w).unwrap();
            let differ = want.iter().zip(&got).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "{h}x{w}: {differ} pixels differ");
        }
    }

    #[test]
    fn mask_names_never_collide() {
        let names = ["a.npy[0]".to_string(), "a.npy[1]".to_string(), "x/b.png".to_string(), "y/b.png".to_string()];
        let stems = mask_stems(&names);
        assert_eq!(stems, ["a_0", "a_1", "b_2", "b_3"]);
        // Files: two `a` and one `a_1`; the suffixed `a_1` must not take the third one's name.
        let dir = std::env::temp_dir().join(format!("tpp-stems-{}", std::process::id()));
        let files: Vec<String> = ["d1/a.png", "d2/a.png", "d3/a_1.png"]
            .iter()
            .map(|f| {
                let p = dir.join(f);
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, b"x").unwrap();
                p.display().to_string()
            })
            .collect();
        let stems = mask_stems(&files);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(stems.len(), 3);
        assert!(stems.iter().all(|s| stems.iter().filter(|t| *t == s).count() == 1), "{stems:?}");
    }
}
