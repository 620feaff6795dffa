//! Batch transforms on the compute device: an optional reflect-pad + random crop, one affine warp per
//! sample (random resized crop, flip, rotation) through `affine_grid` + `grid_sample`, intensity jitter,
//! resize and normalisation.
//! Masks follow the same warp with nearest-neighbour sampling. Random draws come from a seeded ChaCha
//! generator on the host, so runs repeat exactly on any device.
use crate::dist::Shard;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// A training augmentation: one affine warp per sample, an optional pad-crop, intensity jitter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Augment {
    /// Random horizontal flips.
    pub hflip: bool,
    /// Random vertical flips.
    pub vflip: bool,
    /// Random resized crop: minimum area fraction (1.0: no crop).
    pub crop_min_area: f64,
    /// Random resized crop: maximum area fraction.
    pub crop_max_area: f64,
    /// Maximum rotation in degrees.
    pub rotate_deg: f64,
    /// Brightness / contrast jitter amplitude (0: none).
    pub jitter: f64,
    /// Reflect-pad this many pixels, then crop back to the input size at a random offset, one offset
    /// per batch (the MedMNIST pilot protocol's augmentation; 0: none).
    pub pad_crop: i64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            hflip: true,
            vflip: false,
            crop_min_area: 0.8,
            crop_max_area: 1.0,
            rotate_deg: 0.0,
            jitter: 0.0,
            pad_crop: 0,
        }
    }
}

impl Augment {
    /// A training augmentation: random resized crop down to `crop_min_area` (default 0.8, or 1, no crop,
    /// with a pad-crop, so the two crops are not stacked by accident), flips, rotation, jitter.
    pub fn training(
        crop_min_area: Option<f64>,
        pad_crop: i64,
        hflip: bool,
        rotate: f64,
        jitter: f64,
    ) -> anyhow::Result<Augment> {
        let crop = crop_min_area.unwrap_or(if pad_crop > 0 { 1.0 } else { 0.8 });
        let a = Augment {
            hflip,
            vflip: false,
            crop_min_area: crop,
            crop_max_area: 1.0,
            rotate_deg: rotate,
            jitter,
            pad_crop,
        };
        a.validate()?;
        Ok(a)
    }

