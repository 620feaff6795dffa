//! Training machinery shared by the TPP stage and fine-tuning: optimiser, schedule, checkpoints.
pub mod optim;
pub mod schedule;
