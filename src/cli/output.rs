//! What the program shows on stderr: log lines (tracing, `-v`/`-q`/`RUST_LOG`) and the library's progress
//! reports: a bar on a terminal, drawn so that log lines never tear it; progress lines otherwise.
use std::io::Write;
use std::sync::{Arc, Mutex};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The bar being drawn, if any.
static BAR: Mutex<Option<indicatif::ProgressBar>> = Mutex::new(None);

/// Draws the library's progress reports as one indicatif bar (hidden when stderr is not a terminal).
struct Bars;

impl crate::progress::Reporter for Bars {
    fn start(&self, label: &str, total: u64) {
        let pb = indicatif::ProgressBar::new(total);
        let template = format!("{label} {{bar:30}} {{pos}}/{{len}} {{msg}} ETA {{eta}}");
        pb.set_style(
            indicatif::ProgressStyle::with_template(&template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        if let Ok(mut b) = BAR.lock() {
            *b = Some(pb);
        }
    }
    fn set_position(&self, position: u64) {
        if let Ok(Some(b)) = BAR.lock().as_deref() {
            b.set_position(position);
        }
    }
    fn set_message(&self, message: &str) {
        if let Ok(Some(b)) = BAR.lock().as_deref() {
            b.set_message(message.to_string());
        }
    }
    fn finish(&self) {
        if let Ok(mut b) = BAR.lock()
            && let Some(pb) = b.take()
        {
            pb.finish_and_clear();
        }
    }
}

/// Progress as log lines, for stderr that is not a terminal (batch jobs, nohup, CI logs): one line per
/// milestone (an epoch's end) and, in between, one every `TPP_LOG_INTERVAL` seconds (default 30) with the
/// position, the task's status (loss, img/s) and the time left. Written through `tracing` at info
/// level, so `-q` silences them.
struct Lines {
    every: std::time::Duration,
    state: Mutex<Option<LineTask>>,
}

struct LineTask {
    label: String,
    total: u64,
    position: u64,
    started: std::time::Instant,
    last: std::time::Instant,
}

impl LineTask {
    fn line(&self, what: &str) -> String {
        let pct = if self.total > 0 { 100.0 * self.position as f64 / self.total as f64 } else { 100.0 };
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if self.position > 0 && self.position < self.total {
            let left = elapsed / self.position as f64 * (self.total - self.position) as f64;
            format!(", ETA {}", hms(left))
        } else {
            String::new()
        };
        let sep = if what.is_empty() { "" } else { ": " };
        format!("{} {}/{} ({pct:.0}%{eta}, {} elapsed){sep}{what}", self.label, self.position, self.total, hms(elapsed))
    }
}

/// Seconds as `1h02m03s`, `2m03s` or `3s`.
fn hms(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, sec) => format!("{h}h{m:02}m{sec:02}s"),
    }
}

impl Lines {
    fn new() -> Self {
        let secs = std::env::var("TPP_LOG_INTERVAL").ok().and_then(|v| v.trim().parse::<f64>().ok());
        let secs = secs.filter(|s| s.is_finite() && *s >= 0.0).unwrap_or(30.0).min(86400.0);
        Lines { every: std::time::Duration::from_secs_f64(secs), state: Mutex::new(None) }
    }

    /// Updates the position and returns the line to print now, if one is due.
    fn due(&self, position: u64) -> Option<std::sync::MutexGuard<'_, Option<LineTask>>> {
        let mut g = self.state.lock().ok()?;
        let t = g.as_mut()?;
        t.position = position;
        if t.last.elapsed() < self.every {
            return None;
        }
        t.last = std::time::Instant::now();
        Some(g)
    }
}

impl crate::progress::Reporter for Lines {
    fn start(&self, label: &str, total: u64) {
        let now = std::time::Instant::now();
        if let Ok(mut g) = self.state.lock() {
            *g = Some(LineTask { label: label.to_string(), total, position: 0, started: now, last: now });
        }
    }
    fn set_position(&self, position: u64) {
        if let Some(g) = self.due(position)
            && let Some(t) = g.as_ref()
        {
            tracing::info!("{}", t.line(""));
        }
    }
    fn tick(&self, position: u64, status: &dyn Fn() -> String) {
        if let Some(g) = self.due(position)
            && let Some(t) = g.as_ref()
        {
            tracing::info!("{}", t.line(&status()));
        }
    }
    fn set_message(&self, message: &str) {
        if let Ok(mut g) = self.state.lock()
            && let Some(t) = g.as_mut()
        {
            t.last = std::time::Instant::now();
            tracing::info!("{}", t.line(message));
        }
    }
    fn finish(&self) {
        if let Ok(mut g) = self.state.lock() {
            *g = None;
        }
    }
}

/// Stderr, with the bar suspended while a line is written.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let bar = BAR.lock().ok().and_then(|b| b.clone());
        match bar {
            Some(b) => b.suspend(|| std::io::stderr().write_all(buf)).map(|_| buf.len()),
            None => std::io::stderr().write_all(buf).map(|_| buf.len()),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Log lines as a user reads them: info plain, other levels prefixed (`warning: ...`).
struct Plain;

impl<S, N> FormatEvent<S, N> for Plain
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        match *event.metadata().level() {
            Level::INFO => {}
            Level::WARN => write!(w, "warning: ")?,
            Level::ERROR => write!(w, "error: ")?,
            l => write!(w, "{}: ", l.as_str().to_lowercase())?,
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// Installs logging (`TPP_LOG` or else `RUST_LOG` when set, else info, debug with `-v`, trace with `-vv`,
/// warnings only with `-q`) and the progress bar.
pub fn init(verbose: u8, quiet: bool) {
    // In a data-parallel job rank 0 speaks for all; the others report errors only (their last line).
    let other_rank = crate::dist::env_rank().is_some_and(|r| r != 0);
    let level = match (quiet, verbose) {
        _ if other_rank => "error",
        (true, _) => "warn",
        (_, 0) => "info",
        (_, 1) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TPP_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| level.into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).event_format(Plain).with_writer(|| Stderr).try_init();
    if !other_rank {
        use std::io::IsTerminal;
        if std::io::stderr().is_terminal() {
            crate::progress::set_reporter(Arc::new(Bars));
        } else {
            crate::progress::set_reporter(Arc::new(Lines::new()));
        }
    }
}
