//! Checks of option values, shared by command-line flags (as clap value parsers, so a bad flag is a
//! usage error before any work) and typed configs (`validate()`, for configs read from files and for
//! library callers). Every message names the option and the value.
use crate::error::bad_input;
use anyhow::Result;

/// The largest batch accepted: far beyond any device's memory at ViT sizes, small enough that sizes
/// computed from it cannot overflow.
pub(crate) const MAX_BATCH: i64 = 1 << 16;

/// A closed or half-open interval of allowed values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Range {
    lo: f64,
    hi: f64,
    lo_open: bool,
    hi_open: bool,
}

/// Any finite number.
pub(crate) const FINITE: Range = Range { lo: f64::MIN, hi: f64::MAX, lo_open: false, hi_open: false };
/// (0, inf).
pub(crate) const POSITIVE: Range = Range { lo: 0.0, hi: f64::MAX, lo_open: true, hi_open: false };
/// [0, inf).
pub(crate) const NON_NEGATIVE: Range = Range { lo: 0.0, hi: f64::MAX, lo_open: false, hi_open: false };
/// [0, 1].
pub(crate) const UNIT: Range = Range { lo: 0.0, hi: 1.0, lo_open: false, hi_open: false };
/// [0, 1).
pub(crate) const UNIT_OPEN_HIGH: Range = Range { lo: 0.0, hi: 1.0, lo_open: false, hi_open: true };
/// (0, 1].
pub(crate) const UNIT_OPEN_LOW: Range = Range { lo: 0.0, hi: 1.0, lo_open: true, hi_open: false };

/// [0, 180]: a rotation in degrees (beyond 180 the draw repeats itself).
pub(crate) const DEGREES: Range = Range { lo: 0.0, hi: 180.0, lo_open: false, hi_open: false };

/// [0, 0.95]: an overlap of sliding windows (at 1 the windows would not advance).
pub(crate) const OVERLAP: Range = Range { lo: 0.0, hi: 0.95, lo_open: false, hi_open: false };

/// (0, 1).
pub(crate) const OPEN_UNIT: Range = Range { lo: 0.0, hi: 1.0, lo_open: true, hi_open: true };

impl Range {
    fn contains(&self, v: f64) -> bool {
        v.is_finite()
            && (if self.lo_open { v > self.lo } else { v >= self.lo })
            && (if self.hi_open { v < self.hi } else { v <= self.hi })
    }

    fn describe(&self) -> String {
        let bound = |x: f64| if x.abs() >= f64::MAX { "inf".to_string() } else { format!("{x}") };
        match (self.lo == f64::MIN, self.hi == f64::MAX) {
            (true, true) => "a finite number".into(),
            (false, true) => format!("{} {}", if self.lo_open { ">" } else { ">=" }, bound(self.lo)),
            _ => format!(
                "in {}{}, {}{}",
                if self.lo_open { "(" } else { "[" },
                bound(self.lo),
                bound(self.hi),
                if self.hi_open { ")" } else { "]" }
            ),
        }
    }
}

/// `name` must be a number of `range`.
pub(crate) fn float(name: &str, v: f64, range: Range) -> Result<()> {
    if range.contains(v) {
        return Ok(());
    }
    Err(bad_input!("{name} must be {}, got {v}", range.describe()))
}

/// `name` must be an integer of at least `min` (and at most `max`).
pub(crate) fn int(name: &str, v: i64, min: i64, max: i64) -> Result<()> {
    if (min..=max).contains(&v) {
        return Ok(());
    }
    let allowed = if max == i64::MAX { format!(">= {min}") } else { format!("in {min}..={max}") };
    Err(bad_input!("{name} must be {allowed}, got {v}"))
}

/// `name` (a bound, a floor) must not exceed `other`.
pub(crate) fn at_most(name: &str, v: f64, other: &str, limit: f64) -> Result<()> {
    if v <= limit {
        return Ok(());
    }
    Err(bad_input!("{name} ({v}) must not exceed {other} ({limit})"))
}

