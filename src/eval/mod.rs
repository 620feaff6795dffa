//! Evaluation: metrics, reports and images.
pub mod evaluate;
pub mod images;
pub mod metrics;
pub mod plots;
pub mod report;
