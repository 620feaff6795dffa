//! The failures a user acts on, as one type. Functions return `anyhow::Result` ([`Result`]) so that every
//! error carries its context ("file: problem: cause"); where the failure is one of these kinds, the
//! error holds a [`Error`], found with `err.downcast_ref::<tpp::Error>()` (context layers included).
use std::path::PathBuf;

/// `anyhow::Result`: every error of the crate, with context; [`Error`] where the kind matters.
pub type Result<T> = anyhow::Result<T>;

/// A failure kind a user (or a program driving tpp) can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file lacks a tensor the model needs.
    #[error("{}: missing {what} '{key}' (model expects shape {expected:?})", file.display())]
    MissingKey {
        /// The file read.
        file: PathBuf,
        /// What kind of entry: "key", "target parameter".
        what: &'static str,
        /// The missing name.
        key: String,
        /// The shape the model has for it.
        expected: Vec<i64>,
    },
    /// A stored tensor's shape differs from the model's.
    #[error("{}: {what} has shape {found:?} in the file but the model expects {expected:?}", file.display())]
    ShapeMismatch {
        /// The file read.
        file: PathBuf,
        /// The entry, e.g. "key 'blocks.0.attn.qkv.weight'".
        what: String,
        /// Its shape in the file.
        found: Vec<i64>,
        /// The model's shape.
        expected: Vec<i64>,
    },
    /// A file (or folder) is not in a format tpp reads.
    #[error("{}: {detail}", path.display())]
    UnknownFormat {
        /// The file or folder.
        path: PathBuf,
        /// What was expected and found.
        detail: String,
    },
    /// A finished run was made with another configuration than the one asked for now.
    #[error(
        "{}: this finished run used another configuration ({}); choose another --out or delete the folder to \
         recompute it",
        file.display(),
        changes.join(", ")
    )]
    StaleRun {
        /// The run's record.
        file: PathBuf,
        /// Every changed setting, `path: old -> new`.
        changes: Vec<String>,
    },
    /// An invalid PEFT method, combination or option.
    #[error("{0}")]
    InvalidSpec(String),
    /// Any other bad input: an option out of range, a data file that cannot be used as it is (its
    /// message names the file or option and the problem).
    #[error(transparent)]
    Input(anyhow::Error),
}

impl Error {
    /// The kind of `err`, when it is (or wraps) one of these.
    pub fn kind_of(err: &anyhow::Error) -> Option<&Error> {
        err.chain().find_map(|e| e.downcast_ref::<Error>())
    }

    /// Whether `err` is bad input (every kind of [`Error`]) rather than a failure while running (I/O, a
    /// diverging loss, the device).
    pub fn is_input(err: &anyhow::Error) -> bool {
        Error::kind_of(err).is_some()
    }
}

/// Marks any error of `r` as bad input ([`Error::Input`]), keeping its message.
pub(crate) fn input<T>(r: anyhow::Result<T>) -> anyhow::Result<T> {
    r.map_err(|e| if Error::is_input(&e) { e } else { Error::Input(e).into() })
}

/// A bad-input error with this message.
macro_rules! bad_input {
    ($($arg:tt)*) => {
        anyhow::Error::from($crate::Error::Input(anyhow::anyhow!($($arg)*)))
    };
}
pub(crate) use bad_input;

thread_local! {
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside [`guard`]: a panic there is a third-party decoder failing on bad input,
/// turned into an error; a panic hook should stay silent about it.
pub fn panic_is_guarded() -> bool {
    GUARDED.with(|g| g.get())
}

/// Runs a third-party decoder on input it may not expect: a panic inside (a decoder bug; the fuzz tests
/// found some in dicom-rs's RLE decoder and the nifti crate) becomes a bad-input error naming `file`, not
/// a crash.
pub(crate) fn guard<T>(file: &std::path::Path, what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    let was = GUARDED.with(|g| g.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    r.unwrap_or_else(|payload| {
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown");
        Err(bad_input!("{}: {what} failed on this file ({msg})", file.display()))
    })
}
