//! shadertune: train and fine-tune GPT-2-family models with WGSL compute shaders through wgpu.
#![warn(missing_docs)]

pub mod gpu;
pub(crate) mod kernels;
pub mod reference;

#[cfg(test)]
pub(crate) mod testing;
pub mod bench;
pub mod data;
pub mod graph;
pub mod fsutil;
pub mod generate;
pub mod model;
pub mod train;
