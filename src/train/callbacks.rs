//! The pieces the training loop calls: checkpoint and resume ([`Checkpointer`]), and the
//! [`Callback`]s for model selection on validation ([`BestOnValidation`]), early stopping
//! ([`EarlyStopping`]), the epoch log ([`History`]), the per-step loss log ([`LossLog`]), progress
//! ([`ProgressReport`]) and per-epoch saves ([`EachEpoch`]).
use super::optim::AdamW;
use super::trainer::{Callback, EpochRecord, StepEnd, TrainState};
use crate::peft::io::write_text_atomic;
use anyhow::{Context, Result, anyhow, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Something whose trained values can be written to a folder and read back (a model's target
/// parameters and head, or its whole backbone for full fine-tuning).
pub trait Checkpointable {
    /// Writes the trained values into `dir`.
    fn save(&self, dir: &Path) -> Result<()>;
    /// Reads what [`Checkpointable::save`] wrote.
    fn load(&self, dir: &Path) -> Result<()>;
}

/// Replaces folder `dst` by `tmp` as atomically as the file system allows (the previous version stays as
/// `<dst>.old` until the new one is in place).
fn swap_dir(tmp: &Path, dst: &Path) -> Result<()> {
    let old = dst.with_extension("old");
    let _ = std::fs::remove_dir_all(&old);
    if dst.exists() {
        std::fs::rename(dst, &old).with_context(|| format!("{}: cannot rotate", dst.display()))?;
    }
    std::fs::rename(tmp, dst).with_context(|| format!("{}: cannot move into place", dst.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Writes `what` into a fresh `<dst>.tmp` folder, then swaps it in for `dst`: a reader never sees a
/// half-written folder.
pub fn write_dir_atomic(dst: &Path, what: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dst.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    what(&tmp)?;
    swap_dir(&tmp, dst)
}

/// The latest epoch of a run, with the optimiser state and the run's [`TrainState`], in one folder
/// replaced atomically after every epoch; `--resume` starts from it.
pub struct Checkpointer<'a> {
    dir: PathBuf,
    model: &'a dyn Checkpointable,
}

impl<'a> Checkpointer<'a> {
    /// Checkpoints of `model` in `dir`.
    pub fn new(dir: PathBuf, model: &'a dyn Checkpointable) -> Self {
        Checkpointer { dir, model }
    }

    /// The checkpoint folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes model, optimiser state and run state.
    pub fn save(&self, opt: &AdamW, state: &TrainState) -> Result<()> {
        write_dir_atomic(&self.dir, |tmp| {
            self.model.save(tmp)?;
            let st = opt.state();
            let pairs: Vec<(&str, &Tensor)> = st.iter().map(|(k, v)| (k.as_str(), v)).collect();
            Tensor::write_safetensors(&pairs, tmp.join("optimizer.safetensors"))
                .map_err(|e| anyhow!("{}: cannot write optimiser state ({e})", tmp.display()))?;
            std::fs::write(tmp.join("state.json"), serde_json::to_string_pretty(state)?)
                .with_context(|| format!("{}: cannot write state.json", tmp.display()))
        })
    }

    /// The folder to resume from: the checkpoint, or its previous version if a swap was interrupted.
    fn latest(&self) -> Option<PathBuf> {
        if self.dir.join("state.json").exists() {
            return Some(self.dir.clone());
        }
        let old = self.dir.with_extension("old");
        old.join("state.json").exists().then_some(old)
    }

    /// Restores the latest checkpoint, if any, into the model, `opt` and `state`.
    pub fn restore(&self, opt: &mut AdamW, state: &mut TrainState) -> Result<bool> {
        let Some(dir) = self.latest() else { return Ok(false) };
        self.model.load(&dir)?;
        let st_path = dir.join("optimizer.safetensors");
        let st = crate::backbone::checkpoint::read_safetensors(&st_path)?;
        opt.load_state(&st, &st_path)?;
        let text = std::fs::read_to_string(dir.join("state.json"))
            .with_context(|| format!("{}: cannot read state.json", dir.display()))?;
        *state = serde_json::from_str(&text).with_context(|| format!("{}: corrupt state.json", dir.display()))?;
        Ok(true)
    }
}

/// Model selection: keeps the weights of the best epoch on a validation metric in a folder (replaced
/// atomically), and the best value and epoch in the run state.
pub struct BestOnValidation<'a> {
    /// The validation metric (higher is better).
    pub metric: String,
    /// Where the best weights go.
    pub dir: PathBuf,
    /// The model.
    pub model: &'a dyn Checkpointable,
}

impl Callback for BestOnValidation<'_> {
    fn on_epoch_end(&mut self, record: &EpochRecord, state: &mut TrainState) -> Result<()> {
        let v = record.val.get(&self.metric).copied().unwrap_or(f64::NEG_INFINITY);
        if v > state.best_value {
            state.best_value = v;
            state.best_epoch = record.epoch;
            write_dir_atomic(&self.dir, |tmp| self.model.save(tmp))?;
        }
        Ok(())
    }

    fn on_train_end(&mut self, state: &TrainState) -> Result<()> {
        if state.best_epoch < 0 {
            bail!("no epoch produced a finite validation {}", self.metric);
        }
        Ok(())
    }
}

/// Early stopping: ends the run after `patience` epochs without a new best (0: never). Runs after
/// [`BestOnValidation`], whose best epoch it reads.
pub struct EarlyStopping {
    /// Epochs without improvement allowed.
    pub patience: i64,
}

impl Callback for EarlyStopping {
    fn on_epoch_end(&mut self, record: &EpochRecord, state: &mut TrainState) -> Result<()> {
        state.bad_epochs = if state.best_epoch == record.epoch { 0 } else { state.bad_epochs + 1 };
        if self.patience > 0 && state.bad_epochs >= self.patience {
            state.stopped_early = true;
        }
        Ok(())
    }
}

/// The epoch log of a run: `metrics.csv` (one row per epoch) and `history.json`, rewritten atomically
/// after every epoch.
pub struct History {
    /// The run folder.
    pub dir: PathBuf,
}

impl Callback for History {
    fn on_epoch_end(&mut self, _record: &EpochRecord, state: &mut TrainState) -> Result<()> {
        let keys: std::collections::BTreeSet<&String> = state.history.iter().flat_map(|r| r.val.keys()).collect();
        let mut s = String::from("epoch,train_loss,lr,seconds,images_per_s");
        for k in &keys {
            s.push_str(&format!(",val_{k}"));
        }
        s.push('\n');
        for r in &state.history {
            s.push_str(&format!("{},{:.6},{:.6e},{:.3},{:.1}", r.epoch, r.train_loss, r.lr, r.seconds, r.images_per_s));
            for k in &keys {
                s.push_str(&format!(",{}", r.val.get(*k).map_or(String::new(), |v| format!("{v:.6}"))));
            }
            s.push('\n');
        }
        write_text_atomic(&self.dir.join("metrics.csv"), &s)?;
        write_text_atomic(&self.dir.join("history.json"), &serde_json::to_string_pretty(&state.history)?)
    }
}

/// Progress of the run's updates, reported through [`crate::progress`]; the message after each epoch
/// gives its loss (and a validation metric, when `metric` is set).
pub struct ProgressReport {
    label: String,
    metric: Option<String>,
    task: Option<crate::progress::Task>,
    done: i64,
    /// Images since the run (re)started, and when it did: the rate a status shows.
    images: i64,
    started: Instant,
}

impl ProgressReport {
    /// Progress labelled `label`, showing validation `metric` when given.
    pub fn new(label: &str, metric: Option<&str>) -> Self {
        ProgressReport {
            label: label.to_string(),
            metric: metric.map(str::to_string),
            task: None,
            done: 0,
            images: 0,
            started: Instant::now(),
        }
    }
}

impl Callback for ProgressReport {
    fn on_train_start(&mut self, done_steps: i64, total_steps: i64) -> Result<()> {
        self.done = done_steps;
        self.started = Instant::now();
        self.images = 0;
        self.task = Some(crate::progress::start(&self.label, (total_steps - done_steps).max(0) as u64));
        Ok(())
    }
    fn on_step_end(&mut self, s: &StepEnd) -> Result<()> {
        self.images += s.images;
        if let Some(t) = &self.task {
            let (images, secs) = (self.images, self.started.elapsed().as_secs_f64().max(1e-9));
            let status = || {
                let loss = s.loss.double_value(&[]);
                format!("epoch {} loss {loss:.4} {:.0} img/s", s.epoch + 1, images as f64 / secs)
            };
            t.tick((s.step + 1 - self.done).max(0) as u64, &status);
        }
        Ok(())
    }
    fn on_epoch_end(&mut self, r: &EpochRecord, _state: &mut TrainState) -> Result<()> {
        let mut msg = format!("epoch {} loss {:.4}", r.epoch, r.train_loss);
        if let Some(m) = &self.metric {
            msg.push_str(&format!(" val {m} {:.4}", r.val.get(m).copied().unwrap_or(f64::NAN)));
        }
        msg.push_str(&format!(" {:.0} img/s", r.images_per_s));
        if let Some(t) = &self.task {
            t.set_message(&msg);
        }
        Ok(())
    }
    fn on_train_end(&mut self, _state: &TrainState) -> Result<()> {
        self.task = None;
        Ok(())
    }
}

/// A row of `loss.csv` not yet written: step, epoch, lr, loss and the step's diagnostics (on the device).
type PendingRow = (i64, i64, f64, Tensor, Vec<(&'static str, Tensor)>);

/// A per-step loss log, `loss.csv` (`step, epoch, loss, lr, images_per_s` and the stage's diagnostics, such
/// as DINO's entropies). Losses stay on the device and are read every 20 updates, so a GPU is not
/// synchronised at every step; a non-finite loss stops the run.
pub struct LossLog {
    csv: std::io::BufWriter<std::fs::File>,
    /// The header is written with the first rows, when the step's diagnostics columns are known.
    header: bool,
    pending: Vec<PendingRow>,
    window: Instant,
    window_images: i64,
    /// Where the stage keeps what its last finished epoch saved (named when a loss is not finite).
    kept: PathBuf,
    /// The first logged loss.
    pub first_loss: f64,
    /// The latest logged loss.
    pub last_loss: f64,
}

impl LossLog {
    /// Creates `<out>/loss.csv`.
    pub fn new(out: &Path) -> Result<Self> {
        let csv_path = out.join("loss.csv");
        let csv = std::io::BufWriter::new(
            std::fs::File::create(&csv_path).with_context(|| format!("{}: cannot create", csv_path.display()))?,
        );
        Ok(LossLog {
            csv,
            header: false,
            pending: Vec::new(),
            window: Instant::now(),
            window_images: 0,
            kept: out.to_path_buf(),
            first_loss: f64::NAN,
            last_loss: f64::NAN,
        })
    }

    fn flush(&mut self) -> Result<()> {
        self.write(true)
    }

    /// Writes the pending rows; with `check`, a non-finite loss stops the run instead.
    fn write(&mut self, check: bool) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        if !self.header {
            let extra: String = self.pending[0].4.iter().map(|(k, _)| format!(",{k}")).collect();
            writeln!(self.csv, "step,epoch,loss,lr,images_per_s{extra}")?;
            self.header = true;
        }
        // One read of every pending scalar: the loss and the diagnostics of each row.
        let all: Vec<Tensor> = self
            .pending
            .iter()
            .flat_map(|p| std::iter::once(&p.3).chain(p.4.iter().map(|d| &d.1)))
            .map(|t| t.to_kind(Kind::Double).to_device(Device::Cpu).reshape([1]))
            .collect();
        let values = Vec::<f64>::try_from(Tensor::cat(&all, 0))?;
        let width = 1 + self.pending[0].4.len();
        let ips = self.window_images as f64 / self.window.elapsed().as_secs_f64().max(1e-9);
        for ((s, e, lr, _, _), row) in self.pending.drain(..).zip(values.chunks(width)) {
            let l = row[0];
            if check && !l.is_finite() {
                let kept = if e == 0 {
                    "no epoch finished, so nothing was kept".to_string()
                } else {
                    format!("what the last finished epoch saved is kept in {}", self.kept.display())
                };
                bail!(
                    "loss became {l} at step {s} (epoch {}); stopping (a learning rate too high for these data, a \
                     non-finite input or weight, or an overflow); {kept}",
                    e + 1
                );
            }
            if self.first_loss.is_nan() {
                self.first_loss = l;
            }
            self.last_loss = l;
            let extra: String = row[1..].iter().map(|v| format!(",{v:.6}")).collect();
            writeln!(self.csv, "{s},{e},{l:.6},{lr:.6e},{ips:.1}{extra}")?;
        }
        self.window = Instant::now();
        self.window_images = 0;
        self.csv.flush()?;
        Ok(())
    }
}

impl Callback for LossLog {
    fn on_stop(&mut self) -> Result<()> {
        // The stopped run's last losses, non-finite ones included, are on record.
        self.write(false)
    }
    fn on_step_end(&mut self, s: &StepEnd) -> Result<()> {
        let diag = s.diagnostics.iter().map(|(k, t)| (*k, t.detach())).collect();
        self.pending.push((s.step, s.epoch, s.lr, s.loss.detach(), diag));
        self.window_images += s.images;
        if self.pending.len() >= 20 || s.step + 1 == s.total_steps {
            self.flush()?;
        }
        Ok(())
    }
    fn on_train_end(&mut self, _state: &TrainState) -> Result<()> {
        self.flush()
    }
}

/// Runs a closure after every epoch (a stage's own saves: target parameters, pretext head, previews).
pub struct EachEpoch<F: FnMut(&EpochRecord) -> Result<()>>(pub F);

impl<F: FnMut(&EpochRecord) -> Result<()>> Callback for EachEpoch<F> {
    fn on_epoch_end(&mut self, record: &EpochRecord, _state: &mut TrainState) -> Result<()> {
        (self.0)(record)
    }
}
