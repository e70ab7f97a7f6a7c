//! GPT-2 parameters on the host, their Hugging Face safetensors form, and random initialisation.
//!
//! # Names and layouts
//!
//! Canonical names are the Hugging Face GPT-2 names without the `transformer.` prefix. Every
//! tensor is f32, row-major with the last index fastest.
//!
//! | name | shape | layout |
//! | --- | --- | --- |
//! | `wte.weight` | (V, C) | token embedding, one row per token id, and the tied LM head |
//! | `wpe.weight` | (n_positions, C) | position embedding, one row per position |
//! | `h.{i}.ln_1.weight`, `h.{i}.ln_1.bias` | (C) | layer norm before attention |
//! | `h.{i}.attn.c_attn.weight` | (C, 3C) | Conv1D (in, out): columns are q, k, v, each C wide |
//! | `h.{i}.attn.c_attn.bias` | (3C) | q, k, v biases |
//! | `h.{i}.attn.c_proj.weight` | (C, C) | Conv1D (in, out) |
//! | `h.{i}.attn.c_proj.bias` | (C) | |
//! | `h.{i}.ln_2.weight`, `h.{i}.ln_2.bias` | (C) | layer norm before the MLP |
//! | `h.{i}.mlp.c_fc.weight` | (C, 4C) | Conv1D (in, out), with `n_inner` in place of 4C when set |
//! | `h.{i}.mlp.c_fc.bias` | (4C) | |
//! | `h.{i}.mlp.c_proj.weight` | (4C, C) | Conv1D (in, out) |
//! | `h.{i}.mlp.c_proj.bias` | (C) | |
//! | `ln_f.weight`, `ln_f.bias` | (C) | final layer norm |
//! | `score.weight` | (K, C) | classifier only: `nn.Linear`, stored (out, in), no bias |
//!
//! A Conv1D computes `y = x W + b` with W stored (in, out). An `nn.Linear` computes
//! `y = x W^T` with W stored (out, in). The loader stores both as found in the file and
//! transposes neither. The language-model head is `wte` itself (`logits = h wte^T`), so it has no
//! tensor of its own.
//!
//! Files written by `transformers` put `transformer.` in front of every body tensor and leave
//! `score.weight` bare. The original GPT-2 release has no prefix and also stores the attention
//! mask buffers `h.{i}.attn.bias` and `h.{i}.attn.masked_bias`. [`canonical_name`] and
//! [`stored_name`] are the only places that handle the prefix.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::fsutil::write_atomic;
use crate::model::config::{ConfigError, Gpt2Config};

/// File name of the weights inside a Hugging Face model directory.
pub const WEIGHTS_FILE_NAME: &str = "model.safetensors";

/// Prefix that `GPT2LMHeadModel` and `GPT2ForSequenceClassification` put on body tensors.
pub const BODY_PREFIX: &str = "transformer.";

/// Name of the classification head, never prefixed.
pub const SCORE_WEIGHT: &str = "score.weight";

/// Name of the language-model head that some files store although it is tied to `wte.weight`.
pub const LM_HEAD_WEIGHT: &str = "lm_head.weight";

/// A dense f32 tensor in host memory, row-major with the last index fastest.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements, `data.len()` of them, the product of `shape`.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Returns a tensor of the given shape filled with `value`.
    pub fn filled(shape: Vec<usize>, value: f32) -> Self {
        let len = shape.iter().product();
        HostTensor {
            shape,
            data: vec![value; len],
        }
    }

    /// Returns the number of elements, `data.len()`.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// GPT-2 parameters by canonical name (see the module documentation for names and layouts).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Weights {
    /// Tensors by canonical name, without the `transformer.` prefix.
    pub tensors: BTreeMap<String, HostTensor>,
}

impl Weights {
    /// Returns the tensor with this canonical name.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    /// Returns the tensor with this canonical name for modification.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut HostTensor> {
        self.tensors.get_mut(name)
    }

    /// Inserts or replaces a tensor, returning the previous one.
    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) -> Option<HostTensor> {
        self.tensors.insert(name.into(), tensor)
    }

    /// Returns the total number of elements over all tensors.
    pub fn num_params(&self) -> usize {
        self.tensors.values().map(HostTensor::numel).sum()
    }
}

/// Output head of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadKind {
    /// Next-token logits through `wte` (tied), so no tensor of its own.
    LanguageModel,
    /// `score.weight` (K, C) applied to the hidden state of the last real token.
    Classifier {
        /// Number of classes (K).
        num_labels: usize,
    },
}

impl HeadKind {
    /// Returns `Classifier` when the config's `architectures` names a sequence classifier (see
    /// [`Gpt2Config::label_count`] for its class count), `LanguageModel` otherwise.
    pub fn from_config(config: &Gpt2Config) -> Self {
        match config.label_count() {
            Some(num_labels) => HeadKind::Classifier { num_labels },
            None => HeadKind::LanguageModel,
        }
    }
}

/// Options of [`load`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Accept a classifier request on a file without `score.weight`, such as a pretrained
    /// GPT-2. The returned weights then lack `score.weight`, and the caller initialises it, for
    /// example with [`init_score`].
    pub allow_missing_head: bool,
}

