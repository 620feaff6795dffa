//! Data formats and loading. Each format is one module; errors always name the offending file.
pub mod images;
pub mod npy;
