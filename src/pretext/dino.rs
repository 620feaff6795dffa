//! DINO self-distillation (Caron et al. 2021) as the TPP pretext. Student = frozen backbone + target
//! parameters + projection head; teacher = the same frozen backbone + an EMA copy of the student's target
//! parameters and head. Multi-crop (2 global + N local crops), teacher targets sharpened with a
//! temperature warm-up and either Sinkhorn-Knopp-normalised (DINOv2's centring, the default: every
//! prototype gets an equal share of the batch, so the targets cannot go uniform or collapse onto one
//! prototype) or centred by a running mean (DINO's), cross-entropy between teacher and student outputs over
//! crop pairs; DINO's frozen prototypes in the first epoch and DINOv2's KoLeo spreading term as options.
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
    /// Teacher temperature (after warm-up). 0.01, sharper than DINO's 0.04: on a frozen backbone with a
    /// fresh head the teacher's cosine logits barely spread, and at 0.04 its targets stayed near uniform
    /// (entropy 0.97 ln K on BreastMNIST with the real ViT-S/14; 0.59 ln K at 0.01, RESULTS.md section 7).
    pub teacher_temp: f64,
    /// Teacher temperature at the start of the warm-up.
    pub warmup_teacher_temp: f64,
    /// Epochs of linear teacher-temperature warm-up.
    pub warmup_teacher_epochs: i64,
    /// EMA momentum at the start (cosine-increased to 1).
    pub momentum: f64,
    /// Momentum of the teacher centre.
    pub center_momentum: f64,
    /// How teacher outputs become targets: Sinkhorn-Knopp (DINOv2) or the running centre (DINO).
    pub centering: Centering,
    /// Sinkhorn-Knopp iterations.
    pub sk_iters: i64,
    /// Epochs at the start during which the prototypes (the head's last layer) are not trained (DINO's
    /// `freeze_last_layer`): the prototypes would otherwise chase the untrained features.
    pub freeze_last_layer: i64,
    /// Weight of DINOv2's KoLeo term on the student's pooled global-crop features (0: off; DINOv2 0.1). In a
    /// data-parallel run it is computed on each process's shard, as in DINOv2.
    pub koleo: f64,
}

/// How the teacher's outputs become the student's targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Centering {
    /// Sinkhorn-Knopp normalisation over the batch (DINOv2).
    SinkhornKnopp,
    /// Softmax of the output minus a running mean (DINO).
    Centre,
}

impl DinoConfig {
    /// The options of stages recorded before they existed: DINO's running centre, prototypes trained
    /// from the start, no KoLeo. (A record lacking them was made that way.)
    pub fn legacy_fields() -> [(&'static str, serde_json::Value); 3] {
        use serde_json::json;
        [("centering", json!("centre")), ("freeze_last_layer", json!(0)), ("koleo", json!(0.0))]
    }
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
            teacher_temp: 0.01,
            warmup_teacher_temp: 0.01,
            warmup_teacher_epochs: 0,
            momentum: 0.996,
            center_momentum: 0.9,
            centering: Centering::SinkhornKnopp,
            sk_iters: 3,
            freeze_last_layer: 1,
            koleo: 0.0,
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
        int("sk_iters", self.sk_iters, 1, 100)?;
        int("freeze_last_layer", self.freeze_last_layer, 0, i64::MAX)?;
        float("koleo", self.koleo, crate::check::NON_NEGATIVE)?;
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
        self.forward_t(x, false)
    }

