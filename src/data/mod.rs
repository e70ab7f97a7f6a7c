//! Tokenizer, labelled-data readers, balancing, splitting and batching.
//!
//! The usual path from files to batches:
//! [`read_labelled`] reads a TSV, CSV or JSON Lines file (or a directory of them) into a
//! [`Dataset`], [`balance`] evens out the labels, [`split`] cuts train/validation/test parts,
//! [`encode_examples`] tokenizes them with a [`Gpt2Tokenizer`], and [`BatchIter`] yields
//! fixed-shape (B, T) [`Batch`]es.

mod batch;
mod dataset;
mod error;
mod formats;
mod split;
pub mod tokenizer;

pub use batch::{
    encode_examples, make_batch, Batch, BatchIter, EncodedExample, EncodedExamples, FILLER_LABEL,
};
pub use dataset::{
    list_data_files, read_labelled, ColumnSpec, DataFormat, Dataset, Example, ReadOptions,
};
pub use error::DataError;
pub use split::{balance, split, validate_fractions, Balance, Splits, FRACTION_SUM_TOLERANCE};
pub use tokenizer::{Gpt2Tokenizer, EOS_TOKEN, GPT2_EOS_ID};
