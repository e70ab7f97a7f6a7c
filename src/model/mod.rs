//! GPT-2 configuration, weights, Hugging Face file formats and the model graph.
pub mod config;
pub mod weights;
pub mod hub;
pub mod gpt2;
pub mod load;
pub mod lora;

#[cfg(test)]
mod parity_tests;
