//! The static training graph: IR, reverse-mode autodiff, planner and executor.
//!
//! A model is built once per (model, head, batch shape, trainable set) as a list of forward ops
//! over tensors with static shapes ([`ir`]). [`autodiff`] walks it backwards from the loss and
//! emits a backward kernel only where a trainable parameter lies upstream. [`plan`] orders all
//! kernels, computes tensor lifetimes and packs transient tensors into reusable buffers, so the
//! peak memory is known before anything runs. [`executor`] creates every pipeline and bind group
//! once and replays the step from one command encoder.

pub(crate) mod autodiff;
pub(crate) mod executor;
pub(crate) mod ir;
pub(crate) mod plan;

pub use executor::{Session, StepOutputs};
pub use plan::PlanSummary;

#[cfg(test)]
mod tests;
