//! Learning-rate schedule: linear warm-up then cosine decay to `min_lr`, evaluated per step (MAE's recipe).
/// Warm-up then cosine, per update.
#[derive(Debug, Clone, Copy)]
pub struct WarmupCosine {
    /// Peak learning rate.
    pub base_lr: f64,
    /// Final learning rate.
    pub min_lr: f64,
    /// Linear warm-up updates.
    pub warmup_steps: i64,
    /// All updates.
    pub total_steps: i64,
}

impl WarmupCosine {
    /// `total_steps` updates from `base_lr` down to `min_lr`, the first `warmup` fraction of them warming up.
    pub fn new(base_lr: f64, min_lr: f64, warmup: f64, total_steps: i64) -> Self {
        let warmup_steps = ((total_steps as f64) * warmup).round() as i64;
        WarmupCosine { base_lr, min_lr, warmup_steps, total_steps }
    }

    /// The learning rate of update `step`.
    pub fn lr(&self, step: i64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = (self.total_steps - self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = WarmupCosine { base_lr: 1.0, min_lr: 0.0, warmup_steps: 10, total_steps: 110 };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(60) - 0.5).abs() < 1e-12);
        assert!(s.lr(110).abs() < 1e-12);
        for i in 10..110 {
            assert!(s.lr(i + 1) <= s.lr(i));
        }
    }
}
