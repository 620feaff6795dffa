//! Training machinery shared by the TPP stage and fine-tuning: optimiser, schedule, loops.
pub mod finetune;
pub mod optim;
pub mod pretrain;
pub mod schedule;
