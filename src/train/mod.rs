//! Training loop, metrics, checkpoints and reports.
pub mod metrics;
pub mod report;
pub mod classifier;
pub mod checkpoint;
pub mod classify;
pub mod pretrain;
pub mod eval;
pub mod schedule;