    /// Rejects values no augmentation can use, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        use crate::check::{DEGREES, UNIT, UNIT_OPEN_LOW, float, int};
        float("crop_min_area", self.crop_min_area, UNIT_OPEN_LOW)?;
        float("crop_max_area", self.crop_max_area, UNIT_OPEN_LOW)?;
        if self.crop_max_area < self.crop_min_area {
            let (lo, hi) = (self.crop_min_area, self.crop_max_area);
            return Err(crate::error::bad_input!("crop_max_area ({hi}) must be >= crop_min_area ({lo})"));
        }
        int("pad_crop", self.pad_crop, 0, crate::backbone::MAX_IMG_SIZE)?;
        float("rotate", self.rotate_deg, DEGREES)?;
        // Jitter scales brightness and contrast by 1 +- jitter: beyond 1 a factor can turn negative.
        float("jitter", self.jitter, UNIT)
    }

    /// No augmentation.
    pub const NONE: Augment = Augment {
        hflip: false,
        vflip: false,
        crop_min_area: 1.0,
        crop_max_area: 1.0,
        rotate_deg: 0.0,
        jitter: 0.0,
        pad_crop: 0,
    };

    fn is_identity_warp(&self) -> bool {
        !self.hflip && !self.vflip && self.crop_min_area >= 1.0 && self.rotate_deg == 0.0
    }

    /// Per-sample 2x3 affine matrices mapping output to input coordinates (in [-1, 1]).
    fn thetas(&self, b: i64, rng: &mut ChaCha8Rng) -> Vec<f32> {
        let mut th = Vec::with_capacity(b as usize * 6);
        for _ in 0..b {
            let max_area = self.crop_max_area.clamp(self.crop_min_area, 1.0);
            let area = if self.crop_min_area < 1.0 { rng.random_range(self.crop_min_area..=max_area) } else { 1.0 };
            let log_r = rng.random_range((3f64 / 4.0).ln()..=(4f64 / 3.0).ln());
            let r = if self.crop_min_area < 1.0 { log_r.exp() } else { 1.0 };
            let sx = (area * r).sqrt().min(1.0);
            let sy = (area / r).sqrt().min(1.0);
            let tx = if sx < 1.0 { rng.random_range(-(1.0 - sx)..=(1.0 - sx)) } else { 0.0 };
            let ty = if sy < 1.0 { rng.random_range(-(1.0 - sy)..=(1.0 - sy)) } else { 0.0 };
            let a = if self.rotate_deg > 0.0 {
                rng.random_range(-self.rotate_deg..=self.rotate_deg).to_radians()
            } else {
                0.0
            };
            let fx = if self.hflip && rng.random_bool(0.5) { -1.0 } else { 1.0 };
            let fy = if self.vflip && rng.random_bool(0.5) { -1.0 } else { 1.0 };
            let (c, s) = (a.cos(), a.sin());
            th.extend_from_slice(&[
                (c * sx * fx) as f32,
                (-s * sy) as f32,
                tx as f32,
                (s * sx * fx) as f32,
                (c * sy * fy) as f32,
                ty as f32,
            ]);
        }
        th
    }

    /// Warps images (float [B, C, H, W]) and, when given, masks (int64 [B, H, W]) identically.
    pub fn apply(&self, x: &Tensor, masks: Option<&Tensor>, rng: &mut ChaCha8Rng) -> (Tensor, Option<Tensor>) {
        let b = x.size()[0];
        self.apply_shard(x, masks, rng, Shard::whole(b))
    }

    /// As [`Self::apply`] for `shard`'s rows of a global batch (data-parallel training): the random draws
    /// are those of the whole global batch, so each image is warped as one process would warp it.
    pub fn apply_shard(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
        rng: &mut ChaCha8Rng,
        shard: Shard,
    ) -> (Tensor, Option<Tensor>) {
        let (_, _, h, w) = x.size4().expect("images are [B, C, H, W]");
        self.warp_shard(x, masks, (h, w), rng, shard)
    }

    /// As [`Self::apply`], sampling the output directly at `out` = (height, width) (multi-crop).
    pub fn warp(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
        out: (i64, i64),
        rng: &mut ChaCha8Rng,
    ) -> (Tensor, Option<Tensor>) {
        let b = x.size()[0];
        self.warp_shard(x, masks, out, rng, Shard::whole(b))
    }

    /// As [`Self::warp`] for `shard`'s rows (`x` holds `shard.len` images of a global batch of
    /// `shard.total`); an empty shard still draws, so every process's generator stays in step.
    pub fn warp_shard(
        &self,
        x: &Tensor,
        masks: Option<&Tensor>,
        out: (i64, i64),
        rng: &mut ChaCha8Rng,
        shard: Shard,
    ) -> (Tensor, Option<Tensor>) {
        let (b, c, h0, w0) = x.size4().expect("images are [B, C, H, W]");
        assert_eq!(b, shard.len, "a shard's images");
        let total = shard.total;
        let (h, w) = out;
        let mut x = x.shallow_clone();
        let mut m = masks.map(Tensor::shallow_clone);
        // Reflection padding needs a pad smaller than the image side.
        let p = self.pad_crop.min(h0 - 1).min(w0 - 1);
        if p > 0 {
            let dy = rng.random_range(0..=2 * p);
            let dx = rng.random_range(0..=2 * p);
            if b > 0 {
                let crop = |t: &Tensor| t.reflection_pad2d([p, p, p, p]).narrow(2, dy, h0).narrow(3, dx, w0);
                x = crop(&x);
                m = m.map(|m| crop(&m.unsqueeze(1).to_kind(Kind::Float)).squeeze_dim(1).to_kind(Kind::Int64));
            }
        }
        if !self.is_identity_warp() || (h, w) != (h0, w0) {
            let all = self.thetas(total, rng);
            if b == 0 {
                x = x.new_zeros([0, c, h, w], (x.kind(), x.device()));
                m = m.map(|m| m.new_zeros([0, h, w], (m.kind(), m.device())));
            } else {
                let th = &all[(shard.start * 6) as usize..((shard.start + b) * 6) as usize];
                let theta = Tensor::from_slice(th).reshape([b, 2, 3]).to_device(x.device()).to_kind(x.kind());
                let grid = Tensor::affine_grid_generator(&theta, [b, c, h, w], false);
                // padding_mode 2 = reflection (no black borders); interpolation 0 = bilinear, 1 = nearest.
                x = x.grid_sampler(&grid, 0, 2, false);
                m = m.map(|m| {
                    let m = m.unsqueeze(1).to_kind(grid.kind()).grid_sampler(&grid, 1, 2, false);
                    m.squeeze_dim(1).to_kind(Kind::Int64)
                });
            }
        }
        if self.jitter > 0.0 {
            let j: Vec<f32> = (0..2 * total).map(|_| rng.random_range(-self.jitter..=self.jitter) as f32).collect();
            if b > 0 {
                let j = Tensor::from_slice(&j).reshape([2, total, 1, 1, 1]).narrow(1, shard.start, b);
                let j = j.to_device(x.device()).to_kind(x.kind());
                let mean = x.mean_dim([1i64, 2, 3].as_slice(), true, None);
                // contrast around the image mean, then brightness
                x = (&x - &mean) * (j.get(0) + 1.0) + &mean + j.get(1);
            }
        }
        (x, m)
    }
}

