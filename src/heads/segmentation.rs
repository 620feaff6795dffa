//! Segmentation heads on ViT features, their losses, and sliding-window inference.
//!
//! Two heads (`SegConfig::head`), both made of target parameters (`seg_head.*`):
//! - `pup` (SETR-PUP style, fed by several blocks): patch tokens of 4 evenly spaced blocks are
//!   concatenated, projected (1x1 conv), then upsampled x2 per stage with conv3x3 + GroupNorm + ReLU until
//!   the patch size is undone; a 1x1 conv gives class logits at input resolution. Channels halve at each
//!   stage (down to 32): with SETR's constant width the full-resolution convolutions cost several times
//!   the ViT-S backbone itself. It only sees tokens, so nothing thinner than a patch survives.
//! - `unetr` (UNETR / ViT-adapter style): the same projected ViT features, upsampled stage by stage to
//!   1/8, 1/4, 1/2 and full resolution, fused at 1/4, 1/2 and 1 with features of a small convolutional stem
//!   run on the input image itself, so 1-px structures (vessels, borders) reach the output.
//!
//! With `SegConfig::native`, training uses random crops of the model's input size taken from the images
//! at their stored resolution, and evaluation and prediction slide overlapping windows over the whole
//! image ([`sliding_window`], Gaussian blending as in nnU-Net), so metrics are computed at that resolution.
use crate::backbone::Vit;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// Which segmentation head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeadKind {
    /// Tokens only, progressive upsampling (SETR-PUP): blob-like targets.
    #[default]
    Pup,
    /// ViT features fused with a full-resolution convolutional stem (UNETR-style): fine structures.
    Unetr,
}

/// The segmentation loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SegLoss {
    /// Pixel cross-entropy + soft Dice of the foreground classes.
    #[default]
    CeDice,
    /// Focal cross-entropy (gamma 2: easy background pixels count little) + soft Dice.
    FocalDice,
    /// Cross-entropy + soft Dice + soft clDice (Shit et al., CVPR 2021: Dice of the soft skeletons, which
    /// rewards keeping thin structures connected), Dice and clDice weighted 0.5 each.
    Cldice,
}

macro_rules! named_enum {
    ($t:ty, $what:literal, $($v:path => $n:literal),+) => {
        impl $t {
            /// Its name in configs and flags.
            pub fn name(self) -> &'static str {
                match self { $($v => $n),+ }
            }
        }
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($n => Ok($v),)+
                    _ => Err(format!(concat!("unknown ", $what, " '{}' (expected one of {})"), s, [$($n),+].join(", "))),
                }
            }
        }
        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}
named_enum!(HeadKind, "segmentation head", HeadKind::Pup => "pup", HeadKind::Unetr => "unetr");
named_enum!(SegLoss, "segmentation loss", SegLoss::CeDice => "ce-dice", SegLoss::FocalDice => "focal-dice", SegLoss::Cldice => "cldice");

/// How a segmentation run sees its images (`[finetune.seg]` in a compare config, `--seg-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegConfig {
    /// The head.
    pub head: HeadKind,
    /// Train on random crops of the model's input size from the images at their stored resolution, and
    /// evaluate / predict with sliding windows over whole images (false: every image resized to the
    /// model's input).
    pub native: bool,
    /// With `native`: the stored resolution, N x N (0: the files' own size, which all pairs must share).
    pub data_size: i64,
    /// With `native`: training crops per image and epoch.
    pub crops_per_image: i64,
    /// With `native`: overlap of neighbouring sliding windows, a fraction of the window.
    pub overlap: f64,
    /// The loss.
    pub loss: SegLoss,
}

impl Default for SegConfig {
    fn default() -> Self {
        SegConfig {
            head: HeadKind::Pup,
            native: false,
            data_size: 0,
            crops_per_image: 1,
            overlap: 0.5,
            loss: SegLoss::CeDice,
        }
    }
}

impl SegConfig {
    /// Rejects values no run could use, naming the option.
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::check::int("seg.data_size (--seg-data-size)", self.data_size, 0, crate::backbone::MAX_IMG_SIZE)?;
        crate::check::int("seg.crops_per_image (--seg-crops-per-image)", self.crops_per_image, 1, 10_000)?;
        crate::check::float("seg.overlap (--seg-overlap)", self.overlap, crate::check::OVERLAP)?;
        if !self.native && (self.data_size != 0 || self.crops_per_image != 1) {
            return Err(crate::error::bad_input!(
                "seg.data_size and seg.crops_per_image (--seg-data-size, --seg-crops-per-image) apply to native-resolution \
                 training only; add --seg-native (native = true)"
            ));
        }
        Ok(())
    }

    /// The crops and windows of native-resolution runs for a model input of `size` px (None: resized whole
    /// images).
    pub fn tiles(&self, size: i64) -> Option<crate::data::loader::Tiles> {
        self.native.then_some(crate::data::loader::Tiles {
            size,
            overlap: self.overlap,
            per_image: self.crops_per_image,
        })
    }
}