    /// As [`Self::forward`]; with `freeze_last` no gradient reaches the prototypes.
    pub fn forward_t(&self, x: &Tensor, freeze_last: bool) -> Tensor {
        let h = self.fc1.forward(x, true).gelu("none");
        let h = self.fc2.forward(&h, true).gelu("none");
        let h = self.fc3.forward(&h, true).to_kind(tch::Kind::Float);
        // The cosine logits in fp32 on a GPU too: divided by a 0.04 temperature, bf16 rounding would matter.
        crate::device::without_autocast(h.device(), || {
            let h = &h / h.norm_scalaropt_dim(2, [-1i64].as_slice(), true).clamp_min(1e-12);
            let v = if freeze_last { self.last_v.detach() } else { self.last_v.shallow_clone() };
            let w = &v / v.norm_scalaropt_dim(2, [1i64].as_slice(), true).clamp_min(1e-12);
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

/// DINO's targets: softmax of (teacher output - centre) / temperature, row by row.
pub fn centred_targets(teacher: &Tensor, center: &Tensor, t_temp: f64) -> Tensor {
    ((teacher - center) / t_temp).softmax(-1, Kind::Float)
}

/// DINOv2's Sinkhorn-Knopp targets of teacher outputs [B, K] at temperature `t_temp`: exp(t / temp)
/// alternately normalised so that every prototype carries 1/K of the batch and every row sums to 1. In a
/// data-parallel run `g` sums the normalisers over the global batch (`b_global` rows), so each process
/// gets its rows of the one-process result.
pub fn sinkhorn_knopp(
    teacher: &Tensor,
    t_temp: f64,
    iters: i64,
    g: Option<&crate::dist::Group>,
    b_global: i64,
) -> Result<Tensor> {
    let sum = |t: Tensor| -> Result<Tensor> {
        Ok(match g {
            Some(g) => g.sum(&t)?,
            None => t,
        })
    };
    let mut q = (teacher.to_kind(Kind::Float) / t_temp).exp().tr(); // [K, B]
    let k = q.size()[0] as f64;
    let b = b_global as f64;
    q = &q / sum(q.sum(Kind::Float))?;
    for _ in 0..iters {
        let rows = sum(q.sum_dim_intlist([1i64].as_slice(), true, Kind::Float))?;
        q = &q / rows / k;
        q = &q / q.sum_dim_intlist([0i64].as_slice(), true, Kind::Float) / b;
    }
    Ok((q * b).tr())
}

/// The cross-entropy of student outputs (all crops: logits [B, K] each) against teacher targets (global
/// crops: probabilities [B, K] each), over every pair of different views.
pub fn cross_entropy(student: &[Tensor], targets: &[Tensor], student_temp: f64) -> Tensor {
    let s_logp: Vec<Tensor> = student.iter().map(|s| (s / student_temp).log_softmax(-1, Kind::Float)).collect();
    let mut total = Tensor::zeros([], (Kind::Float, student[0].device()));
    let mut n = 0;
    for (i, t) in targets.iter().enumerate() {
        for (j, s) in s_logp.iter().enumerate() {
            if i == j {
                continue;
            }
            total += (-(t * s).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)).mean(Kind::Float);
            n += 1;
        }
    }
    total / n as f64
}

/// Mean row entropy (nats) of probabilities [B, K].
pub fn entropy(p: &Tensor) -> Tensor {
    (-(p * p.clamp_min(1e-30).log()).sum_dim_intlist([-1i64].as_slice(), false, Kind::Float)).mean(Kind::Float)
}

/// DINOv2's KoLeo term of features [B, D]: minus the mean log distance of each L2-normalised feature to
/// its nearest neighbour in the batch (spreads the features out).
pub fn koleo(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let x = &x / x.norm_scalaropt_dim(2, [-1i64].as_slice(), true).clamp_min(1e-8);
    let n = x.size()[0];
    let dots = x.matmul(&x.tr());
    let eye = Tensor::eye(n, (Kind::Bool, x.device()));
    let nn = tch::no_grad(|| dots.masked_fill(&eye, -1.0).argmax(1, false));
    let d = (&x - x.index_select(0, &nn) + 1e-8).norm_scalaropt_dim(2, [-1i64].as_slice(), false);
    -(d + 1e-8).log().mean(Kind::Float)
}

/// The DINO loss of student outputs (all crops) against teacher outputs (global crops) with DINO's
/// running centre (the centred targets of [`centred_targets`]). Returns (loss, mean teacher output for the
/// centre update).
pub fn loss(
    student: &[Tensor],
    teacher: &[Tensor],
    center: &Tensor,
    cfg: &DinoConfig,
    t_temp: f64,
) -> (Tensor, Tensor) {
    let targets: Vec<Tensor> = teacher.iter().map(|t| centred_targets(t, center, t_temp).detach()).collect();
    let batch_center = Tensor::cat(teacher, 0).mean_dim([0i64].as_slice(), true, Kind::Float).detach();
    (cross_entropy(student, &targets, cfg.student_temp), batch_center)
}

/// Student (or teacher) output of a crop batch: pooled backbone features through the head.
pub fn project(vit: &Vit, head: &DinoHead, x: &Tensor, train: bool) -> Tensor {
    project_features(vit, head, x, train, false).0
}

/// As [`project`], also returning the pooled features (for KoLeo); `freeze_last` keeps gradients from the
/// prototypes.
pub fn project_features(vit: &Vit, head: &DinoHead, x: &Tensor, train: bool, freeze_last: bool) -> (Tensor, Tensor) {
    let f = vit.pool(&vit.forward_features_t(x, train)).to_kind(Kind::Float);
    (head.forward_t(&f, freeze_last), f)
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
