//! The one training loop of every stage (MAE and DINO pretexts, supervised fine-tuning, backbone
//! pre-training). What a stage does per batch is a [`TrainStep`]; the loop does the rest: seeded epochs,
//! gradient accumulation, clipping, the learning-rate schedule, the optimiser, the non-finite loss check,
//! and calls to separate pieces: checkpoint/resume ([`Checkpointer`]) and [`Callback`]s for progress,
//! model selection, early stopping, logs and per-epoch saves (`super::callbacks`).
use super::callbacks::Checkpointer;
use super::optim::AdamW;
use super::schedule::WarmupCosine;
use crate::data::loader::Batch;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;
use tch::{Kind, Tensor};

/// The batches of one epoch, with their number (the last one closes an accumulation window).
pub struct Batches {
    /// How many batches `iter` yields.
    pub len: usize,
    /// The batches.
    pub iter: Box<dyn Iterator<Item = Batch>>,
}

/// What one kind of training does with a batch.
pub trait TrainStep {
    /// Work done once per start before its first epoch (a linear probe's feature pass), after a
    /// data-parallel run's processes agree on the state; skipped when no epoch is left. Its time counts
    /// in [`TrainState::setup_seconds`].
    fn prepare(&mut self) -> Result<()> {
        Ok(())
    }
    /// The batches of `epoch` (0-based), seeded by the epoch so that a resumed run sees the same ones.
    fn batches(&mut self, epoch: i64) -> Batches;
    /// Forward pass and loss (a scalar) of one batch; gradients flow to the trained parameters. In a
    /// data-parallel run the batch is this process's shard (`batch.shard`, possibly empty) and the loss is
    /// its part of the global batch's loss: summed over processes, values and gradients are the one-process
    /// ones (a per-sample mean times `shard.share()`). The loss of an empty shard is not back-propagated.
    fn loss(&mut self, batch: &Batch) -> Result<Tensor>;
    /// After every optimiser update (DINO's EMA teacher follows the student here).
    fn after_update(&mut self, step: i64, total_steps: i64) -> Result<()> {
        let _ = (step, total_steps);
        Ok(())
    }
    /// State outside the optimiser that every process of a data-parallel run must start from rank 0's
    /// values (DINO's teacher and centre); none by default.
    fn shared_state(&self) -> Vec<Tensor> {
        Vec::new()
    }
    /// Named scalars about the last batch (DINO's entropies), logged beside the loss; reading them
    /// synchronises, so they are read only when the log is written. In a data-parallel run, this process's.
    fn diagnostics(&self) -> Vec<(&'static str, Tensor)> {
        Vec::new()
    }
    /// Validation metrics at the end of an epoch (none by default).
    fn validate(&mut self) -> Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }
}

/// One epoch's record (a row of `metrics.csv`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based.
    pub epoch: i64,
    /// Mean loss over the epoch's batches.
    pub train_loss: f64,
    /// Learning rate of the epoch's last update.
    pub lr: f64,
    /// Wall time of the epoch (training and validation).
    pub seconds: f64,
    /// Training images per second.
    pub images_per_s: f64,
    /// Validation metrics (a metric that could not be computed is NaN, stored as null).
    #[serde(deserialize_with = "nan_for_null_values")]
    pub val: BTreeMap<String, f64>,
}

/// Where a run stands: what a checkpoint's `state.json` holds, so `--resume` continues exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs finished.
    pub epochs_done: i64,
    /// Best epoch on validation so far (-1: none).
    pub best_epoch: i64,
    /// Its validation value (-inf before any; stored as null then, which JSON has for it).
    #[serde(deserialize_with = "neg_inf_for_null")]
    pub best_value: f64,
    /// Epochs since the best one.
    pub bad_epochs: i64,
    /// Every finished epoch.
    pub history: Vec<EpochRecord>,
    /// Early stopping ended the run.
    pub stopped_early: bool,
    /// Wall time spent before the first epoch of each start (a linear probe's feature pass), so a run's
    /// cost counts it; absent in states written before it existed.
    #[serde(default)]
    pub setup_seconds: f64,
}

/// JSON writes non-finite numbers as null: read null back as -inf (no best value yet).
fn neg_inf_for_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NEG_INFINITY))
}

