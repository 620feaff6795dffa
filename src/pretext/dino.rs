//! DINO self-distillation (Caron et al. 2021) as the TPP pretext. Student = frozen backbone + target
//! parameters + projection head; teacher = the same frozen backbone + an EMA copy of the student's target
//! parameters and head. Multi-crop (2 global + N local crops), teacher centering and sharpening with a
//! temperature warm-up, cross-entropy between teacher and student outputs over crop pairs.
use crate::backbone::Vit;
use crate::backbone::vit::Linear;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// Every field has a default, so a `[dino]` section of a `compare` config names only what it changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DinoConfig {
    /// Prototypes (DINO: 65536; small data sets do better with fewer).
    pub out_dim: i64,
    /// Hidden width of the head's MLP.
    pub hidden_dim: i64,
    /// Width before the prototypes.
    pub bottleneck_dim: i64,
    /// Local crops per image.
    pub local_crops: i64,
    /// Local crop size in pixels (multiple of the patch size).
    pub local_size: i64,
    /// Smallest area of a global crop.
    pub global_scale_min: f64,
    /// Largest area of a local crop.
    pub local_scale_max: f64,
    /// Student temperature.
    pub student_temp: f64,
    /// Teacher temperature (after warm-up).
    pub teacher_temp: f64,
    /// Teacher temperature at the start of the warm-up.
    pub warmup_teacher_temp: f64,
    /// Epochs of linear teacher-temperature warm-up.
    pub warmup_teacher_epochs: i64,
    /// EMA momentum at the start (cosine-increased to 1).
    pub momentum: f64,
    /// Momentum of the teacher centre.
    pub center_momentum: f64,
}

impl Default for DinoConfig {
    fn default() -> Self {
        DinoConfig {
            out_dim: 4096,
            hidden_dim: 1024,
            bottleneck_dim: 256,
            local_crops: 4,
            local_size: 0,
            global_scale_min: 0.4,
            local_scale_max: 0.4,
            student_temp: 0.1,
            teacher_temp: 0.04,
            warmup_teacher_temp: 0.04,
            warmup_teacher_epochs: 0,
            momentum: 0.996,
            center_momentum: 0.9,
        }
    }
}

impl DinoConfig {
    /// Rejects values no DINO run could use, naming the option.
    pub fn validate(&self) -> anyhow::Result<()> {
        use crate::check::{POSITIVE, UNIT, UNIT_OPEN_LOW, float, int};
        int("out_dim", self.out_dim, 1, 1 << 20)?;
        int("hidden_dim", self.hidden_dim, 1, 1 << 16)?;
        int("bottleneck_dim", self.bottleneck_dim, 1, 1 << 16)?;
        int("local_crops", self.local_crops, 0, 64)?;
        int("local_size", self.local_size, 0, crate::backbone::MAX_IMG_SIZE)?;
        int("warmup_teacher_epochs", self.warmup_teacher_epochs, 0, i64::MAX)?;
        float("global_scale_min", self.global_scale_min, UNIT_OPEN_LOW)?;
        float("local_scale_max", self.local_scale_max, UNIT_OPEN_LOW)?;
        float("student_temp", self.student_temp, POSITIVE)?;
        float("teacher_temp", self.teacher_temp, POSITIVE)?;
        float("warmup_teacher_temp", self.warmup_teacher_temp, POSITIVE)?;
        float("momentum", self.momentum, UNIT)?;
        float("center_momentum", self.center_momentum, UNIT)
    }
}

/// DINO's projection head: 3-layer MLP (GELU) to a bottleneck, L2 normalisation, then a weight-normalised
/// linear layer (norm fixed to 1) onto the prototypes.
pub struct DinoHead {
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
    pub(crate) fc3: Linear,
    /// [out_dim, bottleneck]: direction of each prototype (weight norm with g = 1).
    pub last_v: Tensor,
}