/// Errors from loading, saving or locating GPT-2 weights.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// Reading or writing a file failed.
    #[error("could not read or write `{path}`: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The safetensors crate rejected the file.
    #[error("`{path}` ({file_bytes} bytes) is not a valid safetensors file: {error}. The file may be damaged or in another format; download or export it again")]
    InvalidSafetensors {
        /// File involved.
        path: PathBuf,
        /// Size of the file.
        file_bytes: usize,
        /// Error from the safetensors crate. The message includes it, so it is not also
        /// reported as the error's source, which would print it twice in an error chain.
        error: SafeTensorError,
    },
    /// The file is shorter than the sizes in its own header add up to.
    #[error("`{path}` has {found} bytes, but its header describes {expected} bytes ({layout}), so the file is truncated or not a safetensors file. Download or export it again")]
    Truncated {
        /// File involved.
        path: PathBuf,
        /// Size of the file.
        found: usize,
        /// Size that the header describes, saturated at `u64::MAX`.
        expected: u64,
        /// The parts that make up `expected`.
        layout: String,
    },
    /// The configuration is invalid or disagrees with the requested head.
    #[error("invalid model configuration: {0}")]
    Config(#[from] ConfigError),
    /// An expected tensor is absent.
    #[error("tensor `{name}` with shape {} is missing from `{path}` ({missing_count} tensors missing in all). {hint}", fmt_shape(.expected))]
    MissingTensor {
        /// File involved.
        path: PathBuf,
        /// Canonical name of the first missing tensor.
        name: String,
        /// Shape the model expects.
        expected: Vec<usize>,
        /// Number of missing tensors, this one included.
        missing_count: usize,
        /// Next step for the user.
        hint: &'static str,
    },
    /// The file contains a tensor that is neither a parameter of this model nor a known buffer.
    #[error("tensor `{name}` ({dtype}, shape {}) in `{path}` is not a parameter of {model}. Check that config.json and the head match the checkpoint", fmt_shape(.shape))]
    UnknownTensor {
        /// File involved.
        path: PathBuf,
        /// Name as stored in the file.
        name: String,
        /// Shape in the file.
        shape: Vec<usize>,
        /// Data type in the file.
        dtype: String,
        /// The model that was expected, such as "a GPT-2 with 12 layers and a language-model head".
        model: String,
    },
    /// Two stored names map to the same canonical name, for example with and without prefix.
    #[error("`{path}` stores `{name}` twice, as `{first}` and as `{second}`; keep one of them")]
    DuplicateTensor {
        /// File involved.
        path: PathBuf,
        /// Canonical name.
        name: String,
        /// First stored name.
        first: String,
        /// Second stored name.
        second: String,
    },
    /// A tensor has a data type other than F32, F16 or BF16.
    #[error("tensor `{name}` in `{path}` has dtype {dtype}, expected F32, F16 or BF16. Convert the checkpoint to a float type")]
    WrongDtype {
        /// File involved.
        path: PathBuf,
        /// Name as stored in the file.
        name: String,
        /// Data type in the file.
        dtype: String,
    },
    /// A tensor has a shape other than the one the config implies.
    #[error("tensor `{name}` of `{path}` has shape {}, expected {} because {layout}. Check that the file is a GPT-2 checkpoint that matches config.json", fmt_shape(.shape), fmt_shape(.expected))]
    WrongShape {
        /// File involved.
        path: PathBuf,
        /// Name as stored in the file, or the canonical name when saving.
        name: String,
        /// Shape found.
        shape: Vec<usize>,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// The layout rule behind the expected shape.
        layout: &'static str,
    },
    /// `lm_head.weight` is present and differs from `wte.weight`, so the head is not tied.
    #[error("`lm_head.weight` in `{path}` differs from `wte.weight` (max absolute difference {max_difference}); this engine ties the language-model head to wte, so an untied head cannot be loaded")]
    UntiedHead {
        /// File involved.
        path: PathBuf,
        /// Largest absolute difference between the two tables.
        max_difference: f32,
    },
    /// The element or byte count of a tensor overflows `usize`.
    #[error("the size of tensor `{name}` with shape {} overflows usize", fmt_shape(.shape))]
    SizeOverflow {
        /// Tensor name.
        name: String,
        /// Shape whose size overflows.
        shape: Vec<usize>,
    },
    /// A host tensor has a data length that disagrees with its shape.
    #[error("tensor `{name}` has shape {} ({expected_len} elements) but holds {len} elements", fmt_shape(.shape))]
    TensorLength {
        /// Canonical name.
        name: String,
        /// Declared shape.
        shape: Vec<usize>,
        /// Product of the shape.
        expected_len: usize,
        /// Actual `data.len()`.
        len: usize,
    },
    /// A model directory lacks a required file.
    #[error("model directory `{dir}` lacks {}; a model directory needs config.json and model.safetensors", .missing.join(" and "))]
    IncompleteModelDir {
        /// Directory involved.
        dir: PathBuf,
        /// Names of the missing files.
        missing: Vec<&'static str>,
    },
    /// The model specification is neither a directory nor a known model name.
    #[error("model `{spec}` is neither an existing directory nor a known model name ({known}). Pass a directory that contains config.json and model.safetensors")]
    ModelNotFound {
        /// Specification given.
        spec: String,
        /// Known names, comma-separated.
        known: String,
    },
    /// A known model is absent from the local Hugging Face cache.
    #[error("model `{repo_id}` was not found in the local Hugging Face cache. Searched:\n{}\nDownload it with `huggingface-cli download {repo_id} config.json model.safetensors tokenizer.json` (or `hf download {repo_id} config.json model.safetensors tokenizer.json`), or pass a directory that contains config.json and model.safetensors", .searched.join("\n"))]
    NotInCache {
        /// Hugging Face repository id, such as `openai-community/gpt2`.
        repo_id: String,
        /// Each place searched, with the reason it did not qualify.
        searched: Vec<String>,
    },
}

/// Formats a shape as `(3072, 768)`.
pub fn fmt_shape(shape: &[usize]) -> String {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    format!("({})", dims.join(", "))
}

/// Returns the canonical name of a stored tensor name: the name without the `transformer.`
/// prefix.
pub fn canonical_name(stored: &str) -> &str {
    stored.strip_prefix(BODY_PREFIX).unwrap_or(stored)
}

/// Returns the name under which [`save`] stores a canonical name: with the `transformer.` prefix
/// on body tensors when `prefix`, and `score.weight` always bare, as `transformers` writes.
pub fn stored_name(canonical: &str, prefix: bool) -> String {
    if prefix && canonical != SCORE_WEIGHT {
        format!("{BODY_PREFIX}{canonical}")
    } else {
        canonical.to_string()
    }
}

/// Returns whether a canonical name is a causal-mask buffer (`h.{i}.attn.bias` or
/// `h.{i}.attn.masked_bias`) that older checkpoints store beside the weights.
fn is_attention_buffer(name: &str) -> bool {
    let Some((index, tail)) = name
        .strip_prefix("h.")
        .and_then(|rest| rest.split_once('.'))
    else {
        return false;
    };
    let is_layer_index = !index.is_empty() && index.bytes().all(|byte| byte.is_ascii_digit());
    is_layer_index && (tail == "attn.bias" || tail == "attn.masked_bias")
}

/// Returns the layout rule behind the shape of a canonical name, for error messages.
fn layout_rule(name: &str) -> &'static str {
    let conv1d = [
        ".attn.c_attn.weight",
        ".attn.c_proj.weight",
        ".mlp.c_fc.weight",
        ".mlp.c_proj.weight",
    ];
    if conv1d.iter().any(|suffix| name.ends_with(suffix)) {
        "GPT-2 stores Conv1D weights as (in, out)"
    } else if name == SCORE_WEIGHT {
        "score is an nn.Linear stored as (num_labels, n_embd)"
    } else if name == "wte.weight" || name == LM_HEAD_WEIGHT {
        "the token embedding (and the tied LM head) is (vocab_size, n_embd)"
    } else if name == "wpe.weight" {
        "the position embedding is (n_positions, n_embd)"
    } else if name.contains("ln_") {
        "layer-norm weights and biases have n_embd entries"
    } else {
        "a bias has one entry per output channel of its Conv1D weight"
    }
}