/// As [`neg_inf_for_null`], for metric maps: null is a metric that was NaN.
fn nan_for_null_values<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, f64>, D::Error> {
    let m = BTreeMap::<String, Option<f64>>::deserialize(d)?;
    Ok(m.into_iter().map(|(k, v)| (k, v.unwrap_or(f64::NAN))).collect())
}

impl Default for TrainState {
    fn default() -> Self {
        TrainState {
            epochs_done: 0,
            best_epoch: -1,
            best_value: f64::NEG_INFINITY,
            bad_epochs: 0,
            history: Vec::new(),
            stopped_early: false,
            setup_seconds: 0.0,
        }
    }
}

/// After an optimiser update.
pub struct StepEnd<'a> {
    /// 0-based update number over the whole run.
    pub step: i64,
    /// Updates in the whole run.
    pub total_steps: i64,
    /// 0-based epoch.
    pub epoch: i64,
    /// Learning rate used.
    pub lr: f64,
    /// Loss of the update's last batch (on the device: reading it synchronises).
    pub loss: &'a Tensor,
    /// Images in the update.
    pub images: i64,
    /// The step's [`TrainStep::diagnostics`].
    pub diagnostics: &'a [(&'static str, Tensor)],
}

/// Pieces the loop calls at fixed points (Lightning's callbacks): they read the run, and may change its
/// state (selection, early stopping) or write files.
pub trait Callback {
    /// Before training, with the updates already done (a resumed run) and the run's total.
    fn on_train_start(&mut self, done_steps: i64, total_steps: i64) -> Result<()> {
        let _ = (done_steps, total_steps);
        Ok(())
    }
    /// Between backward and clipping, with every gradient of the update in place: the one call site where
    /// data-parallel training averages gradients across processes.
    fn on_before_optimizer_step(&mut self, opt: &AdamW) -> Result<()> {
        let _ = opt;
        Ok(())
    }
    /// After each optimiser update.
    fn on_step_end(&mut self, s: &StepEnd) -> Result<()> {
        let _ = s;
        Ok(())
    }
    /// After each epoch, its record already in `state.history`.
    fn on_epoch_end(&mut self, record: &EpochRecord, state: &mut TrainState) -> Result<()> {
        let _ = (record, state);
        Ok(())
    }
    /// When the loop stops on a non-finite loss (before it reports the error).
    fn on_stop(&mut self) -> Result<()> {
        Ok(())
    }
    /// After the last epoch (not after an error).
    fn on_train_end(&mut self, state: &TrainState) -> Result<()> {
        let _ = state;
        Ok(())
    }
}

/// The loop's settings and its optimiser.
pub struct Trainer<'a> {
    /// The optimiser over the trained parameters.
    pub opt: AdamW,
    /// Learning rate per update.
    pub schedule: WarmupCosine,
    /// Gradient-norm clipping (0: off).
    pub clip: f64,
    /// Batches per update (gradient accumulation).
    pub accum: i64,
    /// Epochs of the whole run.
    pub epochs: i64,
    /// Updates per epoch.
    pub steps_per_epoch: i64,
    /// Saves the run after every epoch and restores it on resume (None: no checkpoints).
    pub checkpoint: Option<Checkpointer<'a>>,
    /// Where a stage without checkpoints keeps what each epoch saved (named when the run stops).
    pub saved_in: Option<std::path::PathBuf>,
}

/// What one epoch's batches gave.
struct EpochSums {
    losses: Vec<Tensor>,
    images: i64,
    lr: f64,
}