/// A clap value parser for an output path: `.` and `..` resolved (lexically, against the working folder),
/// so `out/.` or `runs/..` name a folder whose `.partial` sibling and final rename are well defined. Paths
/// without such parts are kept as typed, so messages show the user's own spelling.
pub(crate) fn out_path(s: &str) -> Result<std::path::PathBuf, String> {
    use std::path::{Component, Path, PathBuf};
    if s.is_empty() {
        return Err("an empty path".into());
    }
    // Re-collected without `.` parts: `runs/.` and `./runs` become `runs`.
    let p: PathBuf = Path::new(s).components().filter(|c| *c != Component::CurDir).collect();
    if !p.components().any(|c| c == Component::ParentDir) && p.file_name().is_some() {
        return Ok(p);
    }
    let p = if p.as_os_str().is_empty() { PathBuf::from(".") } else { p };
    let abs = std::path::absolute(&p).map_err(|e| format!("cannot resolve '{s}': {e}"))?;
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    if out.file_name().is_none() {
        return Err(format!("'{s}' is the file-system root, not a folder to create"));
    }
    Ok(out)
}

/// A clap value parser for a float flag in `range`.
pub(crate) fn float_flag(range: Range) -> impl Fn(&str) -> Result<f64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number"))?;
        if range.contains(v) { Ok(v) } else { Err(format!("must be {}, got {v}", range.describe())) }
    }
}

/// A clap value parser for an integer flag in `min..=max`.
pub(crate) fn int_flag(min: i64, max: i64) -> impl Fn(&str) -> Result<i64, String> + Clone + Send + Sync + 'static {
    move |s: &str| {
        let v: i64 = s.trim().parse().map_err(|_| format!("'{s}' is not an integer"))?;
        int("", v, min, max).map(|_| v).map_err(|e| e.to_string().trim_start().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_paths_lose_dot_parts_so_their_partial_sibling_is_well_defined() {
        use std::path::PathBuf;
        assert_eq!(out_path("runs/a").unwrap(), PathBuf::from("runs/a"));
        assert_eq!(out_path("runs/a/.").unwrap(), PathBuf::from("runs/a"));
        assert_eq!(out_path("./runs/a").unwrap(), PathBuf::from("runs/a"));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(out_path("runs/..").unwrap(), cwd);
        assert_eq!(out_path(".").unwrap(), cwd);
        assert_eq!(out_path("runs/x/../y").unwrap(), cwd.join("runs/y"));
        assert!(out_path("/").unwrap_err().contains("root"));
        assert!(out_path("").is_err());
    }

    #[test]
    fn ranges_reject_out_of_range_and_non_finite_values_naming_them() {
        assert!(float("warmup", 0.5, UNIT).is_ok());
        let e = float("warmup", 5.0, UNIT).unwrap_err().to_string();
        assert_eq!(e, "warmup must be in [0, 1], got 5");
        assert!(float("lr", f64::NAN, POSITIVE).unwrap_err().to_string().contains("got NaN"));
        assert!(float("lr", f64::INFINITY, POSITIVE).is_err());
        assert!(float("lr", 0.0, POSITIVE).unwrap_err().to_string().contains("> 0"));
        assert!(float_flag(UNIT_OPEN_HIGH)("1").unwrap_err().contains("[0, 1)"));
        assert_eq!(float_flag(FINITE)("-3.5"), Ok(-3.5));
        assert!(float_flag(FINITE)("NaN").is_err());
        assert_eq!(int_flag(1, 10)("3"), Ok(3));
        assert_eq!(int_flag(1, i64::MAX)("0").unwrap_err(), "must be >= 1, got 0");
        assert!(crate::Error::is_input(&int("heads", 0, 1, i64::MAX).unwrap_err()));
    }
}