impl DinoHead {
    /// A fresh head under `p` for features of width `in_dim`.
    pub fn new(p: &nn::Path, in_dim: i64, cfg: &DinoConfig) -> Self {
        DinoHead {
            fc1: Linear::new(p / "mlp" / "0", in_dim, cfg.hidden_dim, true),
            fc2: Linear::new(p / "mlp" / "2", cfg.hidden_dim, cfg.hidden_dim, true),
            fc3: Linear::new(p / "mlp" / "4", cfg.hidden_dim, cfg.bottleneck_dim, true),
            last_v: (p / "last_layer").var(
                "weight_v",
                &[cfg.out_dim, cfg.bottleneck_dim],
                Init::Randn { mean: 0.0, stdev: 0.02 },
            ),
        }
    }

    /// Prototype logits (fp32) of features [B, in_dim].
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.fc1.forward(x, true).gelu("none");
        let h = self.fc2.forward(&h, true).gelu("none");
        let h = self.fc3.forward(&h, true).to_kind(tch::Kind::Float);
        // The cosine logits in fp32 on a GPU too: divided by a 0.04 temperature, bf16 rounding would matter.
        crate::device::without_autocast(h.device(), || {
            let h = &h / h.norm_scalaropt_dim(2, [-1i64].as_slice(), true).clamp_min(1e-12);
            let w = &self.last_v / self.last_v.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
            h.linear::<Tensor>(&w, None)
        })
    }
}

/// Teacher temperature at `epoch`: linear warm-up from `warmup_teacher_temp` to `teacher_temp`.
pub fn teacher_temp(cfg: &DinoConfig, epoch: i64) -> f64 {
    if epoch < cfg.warmup_teacher_epochs {
        let t = epoch as f64 / cfg.warmup_teacher_epochs as f64;
        cfg.warmup_teacher_temp + t * (cfg.teacher_temp - cfg.warmup_teacher_temp)
    } else {
        cfg.teacher_temp
    }
}

/// EMA momentum at `step` of `total`: cosine from `momentum` to 1.
pub fn momentum(cfg: &DinoConfig, step: i64, total: i64) -> f64 {
    1.0 - (1.0 - cfg.momentum) * ((std::f64::consts::PI * step as f64 / total.max(1) as f64).cos() + 1.0) / 2.0
}

/// The DINO loss of student outputs (all crops) against teacher outputs (global crops), with the
/// teacher centred and sharpened; pairs of the same view are skipped. Returns (loss, mean teacher output
/// for the centre update).
pub fn loss(
    student: &[Tensor],
    teacher: &[Tensor],
    center: &Tensor,
    cfg: &DinoConfig,
    t_temp: f64,
) -> (Tensor, Tensor) {
    let t_probs: Vec<Tensor> =
        teacher.iter().map(|t| ((t - center) / t_temp).softmax(-1, Kind::Float).detach()).collect();
    let s_logp: Vec<Tensor> = student.iter().map(|s| (s / cfg.student_temp).log_softmax(-1, Kind::Float)).collect();
    let mut total = Tensor::zeros([], (Kind::Float, student[0].device()));
    let mut n = 0;
    for (i, t) in t_probs.iter().enumerate() {
        for (j, s) in s_logp.iter().enumerate() {
            if i == j {
                continue;
            }
            total += (-(t * s).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)).mean(Kind::Float);
            n += 1;
        }
    }
    let batch_center = Tensor::cat(teacher, 0).mean_dim([0i64].as_slice(), true, Kind::Float).detach();
    (total / n as f64, batch_center)
}

/// Student (or teacher) output of a crop batch: pooled backbone features through the head.
pub fn project(vit: &Vit, head: &DinoHead, x: &Tensor, train: bool) -> Tensor {
    let f = vit.pool(&vit.forward_features_t(x, train));
    head.forward(&f.to_kind(Kind::Float))
}

/// teacher <- m * teacher + (1 - m) * student, tensor by tensor (same names).
pub fn ema_update(teacher: &nn::VarStore, student: &nn::VarStore, m: f64) -> Result<()> {
    let _g = tch::no_grad_guard();
    let s = student.variables();
    for (name, mut t) in teacher.variables() {
        let src = s.get(&name).ok_or_else(|| anyhow::anyhow!("EMA: student has no '{name}'"))?;
        let _ = t.g_mul_scalar_(m);
        let _ = t.g_add_(&(src * (1.0 - m)));
    }
    Ok(())
}