/// A 2-D convolution (same padding).
pub struct Conv {
    pub(crate) w: Tensor,
    pub(crate) b: Tensor,
    stride: i64,
}

impl Conv {
    fn new(p: nn::Path, cin: i64, cout: i64, k: i64) -> Self {
        Self::strided(p, cin, cout, k, 1)
    }
    fn strided(p: nn::Path, cin: i64, cout: i64, k: i64, stride: i64) -> Self {
        let fan_in = (cin * k * k) as f64;
        let bound = (1.0 / fan_in).sqrt();
        Conv {
            w: p.var("weight", &[cout, cin, k, k], Init::Uniform { lo: -bound, up: bound }),
            b: p.var("bias", &[cout], Init::Const(0.0)),
            stride,
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let k = self.w.size()[2];
        x.conv2d(&self.w, Some(&self.b), [self.stride, self.stride], [k / 2, k / 2], [1, 1], 1)
    }
}

/// GroupNorm parameters.
pub struct GroupNorm {
    pub(crate) w: Tensor,
    pub(crate) b: Tensor,
    pub(crate) groups: i64,
}

/// conv3x3 (or strided) + GroupNorm + ReLU.
pub struct ConvBlock {
    conv: Conv,
    norm: GroupNorm,
}

impl ConvBlock {
    fn new(p: &nn::Path, cin: i64, cout: i64, stride: i64) -> Self {
        ConvBlock {
            conv: Conv::strided(p / "conv", cin, cout, 3, stride),
            norm: GroupNorm {
                w: (p / "norm").var("weight", &[cout], Init::Const(1.0)),
                b: (p / "norm").var("bias", &[cout], Init::Const(0.0)),
                groups: 8.min(cout),
            },
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let n = &self.norm;
        self.conv.forward(x).group_norm(n.groups, Some(&n.w), Some(&n.b), 1e-5, true).relu()
    }
}

/// The segmentation head (its parameters are target parameters).
pub struct SegHead {
    pub(crate) kind: HeadKind,
    pub(crate) levels: Vec<usize>,
    pub(crate) proj: Conv,
    /// Decoder stages: x2 upsampling steps (pup), or the 1/8, 1/4, 1/2 and full-resolution stages (unetr).
    pub(crate) stages: Vec<ConvBlock>,
    /// unetr: the stem on the input image; its outputs 1, 2 and 3 are the full, 1/2 and 1/4 skips.
    pub(crate) stem: Vec<ConvBlock>,
    pub(crate) cls: Conv,
}

/// 4 evenly spaced blocks ending with the last one (fewer for shallow models).
pub fn default_levels(depth: usize) -> Vec<usize> {
    let n = depth.min(4);
    let mut v: Vec<usize> = (1..=n).map(|i| i * depth / n - 1).collect();
    v.dedup();
    v
}

/// Stem widths at full, 1/2 and 1/4 resolution, and decoder widths at 1/8, 1/4, 1/2 and full resolution
/// (unetr).
const STEM: [i64; 3] = [16, 32, 64];
const DECODER: [i64; 4] = [96, 64, 32, 16];

impl SegHead {
    /// A fresh head of `kind` under `p` for `vit`, `num_classes` outputs, `channels` after the projection.
    pub fn new(p: &nn::Path, vit: &Vit, kind: HeadKind, num_classes: i64, channels: i64) -> Self {
        let levels = default_levels(vit.depth());
        let d = vit.config().embed_dim;
        let hp = p / "seg_head";
        let proj = Conv::new(&hp / "proj", d * levels.len() as i64, channels, 1);
        match kind {
            HeadKind::Pup => {
                let ups = (vit.config().patch_size as f64).log2().ceil() as i64;
                let mut cin = channels;
                let stages = (0..ups)
                    .map(|i| {
                        let cout = (cin / 2).max(32.min(cin));
                        let b = ConvBlock::new(&(&hp / "up" / i), cin, cout, 1);
                        cin = cout;
                        b
                    })
                    .collect();
                SegHead {
                    kind,
                    proj,
                    stages,
                    stem: Vec::new(),
                    cls: Conv::new(&hp / "cls", cin, num_classes, 1),
                    levels,
                }
            }
            HeadKind::Unetr => {
                let c = vit.config().in_chans;
                let sp = &hp / "stem";
                let stem = vec![
                    ConvBlock::new(&(&sp / 0), c, STEM[0], 1),
                    ConvBlock::new(&(&sp / 1), STEM[0], STEM[0], 1),
                    ConvBlock::new(&(&sp / 2), STEM[0], STEM[1], 2),
                    ConvBlock::new(&(&sp / 3), STEM[1], STEM[2], 2),
                ];
                // Stage i takes the previous stage (or the projection) plus the skip of its resolution.
                let skips = [0, STEM[2], STEM[1], STEM[0]];
                let mut cin = channels;
                let stages = (0..4)
                    .map(|i| {
                        let b = ConvBlock::new(&(&hp / "up" / i), cin + skips[i], DECODER[i], 1);
                        cin = DECODER[i];
                        b
                    })
                    .collect();
                SegHead { kind, proj, stages, stem, cls: Conv::new(&hp / "cls", cin, num_classes, 1), levels }
            }
        }
    }

