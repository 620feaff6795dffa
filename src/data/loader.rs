//! Batches of a split on the compute device: seeded shuffling, uint8 -> float on the device, resize,
//! augmentation (training) and normalisation. Images are decoded already (in memory, or mapped from the
//! decoded-data cache), so a batch costs one gather and one host-to-device copy: the GPU never waits on
//! decoding.
use super::dataset::Split;
use super::transforms::{Augment, Norm, resize, resize_masks};
use crate::dist::{Part, Shard};
use rand::SeedableRng;
use rand::seq::SliceRandom;
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
}

impl LoaderConfig {
    /// How many batches an epoch over `n` samples yields.
    pub fn num_batches(&self, n: i64) -> usize {
        let bs = self.batch_size.max(1);
        (if self.drop_last && n >= bs { n / bs } else { (n + bs - 1) / bs }) as usize
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
    let mut order: Vec<i64> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    if augment.is_some() {
        order.shuffle(&mut rng);
    }
    let bs = cfg.batch_size.max(1);
    let nb = cfg.num_batches(n) as i64;
    let chunks: Vec<(Vec<i64>, Shard)> = (0..nb)
        .map(|i| {
            let c = &order[(i * bs) as usize..((i + 1) * bs).min(n) as usize];
            let shard = part.shard(c.len() as i64);
            (c[shard.start as usize..(shard.start + shard.len) as usize].to_vec(), shard)
        })
        .collect();
    let (images, labels) = (split.images.shallow_clone(), split.labels.shallow_clone());
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Tensor, Tensor, Tensor, Shard)>(2);
    std::thread::spawn(move || {
        for (c, shard) in chunks {
            let idx = Tensor::from_slice(&c);
            // Not pinned: tch's pin_memory takes a device, deprecated in libtorch 2.11 (a warning per call),
            // and a uint8 batch is small next to the step it feeds.
            let im = images.index_select(0, &idx);
            let lb = labels.index_select(0, &idx);
            // The receiver is gone when the caller stopped early: stop too.
            if tx.send((idx, im, lb, shard)).is_err() {
                break;
            }
        }
    });
    rx.into_iter().map(move |(idx, imgs, labels, shard)| {
        let imgs = imgs.to_device(cfg.device);
        let mut labels = labels.to_device(cfg.device);
        let mut x = cfg.norm.apply(&imgs);
        if shard.len > 0 {
            x = resize(&x, cfg.image_size);
            if segmentation {
                labels = resize_masks(&labels, cfg.image_size);
            }
        } else {
            let c = x.size()[1];
            x = x.new_zeros([0, c, cfg.image_size, cfg.image_size], (x.kind(), x.device()));
            if segmentation {
                labels = labels.new_zeros([0, cfg.image_size, cfg.image_size], (labels.kind(), labels.device()));
            }
        }
        if let Some(a) = augment {
            let (xa, ma) = a.apply_shard(&x, segmentation.then_some(&labels), &mut rng, shard);
            x = xa;
            if let Some(m) = ma {
                labels = m;
            }
        }
        Batch { images: x, labels, index: idx, shard }
    })
}
