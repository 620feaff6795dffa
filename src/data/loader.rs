//! Batches of a split on the compute device: seeded shuffling, uint8 -> float on the device, resize,
//! augmentation (training) and normalisation. Images are decoded already (in memory, or mapped from the
//! decoded-data cache), so a batch costs one gather and one host-to-device copy: the GPU never waits on
//! decoding.
use super::dataset::Split;
use super::transforms::{Augment, Norm, resize, resize_masks};
use crate::dist::{Part, Shard};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

/// How batches are made.
#[derive(Debug, Clone, Copy)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: i64,
    /// Size the images are resized to.
    pub image_size: i64,
    /// Normalisation.
    pub norm: Norm,
    /// Where batches go.
    pub device: Device,
    /// Drop the last, smaller batch.
    pub drop_last: bool,
    /// Native-resolution segmentation: training batches are random crops of the stored images, evaluation
    /// batches the stored images themselves (for sliding windows); None: every image resized.
    pub tiles: Option<Tiles>,
}

/// Crops and windows of native-resolution segmentation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tiles {
    /// Crop and window size (the model's input).
    pub size: i64,
    /// Overlap of neighbouring sliding windows (a fraction of `size`).
    pub overlap: f64,
    /// Training crops per image and epoch.
    pub per_image: i64,
}

impl LoaderConfig {
    /// How many batches an epoch over `n` samples yields.
    pub fn num_batches(&self, n: i64) -> usize {
        let bs = self.batch_size.max(1);
        (if self.drop_last && n >= bs { n / bs } else { (n + bs - 1) / bs }) as usize
    }

    /// Samples of a training epoch over `n` images (several crops of each with `tiles`).
    pub fn train_samples(&self, n: i64) -> i64 {
        Self::samples(self.tiles, n)
    }

    /// Samples of a training epoch over `n` images with `tiles`.
    pub fn samples(tiles: Option<Tiles>, n: i64) -> i64 {
        n * tiles.map_or(1, |t| t.per_image)
    }

    /// This process's rows of every batch of an epoch over `total` samples in order: (start, end) in that
    /// order, and which part of the global batch they are.
    pub fn shards(&self, total: i64, part: Part) -> Vec<(usize, usize, Shard)> {
        let bs = self.batch_size.max(1);
        (0..self.num_batches(total) as i64)
            .map(|i| {
                let (a, b) = ((i * bs) as usize, ((i + 1) * bs).min(total) as usize);
                let shard = part.shard((b - a) as i64);
                (a + shard.start as usize, a + (shard.start + shard.len) as usize, shard)
            })
            .collect()
    }
}

/// A batch on the compute device.
pub struct Batch {
    /// Normalised float images [B, C, S, S].
    pub images: Tensor,
    /// Labels (masks resized with the images).
    pub labels: Tensor,
    /// Indices of the samples in the split.
    pub index: Tensor,
    /// Which rows of the global batch these are (all of them in a one-process run).
    pub shard: Shard,
}

/// The batches of one epoch. `augment` None: evaluation order and no augmentation.
///
/// A background thread gathers the next batches (uint8, on the host) while the caller
/// computes; the device part (copy, normalisation, resize, augmentation) runs on the caller's thread with
/// the epoch's seeded generator, so results do not depend on timing.
pub fn epoch_batches(
    split: &Split,
    cfg: LoaderConfig,
    augment: Option<Augment>,
    seed: u64,
    segmentation: bool,
) -> impl Iterator<Item = Batch> + use<> {
    epoch_shards(split, cfg, augment, seed, segmentation, Part::WHOLE)
}

