//! Batches of a split on the compute device: seeded shuffling, uint8 -> float on the device, resize,
//! augmentation (training) and normalisation. Images are held decoded in memory, so a batch costs one
//! gather and one host-to-device copy: the GPU never waits on decoding.
use super::dataset::Split;
use super::transforms::{Augment, Norm, resize, resize_masks};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use tch::{Device, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct LoaderConfig {
    pub batch_size: i64,
    pub image_size: i64,
    pub norm: Norm,
    pub device: Device,
    pub drop_last: bool,
}

pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub index: Tensor,
}

/// The batches of one epoch. `augment` None: evaluation order and no augmentation.
pub fn epoch_batches<'a>(
    split: &'a Split,
    cfg: LoaderConfig,
    augment: Option<Augment>,
    seed: u64,
    segmentation: bool,
) -> impl Iterator<Item = Batch> + 'a {
    let n = split.len();
    let mut order: Vec<i64> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    if augment.is_some() {
        order.shuffle(&mut rng);
    }
    let bs = cfg.batch_size.max(1);
    let nb = if cfg.drop_last && n >= bs { n / bs } else { (n + bs - 1) / bs };
    (0..nb).map(move |i| {
        let lo = i * bs;
        let hi = (lo + bs).min(n);
        let idx = Tensor::from_slice(&order[lo as usize..hi as usize]);
        let imgs = split.images.index_select(0, &idx).to_device(cfg.device);
        let mut labels = split.labels.index_select(0, &idx).to_device(cfg.device);
        let mut x = cfg.norm.apply(&imgs);
        x = resize(&x, cfg.image_size);
        if segmentation {
            labels = resize_masks(&labels, cfg.image_size);
        }
        if let Some(a) = augment {
            let (xa, ma) = a.apply(&x, segmentation.then_some(&labels), &mut rng);
            x = xa;
            if let Some(m) = ma {
                labels = m;
            }
        }
        Batch { images: x, labels, index: idx }
    })
}
