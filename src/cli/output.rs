//! What the program shows on stderr: log lines (tracing, `-v`/`-q`/`RUST_LOG`) and a progress bar for
//! the library's progress reports, drawn so that log lines never tear it.
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
        crate::progress::set_reporter(Arc::new(Bars));
    }
}
