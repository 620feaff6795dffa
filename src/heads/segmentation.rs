//! A multi-level progressive-upsampling segmentation head (SETR-PUP style, fed by several blocks): patch
//! tokens of 4 evenly spaced blocks are concatenated, projected (1x1 conv), then upsampled x2 per stage
//! with conv3x3 + GroupNorm + ReLU until the patch size is undone; a 1x1 conv gives class logits at input
//! resolution. Channels halve at each stage (down to 32): with SETR's constant width the full-resolution
//! convolutions cost several times the ViT-S backbone itself. Its parameters are target parameters
//! (`seg_head.*`).
use crate::backbone::Vit;
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// A 2-D convolution (same padding).
pub struct Conv {
    pub(crate) w: Tensor,
    pub(crate) b: Tensor,
}

impl Conv {
    fn new(p: nn::Path, cin: i64, cout: i64, k: i64) -> Self {
        let fan_in = (cin * k * k) as f64;
        let bound = (1.0 / fan_in).sqrt();
        Conv {
            w: p.var("weight", &[cout, cin, k, k], Init::Uniform { lo: -bound, up: bound }),
            b: p.var("bias", &[cout], Init::Const(0.0)),
        }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let k = self.w.size()[2];
        x.conv2d(&self.w, Some(&self.b), [1, 1], [k / 2, k / 2], [1, 1], 1)
    }
}

/// GroupNorm parameters.
pub struct GroupNorm {
    pub(crate) w: Tensor,
    pub(crate) b: Tensor,
    pub(crate) groups: i64,
}

/// The segmentation head (its parameters are target parameters).
pub struct SegHead {
    pub(crate) levels: Vec<usize>,
    pub(crate) proj: Conv,
    pub(crate) stages: Vec<(Conv, GroupNorm)>,
    pub(crate) cls: Conv,
}

/// 4 evenly spaced blocks ending with the last one (fewer for shallow models).
pub fn default_levels(depth: usize) -> Vec<usize> {
    let n = depth.min(4);
    let mut v: Vec<usize> = (1..=n).map(|i| i * depth / n - 1).collect();
    v.dedup();
    v
}

impl SegHead {
    /// A fresh head under `p` for `vit`, `num_classes` outputs, `channels` after the projection.
    pub fn new(p: &nn::Path, vit: &Vit, num_classes: i64, channels: i64) -> Self {
        let levels = default_levels(vit.depth());
        let d = vit.config().embed_dim;
        let ups = (vit.config().patch_size as f64).log2().ceil() as i64;
        let hp = p / "seg_head";
        let mut cin = channels;
        let stages = (0..ups)
            .map(|i| {
                let cout = (cin / 2).max(32.min(cin));
                let sp = &hp / "up" / i;
                let conv = Conv::new(&sp / "conv", cin, cout, 3);
                let gn = GroupNorm {
                    w: (&sp / "norm").var("weight", &[cout], Init::Const(1.0)),
                    b: (&sp / "norm").var("bias", &[cout], Init::Const(0.0)),
                    groups: 8.min(cout),
                };
                cin = cout;
                (conv, gn)
            })
            .collect();
        SegHead {
            proj: Conv::new(&hp / "proj", d * levels.len() as i64, channels, 1),
            stages,
            cls: Conv::new(&hp / "cls", cin, num_classes, 1),
            levels,
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
        for (conv, gn) in &self.stages {
            let (hh, ww) = (y.size()[2] * 2, y.size()[3] * 2);
            y = y.upsample_bilinear2d([hh, ww], false, None, None);
            y = conv.forward(&y).group_norm(gn.groups, Some(&gn.w), Some(&gn.b), 1e-5, true).relu();
        }
        let y = self.cls.forward(&y);
        if y.size()[2] != h || y.size()[3] != w { y.upsample_bilinear2d([h, w], false, None, None) } else { y }
    }
}

/// Cross-entropy plus soft Dice over the foreground classes (all classes when K = 1).
pub fn loss(logits: &Tensor, masks: &Tensor) -> Tensor {
    let (ce, inter, denom) = loss_parts(logits, masks);
    ce + (1.0 - dice(&inter, &denom).mean(Kind::Float))
}

/// Pixel-mean cross-entropy, and the soft-Dice intersections and denominators per foreground class,
/// summed over the batch.
fn loss_parts(logits: &Tensor, masks: &Tensor) -> (Tensor, Tensor, Tensor) {
    let logits = logits.to_kind(Kind::Float);
    let k = logits.size()[1];
    let ce = logits.cross_entropy_loss::<Tensor>(masks, None, tch::Reduction::Mean, -100, 0.0);
    let probs = logits.softmax(1, Kind::Float);
    let onehot = masks.one_hot(k).permute([0, 3, 1, 2]).to_kind(Kind::Float);
    let first = dice_first(k);
    let p = probs.narrow(1, first, k - first);
    let y = onehot.narrow(1, first, k - first);
    let dims = [0i64, 2, 3];
    let inter = (&p * &y).sum_dim_intlist(dims.as_slice(), false, Kind::Float);
    let denom =
        p.sum_dim_intlist(dims.as_slice(), false, Kind::Float) + y.sum_dim_intlist(dims.as_slice(), false, Kind::Float);
    (ce, inter, denom)
}

/// The first class Dice counts (the background is left out when there are others).
fn dice_first(k: i64) -> i64 {
    if k > 1 { 1 } else { 0 }
}

fn dice(inter: &Tensor, denom: &Tensor) -> Tensor {
    (inter * 2.0 + 1.0) / (denom + 1.0)
}

/// Data-parallel: this process's part of [`loss`] of the global batch, given its `shard` (None: an empty
/// shard) of a `k`-class problem. The Dice sums are the global batch's (summed across processes, the
/// other processes' parts held constant), so summed over processes the value and the gradients are those
/// of one process on the whole batch.
pub fn shard_loss(
    part: Option<(&Tensor, &Tensor)>,
    k: i64,
    shard: crate::dist::Shard,
    g: &crate::dist::Group,
) -> anyhow::Result<Tensor> {
    let kk = k - dice_first(k);
    let Some((logits, masks)) = part else {
        let _ = g.sum(&Tensor::zeros([2 * kk], (Kind::Float, tch::Device::Cpu)))?;
        return Ok(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)));
    };
    let (ce, inter, denom) = loss_parts(logits, masks);
    let all = g.sum(&Tensor::cat(&[inter.detach(), denom.detach()], 0))?;
    let inter = &inter + (all.narrow(0, 0, kk) - inter.detach());
    let denom = &denom + (all.narrow(0, kk, kk) - denom.detach());
    let x = 1.0 - dice(&inter, &denom).mean(Kind::Float);
    let share = shard.share();
    // Value: this shard's share of the global Dice term; gradient: the whole term's, for this shard.
    Ok(ce * share + &x - (&x * (1.0 - share)).detach())
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