/// Checks that the config is valid and agrees with the requested head.
fn check_head(config: &Gpt2Config, head: HeadKind) -> Result<(), ConfigError> {
    config.validate()?;
    if let HeadKind::Classifier { num_labels } = head {
        if num_labels == 0 {
            return Err(ConfigError::InvalidLabels {
                reason: "the classifier head has 0 classes; it needs at least 1".to_string(),
            });
        }
        if let Some(count) = config.label_count() {
            if count != num_labels {
                return Err(ConfigError::InvalidLabels {
                    reason: format!(
                        "config.json has {count} labels but the classifier head has {num_labels}"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Returns the 12 parameters of one transformer block as (name suffix, shape), in model order.
fn block_shapes(config: &Gpt2Config) -> [(&'static str, Vec<usize>); 12] {
    let c = config.n_embd;
    let inner = config.inner_dim();
    [
        ("ln_1.weight", vec![c]),
        ("ln_1.bias", vec![c]),
        ("attn.c_attn.weight", vec![c, 3 * c]),
        ("attn.c_attn.bias", vec![3 * c]),
        ("attn.c_proj.weight", vec![c, c]),
        ("attn.c_proj.bias", vec![c]),
        ("ln_2.weight", vec![c]),
        ("ln_2.bias", vec![c]),
        ("mlp.c_fc.weight", vec![c, inner]),
        ("mlp.c_fc.bias", vec![inner]),
        ("mlp.c_proj.weight", vec![inner, c]),
        ("mlp.c_proj.bias", vec![c]),
    ]
}

/// Yields every parameter of the model with its shape, in model order, without building the
/// whole list, so a config that claims a huge `n_layer` costs nothing until it is iterated.
fn parameter_shapes(
    config: &Gpt2Config,
    head: HeadKind,
) -> impl Iterator<Item = (String, Vec<usize>)> + '_ {
    let c = config.n_embd;
    let embeddings = [
        ("wte.weight".to_string(), vec![config.vocab_size, c]),
        ("wpe.weight".to_string(), vec![config.n_positions, c]),
    ];
    let blocks = (0..config.n_layer).flat_map(move |i| {
        block_shapes(config)
            .into_iter()
            .map(move |(suffix, shape)| (format!("h.{i}.{suffix}"), shape))
    });
    let final_norm = [
        ("ln_f.weight".to_string(), vec![c]),
        ("ln_f.bias".to_string(), vec![c]),
    ];
    let score = match head {
        HeadKind::Classifier { num_labels } => Some((SCORE_WEIGHT.to_string(), vec![num_labels, c])),
        HeadKind::LanguageModel => None,
    };
    embeddings.into_iter().chain(blocks).chain(final_norm).chain(score)
}

/// Returns the number of parameter tensors of the model, saturated at `usize::MAX`.
fn parameter_count(config: &Gpt2Config, head: HeadKind) -> usize {
    let per_block = block_shapes(config).len();
    let score = usize::from(matches!(head, HeadKind::Classifier { .. }));
    // wte, wpe, ln_f.weight and ln_f.bias.
    let outside_blocks = 4;
    config
        .n_layer
        .saturating_mul(per_block)
        .saturating_add(outside_blocks + score)
}

/// Returns the shape the model expects for a canonical name, or `None` when the name is not a
/// parameter of the model. Layer indices must be written as `{i}` prints them, so `h.01.ln_1.weight`
/// is not a parameter.
fn expected_shape(config: &Gpt2Config, head: HeadKind, name: &str) -> Option<Vec<usize>> {
    let c = config.n_embd;
    match (name, head) {
        ("wte.weight", _) => return Some(vec![config.vocab_size, c]),
        ("wpe.weight", _) => return Some(vec![config.n_positions, c]),
        ("ln_f.weight" | "ln_f.bias", _) => return Some(vec![c]),
        (SCORE_WEIGHT, HeadKind::Classifier { num_labels }) => return Some(vec![num_labels, c]),
        _ => {}
    }
    let (index, suffix) = name.strip_prefix("h.")?.split_once('.')?;
    let layer: usize = index.parse().ok()?;
    if layer >= config.n_layer || layer.to_string() != index {
        return None;
    }
    block_shapes(config)
        .into_iter()
        .find(|(block_suffix, _)| *block_suffix == suffix)
        .map(|(_, shape)| shape)
}

/// Lists every parameter of the model with its shape, in model order: embeddings, blocks,
/// final layer norm, then `score.weight` for a classifier. The language-model head is tied to
/// `wte.weight` and has no entry.
pub fn expected_shapes(config: &Gpt2Config, head: HeadKind) -> Vec<(String, Vec<usize>)> {
    parameter_shapes(config, head).collect()
}

/// Describes the model for error messages, such as "a GPT-2 with 12 layers and a
/// language-model head".
fn describe_model(config: &Gpt2Config, head: HeadKind) -> String {
    let head = match head {
        HeadKind::LanguageModel => "a language-model head".to_string(),
        HeadKind::Classifier { num_labels } => format!("a {num_labels}-class classifier head"),
    };
    format!("a GPT-2 with {} layers and {head}", config.n_layer)
}

/// Returns the number of elements of a shape, or `SizeOverflow`.
fn checked_numel(name: &str, shape: &[usize]) -> Result<usize, LoadError> {
    shape
        .iter()
        .try_fold(1usize, |count, &dim| count.checked_mul(dim))
        .ok_or_else(|| LoadError::SizeOverflow {
            name: name.to_string(),
            shape: shape.to_vec(),
        })
}

/// Converts a stored F32, F16 or BF16 tensor to f32 after checking its dtype and shape.
pub(crate) fn read_tensor(
    path: &Path,
    stored: &str,
    view: &safetensors::tensor::TensorView<'_>,
    expected: &[usize],
) -> Result<HostTensor, LoadError> {
    let element_bytes = match view.dtype() {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        other => {
            return Err(LoadError::WrongDtype {
                path: path.to_path_buf(),
                name: stored.to_string(),
                dtype: other.to_string(),
            })
        }
    };
    if view.shape() != expected {
        return Err(LoadError::WrongShape {
            path: path.to_path_buf(),
            name: stored.to_string(),
            shape: view.shape().to_vec(),
            expected: expected.to_vec(),
            layout: layout_rule(canonical_name(stored)),
        });
    }
    let numel = checked_numel(stored, view.shape())?;
    let byte_len = numel
        .checked_mul(element_bytes)
        .ok_or_else(|| LoadError::SizeOverflow {
            name: stored.to_string(),
            shape: view.shape().to_vec(),
        })?;
    let bytes = view.data();
    if bytes.len() != byte_len {
        // The safetensors crate checks this already, so a mismatch means a broken file.
        return Err(LoadError::TensorLength {
            name: stored.to_string(),
            shape: view.shape().to_vec(),
            expected_len: numel,
            len: bytes.len() / element_bytes,
        });
    }
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
    };
    Ok(HostTensor {
        shape: view.shape().to_vec(),
        data,
    })
}

/// Size in bytes of the little-endian u64 that starts a safetensors file and gives the length of
/// the JSON header after it (safetensors format specification).
const HEADER_LENGTH_BYTES: usize = 8;

/// Key of the optional string-to-string map in a safetensors header, which is not a tensor.
const METADATA_KEY: &str = "__metadata__";

/// Turns an error of the safetensors crate into a [`LoadError`]. A file shorter than its header
/// describes becomes [`LoadError::Truncated`] with both sizes, anything else
/// [`LoadError::InvalidSafetensors`].
pub(crate) fn rejected_file(path: &Path, bytes: &[u8], error: SafeTensorError) -> LoadError {
    match described_length(bytes) {
        Some((expected, layout)) if expected > bytes.len() as u64 => LoadError::Truncated {
            path: path.to_path_buf(),
            found: bytes.len(),
            expected,
            layout,
        },
        _ => LoadError::InvalidSafetensors {
            path: path.to_path_buf(),
            file_bytes: bytes.len(),
            error,
        },
    }
}

/// Returns the file size that the header of a safetensors file describes, with the parts that
/// make it up, or `None` when the header cannot be read that far.
///
/// Only called after the safetensors crate rejected the file, to word the error. The header is
/// parsed only when the file contains all of it, so no allocation exceeds the file size.
fn described_length(bytes: &[u8]) -> Option<(u64, String)> {
    let length_field: [u8; HEADER_LENGTH_BYTES] = bytes.get(..HEADER_LENGTH_BYTES)?.try_into().ok()?;
    let header_bytes = u64::from_le_bytes(length_field);
    let header_end = (HEADER_LENGTH_BYTES as u64).saturating_add(header_bytes);
    if header_end > bytes.len() as u64 {
        let layout = format!("an {HEADER_LENGTH_BYTES}-byte length and a {header_bytes}-byte JSON header");
        return Some((header_end, layout));
    }

    // `header_end` fits in usize because it is at most `bytes.len()`.
    let header: serde_json::Value = serde_json::from_slice(&bytes[HEADER_LENGTH_BYTES..header_end as usize]).ok()?;
    let data_bytes = header
        .as_object()?
        .iter()
        .filter(|(name, _)| name.as_str() != METADATA_KEY)
        .filter_map(|(_, entry)| entry.get("data_offsets")?.get(1)?.as_u64())
        .max()?;
    let layout = format!(
        "an {HEADER_LENGTH_BYTES}-byte length, a {header_bytes}-byte JSON header and {data_bytes} bytes of tensor data"
    );
    Some((header_end.saturating_add(data_bytes), layout))
}

/// Loads GPT-2 weights from a Hugging Face `model.safetensors`.
///
/// Tensor names may carry the `transformer.` prefix or not. The attention buffers
/// `h.{i}.attn.bias` and `h.{i}.attn.masked_bias` are skipped. `lm_head.weight` is optional and,
/// when present, must equal `wte.weight` because the head is tied. F32, F16 and BF16 tensors
/// are converted to f32. Shapes are checked against [`expected_shapes`] and kept as stored.
///
/// # Errors
///
/// A missing, unknown, duplicated, wrong-dtype or wrong-shape tensor, an unreadable or
/// truncated file, or a config that fails validation or disagrees with `head`.
pub fn load(
    path: &Path,
    config: &Gpt2Config,
    head: HeadKind,
    options: LoadOptions,
) -> Result<Weights, LoadError> {
    check_head(config, head)?;
    let bytes = std::fs::read(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|error| rejected_file(path, &bytes, error))?;
    let mut entries = file.tensors();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut stored_names: BTreeMap<String, String> = BTreeMap::new();
    let mut weights = Weights::default();
    let mut lm_head = None;
    for (stored, view) in entries {
        let name = canonical_name(&stored).to_string();
        if is_attention_buffer(&name) {
            continue;
        }
        if let Some(first) = stored_names.insert(name.clone(), stored.clone()) {
            return Err(LoadError::DuplicateTensor {
                path: path.to_path_buf(),
                name,
                first,
                second: stored,
            });
        }
        if name == LM_HEAD_WEIGHT {
            let wte_shape = [config.vocab_size, config.n_embd];
            lm_head = Some(read_tensor(path, &stored, &view, &wte_shape)?);
            continue;
        }
        let Some(shape) = expected_shape(config, head, &name) else {
            return Err(LoadError::UnknownTensor {
                path: path.to_path_buf(),
                name: stored,
                shape: view.shape().to_vec(),
                dtype: view.dtype().to_string(),
                model: describe_model(config, head),
            });
        };
        let tensor = read_tensor(path, &stored, &view, &shape)?;
        weights.insert(name, tensor);
    }

    // Every tensor in `weights` is a parameter, so counting is enough to find out whether any
    // is missing. The search for the first missing one ends after at most `weights.len() + 2`
    // names, so a config that claims many layers cannot make it walk or allocate for all of
    // them.
    let skip_head = options.allow_missing_head && !weights.tensors.contains_key(SCORE_WEIGHT);
    let may_skip = |name: &str| skip_head && name == SCORE_WEIGHT;
    let missing_count = parameter_count(config, head)
        .saturating_sub(weights.tensors.len())
        .saturating_sub(usize::from(skip_head && matches!(head, HeadKind::Classifier { .. })));
    let first_missing = if missing_count == 0 {
        None
    } else {
        parameter_shapes(config, head)
            .find(|(name, _)| !weights.tensors.contains_key(name) && !may_skip(name))
    };
    if let Some(first) = first_missing {
        let (name, shape) = first;
        let hint = if name == SCORE_WEIGHT {
            "The file has no classification head (a pretrained language model); set allow_missing_head to initialise one"
        } else {
            "Check that config.json (n_layer, vocab_size) matches the checkpoint"
        };
        return Err(LoadError::MissingTensor {
            path: path.to_path_buf(),
            name,
            expected: shape,
            missing_count,
            hint,
        });
    }

    if let (Some(lm_head), Some(wte)) = (lm_head, weights.get("wte.weight")) {
        let max_difference = lm_head
            .data
            .iter()
            .zip(&wte.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        // Exact comparison: a tied head is the same tensor written twice.
        if max_difference != 0.0 {
            return Err(LoadError::UntiedHead {
                path: path.to_path_buf(),
                max_difference,
            });
        }
    }
    log::debug!(
        "loaded {} tensors ({} parameters) from {}",
        weights.tensors.len(),
        weights.num_params(),
        path.display()
    );
    Ok(weights)
}

/// Writes weights as a Hugging Face `model.safetensors`: F32, `__metadata__`
/// `{"format": "pt"}`, body tensors with the `transformer.` prefix when `prefix` (as
/// `transformers` writes them), `score.weight` without prefix, no `lm_head.weight` (tied). The
/// head follows the config, as [`HeadKind::from_config`] reads it. The file is written atomically.
///
/// # Errors
///
/// A tensor that is missing, unknown, mis-shaped or whose data length disagrees with its
/// shape, an invalid config, or a failed write.
pub fn save(
    path: &Path,
    weights: &Weights,
    config: &Gpt2Config,
    prefix: bool,
) -> Result<(), LoadError> {
    save_as(path, weights, config, prefix, SaveDtype::F32)
}

/// Storage type of a saved checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SaveDtype {
    /// 4 bytes per weight, exact.
    #[default]
    F32,
    /// 2 bytes per weight, rounded to nearest; half the file for a relative error under 2^-11.
    F16,
}

impl std::str::FromStr for SaveDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(SaveDtype::F32),
            "f16" => Ok(SaveDtype::F16),
            other => Err(format!("invalid dtype `{other}`, expected f32 or f16")),
        }
    }
}

/// [`save`] with the storage type of the tensors.
///
/// # Errors
///
/// As [`save`].
pub fn save_as(
    path: &Path,
    weights: &Weights,
    config: &Gpt2Config,
    prefix: bool,
    dtype: SaveDtype,
) -> Result<(), LoadError> {
    let head = HeadKind::from_config(config);
    check_head(config, head)?;
    let expected = expected_shapes(config, head);
    for (name, tensor) in &weights.tensors {
        let numel = checked_numel(name, &tensor.shape)?;
        if numel != tensor.data.len() {
            return Err(LoadError::TensorLength {
                name: name.clone(),
                shape: tensor.shape.clone(),
                expected_len: numel,
                len: tensor.data.len(),
            });
        }
        if !expected
            .iter()
            .any(|(expected_name, _)| expected_name == name)
        {
            return Err(LoadError::UnknownTensor {
                path: path.to_path_buf(),
                name: name.clone(),
                shape: tensor.shape.clone(),
                dtype: "F32".to_string(),
                model: describe_model(config, head),
            });
        }
    }
    let missing_count = expected
        .iter()
        .filter(|(name, _)| !weights.tensors.contains_key(name))
        .count();
    let mut encoded: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        let Some(tensor) = weights.get(&name) else {
            return Err(LoadError::MissingTensor {
                path: path.to_path_buf(),
                name,
                expected: shape,
                missing_count,
                hint: "Every parameter of the model must be present to save it",
            });
        };
        if tensor.shape != shape {
            return Err(LoadError::WrongShape {
                path: path.to_path_buf(),
                layout: layout_rule(&name),
                name,
                shape: tensor.shape.clone(),
                expected: shape,
            });
        }
        let bytes: Vec<u8> = match dtype {
            SaveDtype::F32 => tensor.data.iter().flat_map(|value| value.to_le_bytes()).collect(),
            SaveDtype::F16 => tensor.data.iter().flat_map(|&value| half::f16::from_f32(value).to_le_bytes()).collect(),
        };
        encoded.push((stored_name(&name, prefix), shape, bytes));
    }
    let stored = match dtype {
        SaveDtype::F32 => Dtype::F32,
        SaveDtype::F16 => Dtype::F16,
    };
    let views = encoded.iter().map(|(name, shape, bytes)| {
        let view = safetensors::tensor::TensorView::new(stored, shape.clone(), bytes)
            .expect("the byte length is the element size times numel, checked against the shape above");
        (name.clone(), view)
    });
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let file = safetensors::serialize(views, Some(metadata)).map_err(|error| LoadError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::other(error),
    })?;
    write_atomic(path, &file).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Draws from a normal distribution with the Box-Muller transform, which turns two uniform
/// samples into two independent standard normal samples.
pub(crate) struct NormalSampler {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl NormalSampler {
    pub(crate) fn new(seed: u64) -> Self {
        NormalSampler {
            rng: ChaCha8Rng::seed_from_u64(seed),
            spare: None,
        }
    }

    pub(crate) fn standard(&mut self) -> f64 {
        if let Some(value) = self.spare.take() {
            return value;
        }
        // 1 - U lies in (0, 1], so the logarithm is finite.
        let u1 = 1.0 - self.rng.random::<f64>();
        let u2 = self.rng.random::<f64>();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        self.spare = Some(radius * angle.sin());
        radius * angle.cos()
    }

    fn tensor(&mut self, shape: Vec<usize>, std: f64) -> HostTensor {
        let mut tensor = HostTensor::filled(shape, 0.0);
        for value in &mut tensor.data {
            *value = (self.standard() * std) as f32;
        }
        tensor
    }
}

/// Initialises a tensor by the GPT-2 rule for its canonical name.
fn init_tensor(
    sampler: &mut NormalSampler,
    config: &Gpt2Config,
    name: &str,
    shape: Vec<usize>,
) -> HostTensor {
    let std = config.initializer_range;
    if name.ends_with(".bias") {
        HostTensor::filled(shape, 0.0)
    } else if name.starts_with("ln_f.") || name.contains(".ln_") {
        HostTensor::filled(shape, 1.0)
    } else if name.ends_with(".c_proj.weight") {
        // GPT-2 scales the projections into the residual stream by 1/sqrt(2 L) because each
        // block adds two of them to the stream (Radford et al. 2019, section 2.3).
        sampler.tensor(shape, std / (2.0 * config.n_layer as f64).sqrt())
    } else {
        sampler.tensor(shape, std)
    }
}

/// Returns GPT-2-initialised weights: normal with std `initializer_range` (0.02 in GPT-2) for
/// weights and embeddings, std `initializer_range / sqrt(2 n_layer)` for the `c_proj` weights,
/// zero biases, and layer norms with weight 1 and bias 0. The same seed gives identical
/// weights. The body is drawn before the head, so a classifier and a language model from one
/// seed share it.
pub fn init_random(config: &Gpt2Config, head: HeadKind, seed: u64) -> Result<Weights, ConfigError> {
    check_head(config, head)?;
    let mut sampler = NormalSampler::new(seed);
    let mut weights = Weights::default();
    for (name, shape) in expected_shapes(config, head) {
        let tensor = init_tensor(&mut sampler, config, &name, shape);
        weights.insert(name, tensor);
    }
    Ok(weights)
}

/// Returns a freshly initialised `score.weight` (K, C), normal with std `initializer_range`,
/// for a classifier built on a pretrained body (see [`LoadOptions::allow_missing_head`]).
pub fn init_score(config: &Gpt2Config, num_labels: usize, seed: u64) -> HostTensor {
    NormalSampler::new(seed).tensor(vec![num_labels, config.n_embd], config.initializer_range)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One tensor of a hand-built safetensors file: dtype, shape and little-endian bytes.
    type Entry = (Dtype, Vec<usize>, Vec<u8>);

    fn tiny_config() -> Gpt2Config {
        let mut config = Gpt2Config::mini();
        config.n_layer = 2;
        config.n_head = 2;
        config.n_embd = 4;
        config.vocab_size = 10;
        config.n_positions = 8;
        config.bos_token_id = Some(9);
        config.eos_token_id = Some(9);
        config
    }

    fn classifier_config(num_labels: usize) -> Gpt2Config {
        let labels: Vec<String> = (0..num_labels).map(|i| format!("class{i}")).collect();
        let mut config = tiny_config();
        config.vocab_size = 50257;
        config.to_classifier(&labels).unwrap()
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// Returns the entries of a file holding `weights` under their stored names.
    fn entries(weights: &Weights, prefix: bool) -> BTreeMap<String, Entry> {
        weights
            .tensors
            .iter()
            .map(|(name, t)| {
                (
                    stored_name(name, prefix),
                    (Dtype::F32, t.shape.clone(), f32_bytes(&t.data)),
                )
            })
            .collect()
    }

    fn write_file(dir: &Path, entries: &BTreeMap<String, Entry>) -> PathBuf {
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
            .iter()
            .map(|(name, (dtype, shape, bytes))| {
                (
                    name.clone(),
                    safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        let path = dir.join("model.safetensors");
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn lm_weights(config: &Gpt2Config, seed: u64) -> Weights {
        init_random(config, HeadKind::LanguageModel, seed).unwrap()
    }

    fn load_lm(path: &Path, config: &Gpt2Config) -> Result<Weights, LoadError> {
        load(
            path,
            config,
            HeadKind::LanguageModel,
            LoadOptions::default(),
        )
    }

    #[test]
    fn expected_shapes_follow_layouts() {
        let config = tiny_config();
        let shapes: BTreeMap<String, Vec<usize>> =
            expected_shapes(&config, HeadKind::Classifier { num_labels: 3 })
                .into_iter()
                .collect();
        assert_eq!(shapes.len(), 2 + 12 * 2 + 2 + 1);
        assert_eq!(shapes["wte.weight"], vec![10, 4]);
        assert_eq!(shapes["wpe.weight"], vec![8, 4]);
        assert_eq!(shapes["h.1.attn.c_attn.weight"], vec![4, 12]);
        assert_eq!(shapes["h.1.attn.c_attn.bias"], vec![12]);
        assert_eq!(shapes["h.0.mlp.c_fc.weight"], vec![4, 16]);
        assert_eq!(shapes["h.0.mlp.c_proj.weight"], vec![16, 4]);
        assert_eq!(shapes["score.weight"], vec![3, 4]);
        let lm = expected_shapes(&config, HeadKind::LanguageModel);
        assert!(lm
            .iter()
            .all(|(name, _)| name != SCORE_WEIGHT && name != LM_HEAD_WEIGHT));
        let total: usize = lm.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        assert_eq!(total, config.num_params());
    }

    #[test]
    fn prefix_is_handled_both_ways() {
        assert_eq!(
            canonical_name("transformer.h.0.ln_1.weight"),
            "h.0.ln_1.weight"
        );
        assert_eq!(canonical_name("h.0.ln_1.weight"), "h.0.ln_1.weight");
        assert_eq!(stored_name("wte.weight", true), "transformer.wte.weight");
        assert_eq!(stored_name("wte.weight", false), "wte.weight");
        assert_eq!(stored_name(SCORE_WEIGHT, true), SCORE_WEIGHT);
        assert!(is_attention_buffer("h.11.attn.bias"));
        assert!(is_attention_buffer("h.0.attn.masked_bias"));
        assert!(!is_attention_buffer("h.0.attn.c_attn.bias"));
        assert!(!is_attention_buffer("h..attn.bias"));
        assert!(!is_attention_buffer("hx.0.attn.bias"));
    }

    #[test]
    fn load_reads_both_naming_styles() {
        let config = tiny_config();
        let weights = lm_weights(&config, 7);
        for prefix in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let path = write_file(dir.path(), &entries(&weights, prefix));
            let loaded = load_lm(&path, &config).unwrap();
            assert_eq!(loaded, weights, "prefix = {prefix}");
        }
    }

    #[test]
    fn load_skips_attention_buffers() {
        let config = tiny_config();
        let weights = lm_weights(&config, 7);
        let mut file = entries(&weights, false);
        // The original GPT-2 release stores the causal mask as (1, 1, n_positions, n_positions).
        file.insert(
            "h.0.attn.bias".into(),
            (Dtype::F32, vec![1, 1, 8, 8], f32_bytes(&[1.0; 64])),
        );
        file.insert(
            "h.1.attn.masked_bias".into(),
            (Dtype::F32, vec![], f32_bytes(&[-1e4])),
        );
        file.insert(
            "transformer.h.1.attn.bias".into(),
            (Dtype::U8, vec![2], vec![1, 0]),
        );
        let dir = tempfile::tempdir().unwrap();
        let loaded = load_lm(&write_file(dir.path(), &file), &config).unwrap();
        assert_eq!(loaded, weights);
    }

    #[test]
    fn tied_lm_head_is_accepted() {
        let config = tiny_config();
        let weights = lm_weights(&config, 7);
        let mut file = entries(&weights, true);
        let wte = file["transformer.wte.weight"].clone();
        file.insert(LM_HEAD_WEIGHT.into(), wte);
        let dir = tempfile::tempdir().unwrap();
        let loaded = load_lm(&write_file(dir.path(), &file), &config).unwrap();
        assert_eq!(loaded, weights);
        assert!(loaded.get(LM_HEAD_WEIGHT).is_none());
    }

    #[test]
    fn untied_lm_head_is_rejected() {
        let config = tiny_config();
        let weights = lm_weights(&config, 7);
        let mut file = entries(&weights, true);
        let mut head = weights.get("wte.weight").unwrap().data.clone();
        head[5] += 0.5;
        file.insert(
            LM_HEAD_WEIGHT.into(),
            (Dtype::F32, vec![10, 4], f32_bytes(&head)),
        );
        let dir = tempfile::tempdir().unwrap();
        let err = load_lm(&write_file(dir.path(), &file), &config).unwrap_err();
        assert!(
            matches!(err, LoadError::UntiedHead { max_difference, .. } if max_difference == 0.5),
            "{err:?}"
        );
    }

    #[test]
    fn lm_head_shape_must_match_wte() {
        let config = tiny_config();
        let mut file = entries(&lm_weights(&config, 7), true);
        file.insert(
            LM_HEAD_WEIGHT.into(),
            (Dtype::F32, vec![4, 10], f32_bytes(&[0.0; 40])),
        );
        let dir = tempfile::tempdir().unwrap();
        let err = load_lm(&write_file(dir.path(), &file), &config).unwrap_err();
        assert!(
            matches!(err, LoadError::WrongShape { ref name, .. } if name == LM_HEAD_WEIGHT),
            "{err:?}"
        );
        assert!(err.to_string().contains("(10, 4)"), "{err}");
    }

    #[test]
    fn half_precision_is_converted() {
        let config = tiny_config();
        let weights = lm_weights(&config, 3);
        for dtype in [Dtype::F16, Dtype::BF16] {
            let mut file = entries(&weights, true);
            for (name, (stored_dtype, _, bytes)) in file.iter_mut() {
                let values = &weights.get(canonical_name(name)).unwrap().data;
                *stored_dtype = dtype;
                *bytes = values
                    .iter()
                    .flat_map(|&v| match dtype {
                        Dtype::F16 => half::f16::from_f32(v).to_le_bytes(),
                        _ => half::bf16::from_f32(v).to_le_bytes(),
                    })
                    .collect();
            }
            let dir = tempfile::tempdir().unwrap();
            let loaded = load_lm(&write_file(dir.path(), &file), &config).unwrap();
            // f16 keeps 11 significant bits and bf16 8, so the relative error is below 2^-11 and 2^-8.
            let rtol = if dtype == Dtype::F16 {
                1.0 / 2048.0
            } else {
                1.0 / 256.0
            };
            for (name, tensor) in &weights.tensors {
                let got = &loaded.get(name).unwrap().data;
                for (i, (&want, &have)) in tensor.data.iter().zip(got).enumerate() {
                    // Values below the f16 normal range (6.1e-5) lose relative precision.
                    let tolerance = 1e-7 + rtol * want.abs();
                    assert!(
                        (want - have).abs() <= tolerance,
                        "{dtype} {name}[{i}]: stored {want}, loaded {have}"
                    );
                }
            }
        }
    }

    #[test]
    fn io_error_names_path() {
        let err = load_lm(Path::new("/nonexistent/model.safetensors"), &tiny_config()).unwrap_err();
        assert!(matches!(err, LoadError::Io { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent/model.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn truncated_file_names_path() {
        let config = tiny_config();
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), &entries(&lm_weights(&config, 1), true));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let err = load_lm(&path, &config).unwrap_err();
        assert!(
            matches!(err, LoadError::Truncated { found, expected, .. }
                if found == bytes.len() - 7 && expected == bytes.len() as u64),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(&format!("{} bytes", bytes.len())), "{message}");

        // Cut inside the JSON header: the length field alone gives the expected size.
        std::fs::write(&path, &bytes[..20]).unwrap();
        let err = load_lm(&path, &config).unwrap_err();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert!(
            matches!(err, LoadError::Truncated { found: 20, expected, .. } if expected == header_end),
            "{err:?}"
        );

        // Extra bytes after the tensor data are not a truncation.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 4]);
        std::fs::write(&path, &longer).unwrap();
        let err = load_lm(&path, &config).unwrap_err();
        assert!(
            matches!(err, LoadError::InvalidSafetensors { file_bytes, .. } if file_bytes == longer.len()),
            "{err:?}"
        );

        // JSON text read as a header length claims far more bytes than the file has.
        std::fs::write(&path, b"{\"n_layer\": 12}").unwrap();
        let err = load_lm(&path, &config).unwrap_err();
        assert!(matches!(err, LoadError::Truncated { found: 15, .. }), "{err:?}");
        std::fs::write(&path, b"").unwrap();
        let err = load_lm(&path, &config).unwrap_err();
        assert!(
            matches!(err, LoadError::InvalidSafetensors { .. }),
            "{err:?}"
        );
    }

    #[test]
    fn invalid_config_is_rejected() {
        let mut config = tiny_config();
        config.n_head = 3;
        let err = load_lm(Path::new("unused.safetensors"), &config).unwrap_err();
        assert!(
            matches!(err, LoadError::Config(ConfigError::HeadsDoNotDivide { .. })),
            "{err:?}"
        );
        let config = classifier_config(3);
        let err = load(
            Path::new("unused"),
            &config,
            HeadKind::Classifier { num_labels: 2 },
            LoadOptions::default(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("3 labels but the classifier head has 2"),
            "{err}"
        );
    }

    #[test]
    fn missing_tensor_is_named() {
        let config = tiny_config();
        let mut file = entries(&lm_weights(&config, 1), true);
        file.remove("transformer.h.1.mlp.c_fc.weight");
        file.remove("transformer.ln_f.bias");
        let dir = tempfile::tempdir().unwrap();
        let err = load_lm(&write_file(dir.path(), &file), &config).unwrap_err();
        assert!(
            matches!(err, LoadError::MissingTensor { ref name, missing_count: 2, .. } if name == "h.1.mlp.c_fc.weight"),
            "{err:?}"
        );
        assert!(err.to_string().contains("(4, 16)"), "{err}");
    }

    #[test]
    fn huge_layer_count_is_missing_tensors() {
        // A config that claims 2^40 layers passes validation (the parameter count fits in
        // usize), so the loader must report the missing blocks without listing all of them.
        let config = tiny_config();
        let file = entries(&lm_weights(&config, 1), true);
        let mut claimed = config.clone();
        claimed.n_layer = 1 << 40;
        claimed.validate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = load_lm(&write_file(dir.path(), &file), &claimed).unwrap_err();
        let expected_missing = 12 * (1usize << 40) + 4 - file.len();
        assert!(
            matches!(err, LoadError::MissingTensor { ref name, missing_count, .. }
                if name == "h.2.ln_1.weight" && missing_count == expected_missing),
            "{err:?}"
        );
    }

    #[test]
    fn noncanonical_layer_index_is_unknown() {
        let config = tiny_config();
        let mut file = entries(&lm_weights(&config, 1), false);
        let tensor = file.remove("h.1.ln_1.bias").unwrap();
        file.insert("h.01.ln_1.bias".into(), tensor);
        let dir = tempfile::tempdir().unwrap();
        let err = load_lm(&write_file(dir.path(), &file), &config).unwrap_err();
        assert!(
            matches!(err, LoadError::UnknownTensor { ref name, .. } if name == "h.01.ln_1.bias"),
            "{err:?}"
        );
    }

    #[test]
    fn classifier_head_may_be_missing() {
        let config = classifier_config(3);
        let head = HeadKind::Classifier { num_labels: 3 };
        let body = lm_weights(&config_without_labels(&config), 5);
        let dir = tempfile::tempdir().unwrap();
        let path = write_file(dir.path(), &entries(&body, true));

        let err = load(&path, &config, head, LoadOptions::default()).unwrap_err();
        assert!(
            matches!(err, LoadError::MissingTensor { ref name, .. } if name == SCORE_WEIGHT),
            "{err:?}"
        );
        assert!(err.to_string().contains("allow_missing_head"), "{err}");

        let options = LoadOptions {
            allow_missing_head: true,
        };
        let mut loaded = load(&path, &config, head, options).unwrap();
        assert_eq!(loaded, body);
        loaded.insert(SCORE_WEIGHT, init_score(&config, 3, 11));
        assert_eq!(loaded.num_params(), config.num_params());
    }

    fn config_without_labels(config: &Gpt2Config) -> Gpt2Config {
        let mut config = config.clone();
        config.num_labels = None;
        config.id2label = None;
        config.label2id = None;
        config.architectures = Some(vec!["GPT2LMHeadModel".to_string()]);
        config
    }

    #[test]
    fn unknown_tensor_is_named() {
        let config = tiny_config();
        let weights = lm_weights(&config, 1);
        let mut file = entries(&weights, true);
        file.insert(
            "transformer.h.2.ln_1.weight".into(),
            (Dtype::F32, vec![4], f32_bytes(&[1.0; 4])),
        );
        let dir = tempfile::tempdir().unwrap();
        let err = load_lm(&write_file(dir.path(), &file), &config).unwrap_err();
        assert!(
            matches!(err, LoadError::UnknownTensor { ref name, .. } if name == "transformer.h.2.ln_1.weight"),
            "{err:?}"
        );
        assert!(err.to_string().contains("2 layers"), "{err}");

        // A classifier file loaded as a language model.
        let mut file = entries(&weights, true);
        file.insert(
            SCORE_WEIGHT.into(),
            (Dtype::F32, vec![2, 4], f32_bytes(&[0.0; 8])),
        );
        let err = load_lm(&write_file(dir.path(), &file), &config).unwrap_err();
        assert!(
            matches!(err, LoadError::UnknownTensor { ref name, .. } if name == SCORE_WEIGHT),
            "{err:?}"
        );
    }

    #[test]
    fn duplicate_tensor_is_rejected() {
        let config = tiny_config();
        let mut file = entries(&lm_weights(&config, 1), true);
        let wpe = file["transformer.wpe.weight"].clone();
        file.insert("wpe.weight".into(), wpe);
        let dir = tempfile::tempdir().unwrap();
        let err = load_lm(&write_file(dir.path(), &file), &config).unwrap_err();
        assert!(
            matches!(err, LoadError::DuplicateTensor { ref name, .. } if name == "wpe.weight"),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("`transformer.wpe.weight`") && message.contains("`wpe.weight`"),
            "{message}"
        );
    }

    #[test]
    fn wrong_dtype_is_rejected() {
        let config = tiny_config();
        let mut file = entries(&lm_weights(&config, 1), true);
        file.insert(
            "transformer.ln_f.bias".into(),
            (Dtype::F64, vec![4], vec![0; 32]),
        );
        let dir = tempfile::tempdir().unwrap();
        let err = load_lm(&write_file(dir.path(), &file), &config).unwrap_err();
        assert!(
            matches!(err, LoadError::WrongDtype { ref name, .. } if name == "transformer.ln_f.bias"),
            "{err:?}"
        );
        assert!(err.to_string().contains("F64"), "{err}");
    }

    #[test]
    fn transposed_conv1d_is_rejected() {
        let config = tiny_config();
        let mut file = entries(&lm_weights(&config, 1), true);
        file.get_mut("transformer.h.0.mlp.c_fc.weight").unwrap().1 = vec![16, 4];
        let dir = tempfile::tempdir().unwrap();
        let err = load_lm(&write_file(dir.path(), &file), &config).unwrap_err();
        assert!(matches!(err, LoadError::WrongShape { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("`transformer.h.0.mlp.c_fc.weight`")
                && message.contains("has shape (16, 4), expected (4, 16)")
                && message.contains("Conv1D weights as (in, out)"),
            "{message}"
        );
    }

    #[test]
    fn save_round_trips() {
        for (config, prefix) in [
            (tiny_config(), true),
            (tiny_config(), false),
            (classifier_config(3), true),
        ] {
            let head = HeadKind::from_config(&config);
            let weights = init_random(&config, head, 9).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join(WEIGHTS_FILE_NAME);
            save(&path, &weights, &config, prefix).unwrap();
            let loaded = load(&path, &config, head, LoadOptions::default()).unwrap();
            assert_eq!(loaded, weights, "head {head:?}, prefix {prefix}");

            let bytes = std::fs::read(&path).unwrap();
            let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
            let format = metadata
                .metadata()
                .as_ref()
                .and_then(|m| m.get("format").cloned());
            assert_eq!(format.as_deref(), Some("pt"));
            let file = SafeTensors::deserialize(&bytes).unwrap();
            let names = file.names();
            assert!(
                names
                    .iter()
                    .all(|n| n.starts_with(BODY_PREFIX) == (prefix && *n != SCORE_WEIGHT)),
                "{names:?}"
            );
            assert!(!names.contains(&LM_HEAD_WEIGHT));
            assert!(file
                .tensors()
                .iter()
                .all(|(_, view)| view.dtype() == Dtype::F32));
        }
    }

    #[test]
    fn save_rejects_inconsistent_tensors() {
        let config = tiny_config();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(WEIGHTS_FILE_NAME);

        let mut weights = lm_weights(&config, 1);
        weights.get_mut("ln_f.bias").unwrap().data.pop();
        let err = save(&path, &weights, &config, true).unwrap_err();
        assert!(
            matches!(
                err,
                LoadError::TensorLength {
                    expected_len: 4,
                    len: 3,
                    ..
                }
            ),
            "{err:?}"
        );

        let mut weights = lm_weights(&config, 1);
        weights.insert(
            "ln_f.bias",
            HostTensor {
                shape: vec![usize::MAX, 2],
                data: vec![],
            },
        );
        let err = save(&path, &weights, &config, true).unwrap_err();
        assert!(
            matches!(err, LoadError::SizeOverflow { ref name, .. } if name == "ln_f.bias"),
            "{err:?}"
        );

        let mut weights = lm_weights(&config, 1);
        weights.tensors.remove("wpe.weight");
        let err = save(&path, &weights, &config, true).unwrap_err();
        assert!(
            matches!(err, LoadError::MissingTensor { ref name, .. } if name == "wpe.weight"),
            "{err:?}"
        );

        let mut weights = lm_weights(&config, 1);
        weights.insert(
            "h.0.attn.c_proj.weight",
            HostTensor::filled(vec![2, 8], 0.0),
        );
        let err = save(&path, &weights, &config, true).unwrap_err();
        assert!(matches!(err, LoadError::WrongShape { .. }), "{err:?}");

        let mut weights = lm_weights(&config, 1);
        weights.insert("lm_head.weight", HostTensor::filled(vec![10, 4], 0.0));
        let err = save(&path, &weights, &config, true).unwrap_err();
        assert!(matches!(err, LoadError::UnknownTensor { .. }), "{err:?}");
        assert!(!path.exists(), "a rejected save must not write the file");
    }

    #[test]
    fn init_is_seeded() {
        let config = tiny_config();
        let first = lm_weights(&config, 42);
        assert_eq!(first, lm_weights(&config, 42));
        assert_ne!(first, lm_weights(&config, 43));
        let classifier = init_random(&config, HeadKind::Classifier { num_labels: 2 }, 42).unwrap();
        for (name, tensor) in &first.tensors {
            assert_eq!(
                classifier.get(name),
                Some(tensor),
                "{name} differs between heads"
            );
        }
        assert_eq!(classifier.get(SCORE_WEIGHT).unwrap().shape, vec![2, 4]);
    }

    #[test]
    fn init_follows_gpt2_rule() {
        let config = Gpt2Config::mini();
        let weights = lm_weights(&config, 0);
        assert_eq!(weights.num_params(), config.num_params());
        let std_of = |name: &str| {
            let data = &weights.get(name).unwrap().data;
            let n = data.len() as f64;
            let mean = data.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            (mean, var.sqrt())
        };
        // 12.9M samples for wte and 262k for c_fc: the sample std lies within 1% of the true one.
        for name in [
            "wte.weight",
            "h.0.mlp.c_fc.weight",
            "h.3.attn.c_attn.weight",
        ] {
            let (mean, std) = std_of(name);
            assert!(mean.abs() < 1e-3, "{name}: mean {mean}");
            assert!(
                (std - 0.02).abs() < 2e-4,
                "{name}: std {std}, expected 0.02"
            );
        }
        let projection_std = 0.02 / (2.0 * 4.0f64).sqrt();
        for name in ["h.0.attn.c_proj.weight", "h.2.mlp.c_proj.weight"] {
            let (_, std) = std_of(name);
            assert!(
                (std - projection_std).abs() < 0.02 * projection_std,
                "{name}: std {std}, expected {projection_std}"
            );
        }
        assert!(weights
            .get("h.1.ln_2.weight")
            .unwrap()
            .data
            .iter()
            .all(|&v| v == 1.0));
        assert!(weights
            .get("ln_f.bias")
            .unwrap()
            .data
            .iter()
            .all(|&v| v == 0.0));
        assert!(weights
            .get("h.1.mlp.c_fc.bias")
            .unwrap()
            .data
            .iter()
            .all(|&v| v == 0.0));
    }

    #[test]
    fn init_rejects_zero_classes() {
        let err =
            init_random(&tiny_config(), HeadKind::Classifier { num_labels: 0 }, 1).unwrap_err();
        assert!(matches!(err, ConfigError::InvalidLabels { .. }), "{err:?}");
    }
}
