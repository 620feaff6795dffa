//! Training: the one loop ([`trainer`]) and the pieces it calls ([`callbacks`]), the optimiser
//! ([`optim`]), the schedule ([`schedule`]), and the steps of each stage ([`finetune`], [`pretrain`]).
pub mod callbacks;
pub mod finetune;
pub mod optim;
pub mod pretrain;
pub mod schedule;
pub mod trainer;
