//! A backbone with its PEFT target parameters and optional task head: what every training command builds.
use crate::backbone::{Backbone, Checkpoint, LoadOptions};
use crate::peft::{PeftSpec, Targets};
use anyhow::Result;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// A backbone with its target parameters and optional segmentation head.
pub struct PeftModel {
    /// The backbone.
    pub bb: Backbone,
    /// The target parameters (and the classification head).
    pub targets: Targets,
    /// Where it computes.
    pub device: Device,
    /// Segmentation head (target parameters), for segmentation tasks.
    pub seg_head: Option<crate::heads::segmentation::SegHead>,
}

impl PeftModel {
    /// Loads the backbone, attaches fresh target parameters (their usual init, from `seed`) and freezes the
    /// backbone unless the spec is full fine-tuning. On CUDA the frozen weights are stored in bf16 once
    /// (they are only ever read under bf16 autocast), halving their memory and traffic.
    pub fn build(
        backbone: &Path,
        opts: &LoadOptions,
        spec: &PeftSpec,
        device: Device,
        seed: u64,
    ) -> Result<(Self, Checkpoint)> {
        let (bb, ck) = Backbone::load(backbone, opts, device)?;
        Ok((Self::from_backbone(bb, spec, device, seed)?, ck))
    }

    /// As [`Self::build`], on a backbone already loaded.
    pub fn from_backbone(mut bb: Backbone, spec: &PeftSpec, device: Device, seed: u64) -> Result<Self> {
        // A checkpoint's own classifier is not part of the task: heads are made per task.
        bb.drop_head();
        tch::manual_seed(seed as i64);
        let targets = Targets::attach(&mut bb.vit, spec, device)?;
        if !spec.trains_backbone() {
            bb.freeze();
            if device.is_cuda() {
                bb.vs.set_kind(Kind::BFloat16);
            }
        }
        Ok(PeftModel { bb, targets, device, seg_head: None })
    }

    /// Whether the backbone itself trains (full fine-tuning).
    pub fn is_full(&self) -> bool {
        self.targets.spec.trains_backbone()
    }

    /// Adds a fresh task head (a target parameter).
    pub fn add_head(&mut self, num_classes: i64) {
        self.targets.add_head(&mut self.bb.vit, num_classes);
    }

    /// Adds a fresh segmentation head of `kind` (`seg_head.*`, target parameters) with `num_classes`
    /// outputs.
    pub fn add_seg_head(&mut self, kind: crate::heads::segmentation::HeadKind, num_classes: i64) {
        let root = self.targets.vs.root();
        self.seg_head = Some(crate::heads::segmentation::SegHead::new(&root, &self.bb.vit, kind, num_classes, 128));
    }

    /// Adds the head a task needs: a segmentation head of `seg`, or a classification head of `num_classes`.
    pub fn add_task_head(
        &mut self,
        task: crate::data::Task,
        num_classes: i64,
        seg: crate::heads::segmentation::HeadKind,
    ) {
        if task == crate::data::Task::Segmentation {
            self.add_seg_head(seg, num_classes);
        } else {
            self.add_head(num_classes);
        }
    }

    /// Task output: class logits [B, K], or per-pixel logits [B, K, H, W] with a segmentation head.
    pub fn forward_task(&self, x: &Tensor, train: bool) -> Tensor {
        match &self.seg_head {
            Some(h) => h.forward(&self.bb.vit, x, train),
            None => self.bb.vit.forward_t(x, train),
        }
    }

    /// Segmentation: class probabilities [K, H, W] of one normalised image [C, H, W] of any size, by
    /// sliding windows of `tiles.size` px, `batch` windows per forward pass (eval mode; call under
    /// `no_grad`).
    pub fn segment(&self, image: &Tensor, tiles: crate::data::loader::Tiles, batch: i64) -> anyhow::Result<Tensor> {
        crate::heads::segmentation::sliding_window(image, tiles.size, tiles.overlap, batch, &mut |w| {
            Ok(self.logits(w, false))
        })
    }

    /// Task logits in fp32 (under bf16 autocast on CUDA).
    pub fn logits(&self, x: &Tensor, train: bool) -> Tensor {
        crate::device::autocast(self.device, || self.forward_task(x, train)).to_kind(Kind::Float)
    }

    /// Named parameters to optimise: the target store (and the backbone for full fine-tuning).
    pub fn trainable(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self.targets.vs.variables().into_iter().collect();
        if self.is_full() {
            v.extend(self.bb.vs.variables().into_iter().map(|(k, t)| (format!("backbone.{k}"), t)));
        }
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// (trainable, total) parameter counts.
    pub fn counts(&self) -> (i64, i64) {
        let backbone: i64 = self.bb.vs.variables().values().map(|t| t.numel() as i64).sum();
        let targets = self.targets.numel();
        let trainable = if self.is_full() { backbone + targets } else { targets };
        (trainable, backbone + targets - self.targets.replaced)
    }
}
