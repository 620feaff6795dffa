//! Progress of long work (training stages), reported to whatever the application installs: the
//! command-line program draws a bar; a library user may log, forward to a UI, or install nothing (the
//! default, silent).
use std::sync::{Arc, RwLock};

/// Receives progress reports. One task runs at a time (stages run one after another).
pub trait Reporter: Send + Sync {
    /// A task with `total` units of work starts (`label`: what it is, e.g. "fine-tune").
    fn start(&self, label: &str, total: u64);
    /// `position` units are done.
    fn set_position(&self, position: u64);
    /// How it goes (e.g. the latest epoch's loss): a milestone worth showing at once.
    fn set_message(&self, message: &str);
    /// `position` units are done, and `status` says how it goes now (e.g. the latest loss). `status` is
    /// called only when the reporter shows it (reading a loss synchronises a GPU); by default never.
    fn tick(&self, position: u64, status: &dyn Fn() -> String) {
        let _ = status;
        self.set_position(position);
    }
    /// The task ended (finished or stopped).
    fn finish(&self);
}

static REPORTER: RwLock<Option<Arc<dyn Reporter>>> = RwLock::new(None);

/// Installs the reporter every later task reports to (replacing any earlier one).
pub fn set_reporter(r: Arc<dyn Reporter>) {
    if let Ok(mut g) = REPORTER.write() {
        *g = Some(r);
    }
}

fn reporter() -> Option<Arc<dyn Reporter>> {
    REPORTER.read().ok().and_then(|g| g.clone())
}

/// A running task; it reports its end when dropped.
pub struct Task {
    reporter: Option<Arc<dyn Reporter>>,
}

/// Starts a task of `total` units.
pub fn start(label: &str, total: u64) -> Task {
    let reporter = reporter();
    if let Some(r) = &reporter {
        r.start(label, total);
    }
    Task { reporter }
}

impl Task {
    /// Reports `position` units done.
    pub fn set_position(&self, position: u64) {
        if let Some(r) = &self.reporter {
            r.set_position(position);
        }
    }

    /// Reports `position` units done, with a status computed only if the reporter shows it.
    pub fn tick(&self, position: u64, status: &dyn Fn() -> String) {
        if let Some(r) = &self.reporter {
            r.tick(position, status);
        }
    }

    /// Reports how it goes.
    pub fn set_message(&self, message: &str) {
        if let Some(r) = &self.reporter {
            r.set_message(message);
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if let Some(r) = &self.reporter {
            r.finish();
        }
    }
}