/// As [`epoch_batches`], this process's `part` of every batch (data-parallel training): every process
/// draws the same order and augmentation for the whole global batch of `cfg.batch_size` and keeps its own
/// rows, so the processes together see exactly the batches of one process. A shard may be empty (a last
/// batch smaller than the number of processes).
pub fn epoch_shards(
    split: &Split,
    cfg: LoaderConfig,
    augment: Option<Augment>,
    seed: u64,
    segmentation: bool,
    part: Part,
) -> impl Iterator<Item = Batch> + use<> {
    let n = split.len();
    // Native-resolution training: `per_image` crops of every image per epoch, at seeded offsets.
    let crop = cfg.tiles.filter(|_| augment.is_some());
    let total = LoaderConfig::samples(crop, n);
    let mut order: Vec<i64> = (0..total).map(|i| i % n.max(1)).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    if augment.is_some() {
        order.shuffle(&mut rng);
    }
    let (sh, sw) = (split.images.size()[2], split.images.size()[3]);
    let offsets: Vec<(i64, i64)> = match crop {
        Some(t) => order
            .iter()
            .map(|_| (rng.random_range(0..=(sh - t.size).max(0)), rng.random_range(0..=(sw - t.size).max(0))))
            .collect(),
        None => Vec::new(),
    };
    type Chunk = (Vec<i64>, Vec<(i64, i64)>, Shard);
    let chunks: Vec<Chunk> = cfg
        .shards(total, part)
        .into_iter()
        .map(|(s, e, shard)| (order[s..e].to_vec(), offsets.get(s..e).map(<[_]>::to_vec).unwrap_or_default(), shard))
        .collect();
    let (images, labels) = (split.images.shallow_clone(), split.labels.shallow_clone());
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Tensor, Tensor, Tensor, Shard)>(2);
    std::thread::spawn(move || {
        for (c, offs, shard) in chunks {
            let idx = Tensor::from_slice(&c);
            // Not pinned: tch's pin_memory takes a device, deprecated in libtorch 2.11 (a warning per call),
            // and a uint8 batch is small next to the step it feeds.
            let (im, lb) = match crop {
                Some(t) if !c.is_empty() => crops(&images, &labels, &c, &offs, t.size),
                _ => (images.index_select(0, &idx), labels.index_select(0, &idx)),
            };
            // The receiver is gone when the caller stopped early: stop too.
            if tx.send((idx, im, lb, shard)).is_err() {
                break;
            }
        }
    });
    rx.into_iter().map(move |(idx, imgs, labels, shard)| {
        let _s = crate::profile::span("batch preparation");
        let imgs = imgs.to_device(cfg.device);
        let mut labels = labels.to_device(cfg.device);
        let mut x = cfg.norm.apply(&imgs);
        let size = crop.map_or(cfg.image_size, |t| t.size);
        if shard.len > 0 {
            // Crops are the model's size already; native evaluation keeps whole images for sliding windows.
            if cfg.tiles.is_none() {
                x = resize(&x, cfg.image_size);
                if segmentation {
                    labels = resize_masks(&labels, cfg.image_size);
                }
            }
        } else {
            let c = x.size()[1];
            x = x.new_zeros([0, c, size, size], (x.kind(), x.device()));
            if segmentation {
                labels = labels.new_zeros([0, size, size], (labels.kind(), labels.device()));
            }
        }
        if let Some(a) = augment {
            let _s = crate::profile::span("augment");
            let (xa, ma) = a.apply_shard(&x, segmentation.then_some(&labels), &mut rng, shard);
            x = xa;
            if let Some(m) = ma {
                labels = m;
            }
        }
        Batch { images: x, labels, index: idx, shard }
    })
}

/// `size` x `size` crops of images [N, C, H, W] and masks [N, H, W] at (row, column) offsets, zero-padded
/// (image and background) where an image is smaller than the crop.
fn crops(images: &Tensor, masks: &Tensor, idx: &[i64], offs: &[(i64, i64)], size: i64) -> (Tensor, Tensor) {
    let (h, w) = (images.size()[2], images.size()[3]);
    let (ch, cw) = (size.min(h), size.min(w));
    let pad = |t: Tensor| if (ch, cw) != (size, size) { t.constant_pad_nd([0, size - cw, 0, size - ch]) } else { t };
    let (ims, ms): (Vec<Tensor>, Vec<Tensor>) = idx
        .iter()
        .zip(offs)
        .map(|(&i, &(y, x))| {
            let im = images.get(i).narrow(1, y, ch).narrow(2, x, cw);
            let m = masks.get(i).narrow(0, y, ch).narrow(1, x, cw);
            (pad(im), pad(m))
        })
        .unzip();
    (Tensor::stack(&ims, 0), Tensor::stack(&ms, 0))
}