    /// Class logits [B, K, H, W] for images [B, C, H, W].
    pub fn forward(&self, vit: &Vit, x: &Tensor, train: bool) -> Tensor {
        let (b, _, h, w) = x.size4().expect("images are [B, C, H, W]");
        let p = vit.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let (_, feats) = vit.run_blocks(vit.embed_tokens(x), train, &self.levels);
        let maps: Vec<Tensor> =
            feats.iter().map(|f| vit.patch_tokens(f).transpose(1, 2).reshape([b, vit.cfg.embed_dim, gh, gw])).collect();
        let mut y = self.proj.forward(&Tensor::cat(&maps, 1));
        let up = |y: &Tensor, hh: i64, ww: i64| y.upsample_bilinear2d([hh, ww], false, None, None);
        match self.kind {
            HeadKind::Pup => {
                for s in &self.stages {
                    let (hh, ww) = (y.size()[2] * 2, y.size()[3] * 2);
                    y = s.forward(&up(&y, hh, ww));
                }
            }
            HeadKind::Unetr => {
                let mut s = x.shallow_clone();
                let mut skips = Vec::with_capacity(3);
                for (i, blk) in self.stem.iter().enumerate() {
                    s = blk.forward(&s);
                    if i > 0 {
                        skips.push(s.shallow_clone());
                    }
                }
                // Full, 1/2, 1/4 skips; the 1/8 stage has none.
                let q = skips[2].size();
                y = self.stages[0].forward(&up(&y, (q[2] + 1) / 2, (q[3] + 1) / 2));
                for (stage, skip) in self.stages[1..].iter().zip(skips.iter().rev()) {
                    let (hh, ww) = (skip.size()[2], skip.size()[3]);
                    y = stage.forward(&Tensor::cat(&[up(&y, hh, ww), skip.shallow_clone()], 1));
                }
            }
        }
        let y = self.cls.forward(&y);
        if y.size()[2] != h || y.size()[3] != w { up(&y, h, w) } else { y }
    }
}

/// The loss of `logits` [B, K, H, W] against `masks` [B, H, W].
pub fn loss(logits: &Tensor, masks: &Tensor, kind: SegLoss) -> Tensor {
    let k = logits.size()[1];
    let (pixel, sums) = loss_parts(logits, masks, kind);
    pixel + from_sums(&sums, k, kind)
}

/// A loss's two parts: the pixel-mean term (cross-entropy or focal) and the global sums its ratio terms
/// (Dice, clDice) are made of, per foreground class, concatenated.
fn loss_parts(logits: &Tensor, masks: &Tensor, kind: SegLoss) -> (Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    let k = logits.size()[1];
    let logp = logits.log_softmax(1, Kind::Float);
    let pixel = match kind {
        SegLoss::FocalDice => {
            // -(1 - p_t)^2 log p_t, the true class's log-probability gathered per pixel.
            let lpt = logp.gather(1, &masks.unsqueeze(1), false).squeeze_dim(1);
            let w = (-lpt.exp() + 1.0).square();
            (-(w * lpt)).mean(Kind::Float)
        }
        _ => logp.nll_loss_nd::<Tensor>(masks, None, tch::Reduction::Mean, -100),
    };
    let probs = logp.exp();
    let onehot = masks.one_hot(k).permute([0, 3, 1, 2]).to_kind(Kind::Float);
    let first = dice_first(k);
    let p = probs.narrow(1, first, k - first);
    let y = onehot.narrow(1, first, k - first);
    let dims = [0i64, 2, 3];
    let sum = |t: &Tensor| t.sum_dim_intlist(dims.as_slice(), false, Kind::Float);
    let mut sums = vec![sum(&(&p * &y)), sum(&p) + sum(&y)];
    if kind == SegLoss::Cldice {
        let (sp, sy) = (soft_skeleton(&p, 3), soft_skeleton(&y, 3));
        sums.extend([sum(&(&sp * &y)), sum(&sp), sum(&(&sy * &p)), sum(&sy)]);
    }
    (pixel, Tensor::cat(&sums, 0))
}

/// The ratio terms of the loss from its global sums (see [`loss_parts`]).
fn from_sums(sums: &Tensor, k: i64, kind: SegLoss) -> Tensor {
    let kk = k - dice_first(k);
    let part = |i: i64| sums.narrow(0, i * kk, kk);
    let dice_loss = 1.0 - dice(&part(0), &part(1)).mean(Kind::Float);
    if kind != SegLoss::Cldice {
        return dice_loss;
    }
    // Topology precision (skeleton of the prediction inside the truth) and sensitivity (the truth's
    // skeleton inside the prediction), smoothed like Dice.
    let tprec = (part(2) + 1.0) / (part(3) + 1.0);
    let tsens = (part(4) + 1.0) / (part(5) + 1.0);
    let cl = (&tprec * &tsens * 2.0) / (&tprec + &tsens);
    dice_loss * 0.5 + (1.0 - cl.mean(Kind::Float)) * 0.5
}

/// Number of global sums of a `k`-class loss.
fn num_sums(k: i64, kind: SegLoss) -> i64 {
    (k - dice_first(k)) * if kind == SegLoss::Cldice { 6 } else { 2 }
}

/// Soft morphological skeleton of probability maps [B, C, H, W] (clDice's soft-skeletonisation: min- and
/// max-pooling as erosion and dilation, `iters` thinning steps).
pub fn soft_skeleton(x: &Tensor, iters: usize) -> Tensor {
    let erode = |t: &Tensor| {
        let a = -(-t).max_pool2d([3, 1], [1, 1], [1, 0], [1, 1], false);
        let b = -(-t).max_pool2d([1, 3], [1, 1], [0, 1], [1, 1], false);
        a.minimum(&b)
    };
    let dilate = |t: &Tensor| t.max_pool2d([3, 3], [1, 1], [1, 1], [1, 1], false);
    let open = |t: &Tensor| dilate(&erode(t));
    let mut img = x.shallow_clone();
    let mut skel = (&img - open(&img)).relu();
    for _ in 0..iters {
        img = erode(&img);
        let delta = (&img - open(&img)).relu();
        skel = &skel + (&delta - &skel * &delta).relu();
    }
    skel
}

/// The first class Dice counts (the background is left out when there are others).
fn dice_first(k: i64) -> i64 {
    if k > 1 { 1 } else { 0 }
}

fn dice(inter: &Tensor, denom: &Tensor) -> Tensor {
    (inter * 2.0 + 1.0) / (denom + 1.0)
}

/// Data-parallel: this process's part of [`loss`] of the global batch, given its `shard` (None: an empty
/// shard) of a `k`-class problem. The ratio terms' sums are the global batch's (summed across processes,
/// the other processes' parts held constant), so summed over processes the value and the gradients are
/// those of one process on the whole batch.
pub fn shard_loss(
    part: Option<(&Tensor, &Tensor)>,
    k: i64,
    kind: SegLoss,
    shard: crate::dist::Shard,
    g: &crate::dist::Group,
    device: tch::Device,
) -> anyhow::Result<Tensor> {
    let Some((logits, masks)) = part else {
        let _ = g.sum(&Tensor::zeros([num_sums(k, kind)], (Kind::Float, device)))?;
        return Ok(Tensor::zeros([], (Kind::Float, device)));
    };
    let (pixel, sums) = loss_parts(logits, masks, kind);
    let all = g.sum(&sums.detach())?;
    let sums = &sums + (all - sums.detach());
    let x = from_sums(&sums, k, kind);
    let share = shard.share();
    // Value: this shard's share of the global ratio terms; gradient: the whole terms', for this shard.
    Ok(pixel * share + &x - (&x * (1.0 - share)).detach())
}

/// Class probabilities [K, H, W] of one normalised image [C, H, W] of any size: overlapping windows of
/// `win` px (stride `win * (1 - overlap)`), `batch` at a time through `f` (windows [B, C, win, win] ->
/// logits [B, K, win, win]), softmax, blended with a Gaussian weight (sigma win / 8, as nnU-Net) that
/// trusts window centres over borders. An image smaller than a window is zero-padded. Memory: the image,
/// the [K, H, W] sums and one batch of windows, whatever the image's size.
pub fn sliding_window(
    image: &Tensor,
    win: i64,
    overlap: f64,
    batch: i64,
    f: &mut dyn FnMut(&Tensor) -> anyhow::Result<Tensor>,
) -> anyhow::Result<Tensor> {
    let (_, h, w) = image.size3().map_err(|e| anyhow::anyhow!("sliding window: image is not [C, H, W] ({e})"))?;
    let (ph, pw) = (h.max(win), w.max(win));
    let x = if (ph, pw) != (h, w) { image.constant_pad_nd([0, pw - w, 0, ph - h]) } else { image.shallow_clone() };
    let stride = ((win as f64 * (1.0 - overlap)).round() as i64).max(1);
    let starts = |len: i64| {
        let mut v: Vec<i64> = (0..).map(|i| i * stride).take_while(|s| s + win < len).collect();
        v.push(len - win);
        v
    };
    let boxes: Vec<(i64, i64)> =
        starts(ph).into_iter().flat_map(|y| starts(pw).into_iter().map(move |x| (y, x))).collect();
    let dev = image.device();
    let g = {
        let t = Tensor::arange(win, (Kind::Float, dev)) - (win - 1) as f64 / 2.0;
        let sigma = win as f64 / 8.0;
        (-(&t * &t) / (2.0 * sigma * sigma)).exp()
    };
    let weight = (g.unsqueeze(1) * g.unsqueeze(0)).clamp_min(1e-3);
    let mut acc: Option<Tensor> = None;
    let wsum = Tensor::zeros([ph, pw], (Kind::Float, dev));
    for chunk in boxes.chunks(batch.max(1) as usize) {
        let crops: Vec<Tensor> = chunk.iter().map(|&(y, xx)| x.narrow(1, y, win).narrow(2, xx, win)).collect();
        let probs = f(&Tensor::stack(&crops, 0))?.to_kind(Kind::Float).softmax(1, Kind::Float);
        let k = probs.size()[1];
        let acc = acc.get_or_insert_with(|| Tensor::zeros([k, ph, pw], (Kind::Float, dev)));
        for (j, &(y, xx)) in chunk.iter().enumerate() {
            let _ = acc.narrow(1, y, win).narrow(2, xx, win).g_add_(&(probs.get(j as i64) * &weight));
            let _ = wsum.narrow(0, y, win).narrow(1, xx, win).g_add_(&weight);
        }
    }
    let acc = acc.ok_or_else(|| anyhow::anyhow!("sliding window: no windows"))?;
    Ok((acc / wsum).narrow(1, 0, h).narrow(2, 0, w))
}

/// Per-image, per-class (intersection, predicted, true) pixel counts of argmax predictions.
pub fn counts(logits: &Tensor, masks: &Tensor) -> Vec<Vec<[f64; 3]>> {
    let k = logits.size()[1];
    let pred = logits.argmax(1, false);
    let b = pred.size()[0];
    let mut out = vec![vec![[0.0; 3]; k as usize]; b as usize];
    for c in 0..k {
        let pc = pred.eq(c).to_kind(Kind::Float);
        let tc = masks.eq(c).to_kind(Kind::Float);
        let dims = [1i64, 2];
        let i = Vec::<f64>::try_from(
            (&pc * &tc).sum_dim_intlist(dims.as_slice(), false, Kind::Double).to_device(tch::Device::Cpu),
        )
        .unwrap_or_default();
        let pp =
            Vec::<f64>::try_from(pc.sum_dim_intlist(dims.as_slice(), false, Kind::Double).to_device(tch::Device::Cpu))
                .unwrap_or_default();
        let tt =
            Vec::<f64>::try_from(tc.sum_dim_intlist(dims.as_slice(), false, Kind::Double).to_device(tch::Device::Cpu))
                .unwrap_or_default();
        for j in 0..b as usize {
            out[j][c as usize] = [i[j], pp[j], tt[j]];
        }
    }
    out
}
