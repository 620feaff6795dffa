//! Where a command's wall time goes (`tpp --profile ...`): named spans around the phases of training and
//! evaluation (batch preparation, augmentation, forward, backward, optimiser, validation, checkpoint
//! writes, reports), summed per name and printed as one table when the command ends. Off by default; a span
//! then costs one atomic load. On CUDA a span synchronises the device when it ends, so the time of the
//! kernels it launched lands in it (this slows the run a little: profile numbers are for attribution,
//! `tpp bench` and the epoch times for speed).
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

static ENABLED: AtomicBool = AtomicBool::new(false);
/// CUDA device to synchronise at the end of a span (-1: none).
static SYNC: AtomicI64 = AtomicI64::new(-1);

struct Totals {
    start: Option<Instant>,
    /// (name, total time, calls), in order of first use.
    spans: Vec<(&'static str, Duration, u64)>,
}

static TOTALS: Mutex<Totals> = Mutex::new(Totals { start: None, spans: Vec::new() });

/// Starts profiling on `device` (spans before this are not counted).
pub fn enable(device: tch::Device) {
    let mut t = TOTALS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    t.start = Some(Instant::now());
    t.spans.clear();
    SYNC.store(if let tch::Device::Cuda(i) = device { i as i64 } else { -1 }, Ordering::Relaxed);
    ENABLED.store(true, Ordering::Relaxed);
}

/// Whether spans are being counted.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A running span: its time is added to `name` when it is dropped.
#[must_use = "a span measures until it is dropped"]
pub struct Span {
    name: &'static str,
    start: Option<Instant>,
}

/// Times the enclosing scope (until the returned guard drops) under `name`.
pub fn span(name: &'static str) -> Span {
    Span { name, start: enabled().then(Instant::now) }
}

/// Runs `f` inside a span named `name`.
pub fn time<T>(name: &'static str, f: impl FnOnce() -> T) -> T {
    let _s = span(name);
    f()
}

impl Drop for Span {
    fn drop(&mut self) {
        let Some(start) = self.start else { return };
        let dev = SYNC.load(Ordering::Relaxed);
        if dev >= 0 {
            tch::Cuda::synchronize(dev);
        }
        let dt = start.elapsed();
        let mut t = TOTALS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match t.spans.iter_mut().find(|(n, _, _)| *n == self.name) {
            Some(e) => {
                e.1 += dt;
                e.2 += 1;
            }
            None => t.spans.push((self.name, dt, 1)),
        }
    }
}

/// The table of spans so far: name, calls, total seconds, share of the wall time since [`enable`], mean
/// milliseconds per call. Spans nest (a stage contains its steps), so shares need not add up to 100%.
pub fn report() -> String {
    let t = TOTALS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let wall = t.start.map_or(0.0, |s| s.elapsed().as_secs_f64());
    let mut out = format!("profile (wall {wall:.2} s; spans nest, so shares overlap)\n");
    out.push_str(&format!("{:<22} {:>8} {:>10} {:>7} {:>10}\n", "span", "calls", "total s", "share", "mean ms"));
    for (name, d, n) in &t.spans {
        let s = d.as_secs_f64();
        let share = if wall > 0.0 { 100.0 * s / wall } else { 0.0 };
        out.push_str(&format!("{name:<22} {n:>8} {s:>10.3} {share:>6.1}% {:>10.3}\n", 1e3 * s / *n as f64));
    }
    out
}

unsafe extern "C" {
    fn tpp_trace_start(cuda: i32) -> i32;
    fn tpp_trace_stop(path: *const std::ffi::c_char) -> i32;
}

/// Starts libtorch's profiler (every operator, with input shapes; CUDA kernels too on a GPU), for
/// [`stop_trace`] to save.
pub fn start_trace(device: tch::Device) -> anyhow::Result<()> {
    // SAFETY: plain C call; the shim catches every C++ exception.
    if unsafe { tpp_trace_start(i32::from(device.is_cuda())) } != 0 {
        anyhow::bail!("libtorch's profiler could not be started");
    }
    Ok(())
}

/// Stops libtorch's profiler and saves what it recorded as a Chrome trace (Perfetto, chrome://tracing)
/// at `path`.
pub fn stop_trace(path: &std::path::Path) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| anyhow::anyhow!("{}: a path with a NUL byte", path.display()))?;
    // SAFETY: as above; `c` outlives the call.
    if unsafe { tpp_trace_stop(c.as_ptr()) } != 0 {
        anyhow::bail!("{}: libtorch's profiler could not save the trace", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spans add up per name only while enabled; the table lists them with their calls.
    #[test]
    fn spans_sum_per_name_when_enabled() {
        drop(span("before"));
        enable(tch::Device::Cpu);
        for _ in 0..3 {
            let _s = span("work");
            std::thread::sleep(Duration::from_millis(2));
        }
        time("other", || std::thread::sleep(Duration::from_millis(1)));
        let r = report();
        assert!(!r.contains("before"), "{r}");
        let work = r.lines().find(|l| l.starts_with("work")).expect("a row for 'work'");
        let cols: Vec<&str> = work.split_whitespace().collect();
        assert_eq!(cols[1], "3", "{r}");
        assert!(cols[2].parse::<f64>().unwrap() >= 0.006, "{r}");
        assert!(r.lines().any(|l| l.starts_with("other")), "{r}");
    }

    /// The trace holds the operators run while it was on, by name.
    #[test]
    fn trace_records_operators() {
        let dir = std::env::temp_dir().join(format!("tpp-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace.json");
        start_trace(tch::Device::Cpu).unwrap();
        let a = tch::Tensor::ones([8, 8], (tch::Kind::Float, tch::Device::Cpu));
        let _ = a.matmul(&a).gelu("none");
        stop_trace(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).expect("a JSON trace");
        let names: Vec<&str> = v["traceEvents"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
        assert!(names.contains(&"aten::matmul") && names.contains(&"aten::gelu"), "{names:?}");
    }
}