impl Trainer<'_> {
    /// Restores the latest checkpoint into the model, the optimiser and `state` (when there is one).
    pub fn resume(&mut self, state: &mut TrainState) -> Result<bool> {
        match &self.checkpoint {
            Some(c) => c.restore(&mut self.opt, state),
            None => Ok(false),
        }
    }

    /// Trains from `state.epochs_done` to the last epoch, or until a callback stops the run early.
    pub fn fit(
        &mut self,
        step: &mut dyn TrainStep,
        state: &mut TrainState,
        callbacks: &mut [&mut dyn Callback],
    ) -> Result<()> {
        if let Some(g) = crate::dist::current() {
            self.start_together(g, step, state)?;
        }
        if !state.stopped_early && state.epochs_done < self.epochs {
            let t0 = Instant::now();
            step.prepare()?;
            state.setup_seconds += t0.elapsed().as_secs_f64();
        }
        let total = self.steps_per_epoch * self.epochs;
        let mut update = state.epochs_done * self.steps_per_epoch;
        for cb in callbacks.iter_mut() {
            cb.on_train_start(update, total)?;
        }
        for epoch in state.epochs_done..self.epochs {
            if state.stopped_early {
                break;
            }
            let t0 = Instant::now();
            let sums = self.run_epoch(step, epoch, &mut update, total, callbacks)?;
            if sums.losses.is_empty() {
                bail!("epoch {} has no training batches", epoch + 1);
            }
            let train_loss = Tensor::stack(&sums.losses, 0).mean(Kind::Double).double_value(&[]);
            if !train_loss.is_finite() {
                for cb in callbacks.iter_mut() {
                    cb.on_stop()?;
                }
                bail!("{}", self.divergence(train_loss, epoch, state));
            }
            let val = crate::profile::time("validation", || step.validate())?;
            let secs = t0.elapsed().as_secs_f64();
            let images_per_s = sums.images as f64 / secs;
            let record = EpochRecord { epoch: epoch + 1, train_loss, lr: sums.lr, seconds: secs, images_per_s, val };
            state.history.push(record.clone());
            state.epochs_done = epoch + 1;
            {
                let _s = crate::profile::span("epoch callbacks");
                for cb in callbacks.iter_mut() {
                    cb.on_epoch_end(&record, state)?;
                }
            }
            if let Some(c) = &self.checkpoint {
                crate::profile::time("checkpoint", || c.save(&self.opt, state))?;
            }
        }
        for cb in callbacks.iter_mut() {
            cb.on_train_end(state)?;
        }
        Ok(())
    }

    /// Data-parallel: every process starts from rank 0's parameters, optimiser state, step state and run
    /// state (rank 0 alone holds the checkpoint a resumed run continues from).
    fn start_together(&mut self, g: &crate::dist::Group, step: &dyn TrainStep, state: &mut TrainState) -> Result<()> {
        let params: Vec<Tensor> = self.opt.tensors().map(Tensor::shallow_clone).collect();
        g.broadcast_in_place(&params)?;
        let mut opt_state = BTreeMap::new();
        for (k, t) in self.opt.state() {
            opt_state.insert(k, g.broadcast(&t, 0)?);
        }
        self.opt.load_state(&opt_state, std::path::Path::new("rank 0's optimiser state"))?;
        g.broadcast_in_place(&step.shared_state())?;
        let bytes = g.broadcast_bytes(&serde_json::to_vec(state)?)?;
        *state = serde_json::from_slice(&bytes)?;
        Ok(())
    }

    /// Data-parallel: sums the update's gradients (each process's already weighted by its share of the
    /// global batches) and its batches' losses over all processes, in one flat bucket; returns the
    /// losses of the global batches. A gradient that is undefined here (no backward on an empty shard)
    /// but defined elsewhere is created; one defined nowhere stays undefined, as in one process.
    fn sum_window(&mut self, g: &crate::dist::Group, losses: &[Tensor]) -> Result<Vec<Tensor>> {
        let params: Vec<Tensor> = self.opt.tensors().map(Tensor::shallow_clone).collect();
        let mut parts = Vec::with_capacity(params.len() + 2);
        let mut defined = Vec::with_capacity(params.len());
        for p in &params {
            let gr = p.grad();
            defined.push(gr.defined());
            parts.push(if gr.defined() { gr } else { p.zeros_like().to_kind(Kind::Float) });
        }
        let flags: Vec<f32> = defined.iter().map(|&d| f32::from(u8::from(d))).collect();
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        parts.push(Tensor::from_slice(&flags).to_device(device));
        let losses: Vec<Tensor> = losses.iter().map(|l| l.detach().to_kind(Kind::Float).to_device(device)).collect();
        parts.push(Tensor::stack(&losses, 0));
        g.sum_in_place(&parts)?;
        let flags = Vec::<f32>::try_from(&parts[params.len()].to_device(tch::Device::Cpu))?;
        for (i, p) in params.iter().enumerate() {
            if !defined[i] && flags[i] > 0.0 {
                // A zero gradient through autograd (tch cannot assign one), then the sum.
                (p * 0.0).sum(Kind::Float).backward();
                let _g = tch::no_grad_guard();
                p.grad().copy_(&parts[i].to_kind(p.kind()));
            }
        }
        Ok(parts[params.len() + 1].unbind(0))
    }

    /// Why and where a run with a non-finite loss stopped: whether the parameters diverged, and what is kept.
    fn divergence(&self, loss: f64, epoch: i64, state: &TrainState) -> String {
        let diverged = tch::no_grad(|| self.opt.tensors().any(|t| t.isfinite().all().int64_value(&[]) == 0));
        let cause = if diverged {
            "a trained parameter is no longer finite (a learning rate too high for these data, or an extreme input \
             batch)"
        } else {
            "the parameters are finite: a non-finite input or backbone weight, or an overflow in the forward pass"
        };
        let done = state.epochs_done;
        let kept = match (&self.checkpoint, &self.saved_in) {
            _ if done == 0 => "no epoch finished, so nothing was kept".to_string(),
            (Some(c), _) => format!("the last good checkpoint (epoch {done}) is kept in {}", c.dir().display()),
            (None, Some(d)) => format!("what epoch {done} saved is kept in {}", d.display()),
            (None, None) => format!("{done} epochs finished"),
        };
        format!("training loss became {loss} in epoch {}; stopping: {cause}; {kept}", epoch + 1)
    }

    /// The batches of one epoch: forward, backward, and an update every `accum` batches.
    fn run_epoch(
        &mut self,
        step: &mut dyn TrainStep,
        epoch: i64,
        update: &mut i64,
        total: i64,
        callbacks: &mut [&mut dyn Callback],
    ) -> Result<EpochSums> {
        let accum = self.accum.max(1);
        let mut sums = EpochSums { losses: Vec::new(), images: 0, lr: self.schedule.lr(*update) };
        let mut window_images = 0;
        let mut window_losses = Vec::new();
        let group = crate::dist::current();
        self.opt.zero_grad();
        let Batches { len, iter } = step.batches(epoch);
        // The batch is prepared (loader wait, device copy, augmentation) inside `next`: timed as "data".
        let mut iter = iter.enumerate();
        while let Some((i, batch)) = crate::profile::time("data", || iter.next()) {
            let mut loss = crate::profile::time("forward", || step.loss(&batch))?;
            crate::profile::time("backward", || {
                if batch.shard.len == 0 {
                    // An empty shard (data-parallel): nothing to back-propagate here.
                } else if accum == 1 {
                    loss.backward()
                } else {
                    (&loss / accum as f64).backward()
                }
            });
            // Images of the global batch (this process's shard is part of it).
            let n = batch.shard.total;
            window_losses.push(loss.detach());
            sums.images += n;
            window_images += n;
            if (i + 1) as i64 % accum != 0 && i + 1 != len {
                continue;
            }
            let _s = crate::profile::span("optimizer");
            match group {
                Some(g) => {
                    let global = crate::profile::time("gradient sum", || self.sum_window(g, &window_losses))?;
                    loss = global.last().expect("a window has a batch").shallow_clone();
                    sums.losses.extend(global);
                }
                None => sums.losses.append(&mut window_losses),
            }
            window_losses.clear();
            for cb in callbacks.iter_mut() {
                cb.on_before_optimizer_step(&self.opt)?;
            }
            if self.clip > 0.0 {
                let _ = self.opt.clip_grad_norm(self.clip);
            }
            sums.lr = self.schedule.lr(*update);
            self.opt.step(sums.lr);
            self.opt.zero_grad();
            step.after_update(*update, total)?;
            drop(_s);
            let _s = crate::profile::span("step callbacks");
            let diagnostics = step.diagnostics();
            let end = StepEnd {
                step: *update,
                total_steps: total,
                epoch,
                lr: sums.lr,
                loss: &loss,
                images: window_images,
                diagnostics: &diagnostics,
            };
            for cb in callbacks.iter_mut() {
                cb.on_step_end(&end)?;
            }
            window_images = 0;
            *update += 1;
        }
        Ok(sums)
    }
}