/// A named normalisation, as configs and flags give it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Normalization {
    /// ImageNet mean and std (pre-trained RGB backbones).
    Imagenet,
    /// [-1, 1], as MedMNIST baselines and the pilot protocol use.
    Half,
    /// [0, 1], unchanged.
    None,
    /// The training split's own mean and std (recorded in the run).
    Dataset,
}

impl Normalization {
    /// The channel statistics ([`Norm::DATASET`] until resolved on a training split).
    pub fn norm(self) -> Norm {
        match self {
            Normalization::Imagenet => Norm::IMAGENET,
            Normalization::Half => Norm::HALF,
            Normalization::None => Norm::NONE,
            Normalization::Dataset => Norm::DATASET,
        }
    }
}

/// Channel normalisation (after scaling uint8 pixels to [0, 1]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Norm {
    /// Channel means.
    pub mean: [f64; 3],
    /// Channel standard deviations.
    pub std: [f64; 3],
}

impl Norm {
    /// ImageNet statistics.
    pub const IMAGENET: Norm = Norm { mean: [0.485, 0.456, 0.406], std: [0.229, 0.224, 0.225] };
    /// [-1, 1], as MedMNIST baselines and the pilot protocol use.
    pub const HALF: Norm = Norm { mean: [0.5; 3], std: [0.5; 3] };
    /// [0, 1], unchanged.
    pub const NONE: Norm = Norm { mean: [0.0; 3], std: [1.0; 3] };

    /// Placeholder for "the training split's own statistics", resolved by [`Norm::resolve`] once the data
    /// set is read (the resolved values are what run records keep).
    pub const DATASET: Norm = Norm { mean: [0.0; 3], std: [0.0; 3] };

    /// This normalisation, or for [`Norm::DATASET`] the per-channel mean and std of `train` (uint8 NCHW;
    /// grey images give the same value on all three channels).
    pub fn resolve(self, train: &Tensor) -> Norm {
        if self != Self::DATASET {
            return self;
        }
        let x = train.to_kind(Kind::Double) / 255.0;
        let c = x.size()[1];
        let dims = [0i64, 2, 3];
        let mean = Vec::<f64>::try_from(x.mean_dim(dims.as_slice(), false, Kind::Double)).unwrap_or_default();
        let std = Vec::<f64>::try_from(x.std_dim(dims.as_slice(), false, false)).unwrap_or_default();
        let pick = |v: &[f64], i: usize| v.get(if c == 3 { i } else { 0 }).copied().unwrap_or(0.5).max(1e-6);
        Norm { mean: [0, 1, 2].map(|i| pick(&mean, i)), std: [0, 1, 2].map(|i| pick(&std, i)) }
    }

    /// Finite means and positive standard deviations (or the [`Norm::DATASET`] placeholder).
    pub fn validate(&self) -> anyhow::Result<()> {
        use crate::check::{FINITE, POSITIVE, float};
        if *self == Self::DATASET {
            return Ok(());
        }
        for (m, s) in self.mean.iter().zip(&self.std) {
            float("norm mean", *m, FINITE)?;
            float("norm std", *s, POSITIVE)?;
        }
        Ok(())
    }

    /// uint8 [B, C, H, W] -> normalised float; grey images use the channel-mean statistics.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        let c = x.size()[1];
        let x = x.to_kind(Kind::Float) / 255.0;
        let (mean, std): (Vec<f32>, Vec<f32>) = if c == 3 {
            (self.mean.iter().map(|&v| v as f32).collect(), self.std.iter().map(|&v| v as f32).collect())
        } else {
            let m = (self.mean.iter().sum::<f64>() / 3.0) as f32;
            let s = (self.std.iter().sum::<f64>() / 3.0) as f32;
            (vec![m; c as usize], vec![s; c as usize])
        };
        let dev = x.device();
        let mean = Tensor::from_slice(&mean).reshape([1, c, 1, 1]).to_device(dev);
        let std = Tensor::from_slice(&std).reshape([1, c, 1, 1]).to_device(dev);
        (x - mean) / std
    }
}

/// Bilinear resize of a float batch to `size` x `size` (no-op when already that size).
pub fn resize(x: &Tensor, size: i64) -> Tensor {
    let s = x.size();
    if s[2] == size && s[3] == size {
        return x.shallow_clone();
    }
    x.upsample_bilinear2d([size, size], false, None, None)
}

/// Nearest-neighbour resize of int64 masks [B, H, W].
pub fn resize_masks(m: &Tensor, size: i64) -> Tensor {
    let s = m.size();
    if s[1] == size && s[2] == size {
        return m.shallow_clone();
    }
    m.unsqueeze(1).to_kind(Kind::Float).upsample_nearest2d([size, size], None, None).squeeze_dim(1).to_kind(Kind::Int64)
}
