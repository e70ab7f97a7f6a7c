//! LoRA adapters on GPT-2's Conv1D layers: which layers get one, how they start, how they are
//! stored in Hugging Face PEFT's format, and how they fold into the base weights.
//!
//! # Math
//! A targeted Conv1D `y = x W + b` (W stored (in, out)) becomes
//! `y = x W + b + s * (x A^T) B^T` with A (r, in), B (out, r) and scaling `s = alpha / r`
//! (`alpha / sqrt(r)` with rank-stabilised scaling). A starts Kaiming-uniform as PEFT does,
//! U(-1/sqrt(in), 1/sqrt(in)), and B at zero, so a fresh adapter leaves the model unchanged.
//! Merging adds `s * (B A)^T`, an (in, out) matrix, to W.
//!
//! # Names
//! Canonical names follow the base weights: `h.{i}.attn.c_attn.lora_A.weight` (r, in) and
//! `h.{i}.attn.c_attn.lora_B.weight` (out, r). PEFT's `adapter_model.safetensors` stores them as
//! `base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight`, and the classification head
//! as `base_model.model.score.weight`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;
use serde_json::{json, Value};

use crate::fsutil::write_atomic;
use crate::model::config::Gpt2Config;
use crate::model::weights::{fmt_shape, read_tensor, rejected_file, HostTensor, Weights, SCORE_WEIGHT};

/// File name of the adapter settings in an adapter directory.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter tensors in an adapter directory.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix of every tensor name in PEFT's adapter files.
const PEFT_PREFIX: &str = "base_model.model.";
/// Metadata key of the label names in an adapter written by this engine.
const LABELS_KEY: &str = "labels";
/// Prefix of block modules in PEFT's module names.
const BODY_PREFIX: &str = "transformer.";
/// The Conv1D layers of a GPT-2 block, as module paths below `h.{i}`.
pub const BLOCK_LINEARS: [&str; 4] = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];
/// Targets of `--lora-targets` when none are given: every Conv1D of every block.
pub const DEFAULT_TARGETS: [&str; 3] = ["c_attn", "c_proj", "c_fc"];

/// Errors of LoRA settings and adapter files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// A file could not be read or written.
    #[error("could not read or write `{}`: {source}", .path.display())]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// `adapter_config.json` is invalid or sets an option this engine does not implement.
    #[error("`{}`: {message}", .path.display())]
    Config {
        /// The adapter_config.json.
        path: PathBuf,
        /// The problem and the next step.
        message: String,
    },
    /// A tensor of `adapter_model.safetensors` is missing, unknown, or has another shape than
    /// the base model implies.
    #[error("`{}`: {message}", .path.display())]
    Tensor {
        /// The adapter_model.safetensors.
        path: PathBuf,
        /// The problem and the next step.
        message: String,
    },
    /// The safetensors file itself is unreadable.
    #[error(transparent)]
    Load(#[from] crate::model::weights::LoadError),
}

/// LoRA hyperparameters and targets.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// r, the rank of A and B.
    pub rank: usize,
    /// alpha; the branch is scaled by alpha / r.
    pub alpha: f32,
    /// Dropout probability on the branch input during training.
    pub dropout: f32,
    /// Module names in PEFT's sense: a layer is targeted when its full name (such as
    /// `transformer.h.0.attn.c_attn`) equals a target or ends with `.` and the target.
    pub targets: Targets,
    /// Rank-stabilised scaling alpha / sqrt(r) instead of alpha / r.
    pub rslora: bool,
    /// QLoRA: store the frozen linear weights of every block as NF4 (4-bit NormalFloat in blocks
    /// of 64 with one f32 scale each), dequantised inside the matmul kernels. A run setting,
    /// not part of the adapter file.
    pub quantize_base: bool,
    /// With `quantize_base`, also quantise the block scales (8-bit codes per group of 256
    /// blocks), which lowers the weights from 4.5 to about 4.13 bits per value.
    pub double_quant: bool,
}

/// Layer selection of `target_modules`: PEFT accepts a list of names or one regular expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Names matched as whole names or dotted suffixes.
    Names(Vec<String>),
    /// A regular expression that must match the whole module name.
    Pattern(String),
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Targets::Names(names) => write!(f, "{}", names.join(",")),
            Targets::Pattern(pattern) => write!(f, "/{pattern}/"),
        }
    }
}

/// One targeted Conv1D layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraModule {
    /// Canonical module path, such as `h.0.attn.c_attn`.
    pub prefix: String,
    /// Input features (rows of the base weight).
    pub n_in: usize,
    /// Output features (columns of the base weight).
    pub n_out: usize,
}

impl LoraModule {
    /// Canonical name of A (r, in).
    pub fn a_name(&self) -> String {
        format!("{}.lora_A.weight", self.prefix)
    }

    /// Canonical name of B (out, r).
    pub fn b_name(&self) -> String {
        format!("{}.lora_B.weight", self.prefix)
    }

    /// Canonical name of the base weight (in, out).
    pub fn weight_name(&self) -> String {
        format!("{}.weight", self.prefix)
    }
}

impl LoraSpec {
    /// Checks the settings: rank at least 1, alpha positive and finite, dropout in [0, 1), and
    /// at least one target.
    ///
    /// # Errors
    /// [`LoraError::Invalid`] naming the value and the range.
    pub fn new(rank: usize, alpha: f32, dropout: f32, targets: Targets) -> Result<Self, LoraError> {
        if rank == 0 {
            return Err(LoraError::Invalid("--lora-rank 0 is out of range: expected 1 or more (8 or 16 are usual)".into()));
        }
        if !(alpha.is_finite() && alpha > 0.0) {
            return Err(LoraError::Invalid(format!("--lora-alpha {alpha} is out of range: expected a positive number (often 2 x rank)")));
        }
        if !(0.0..1.0).contains(&dropout) {
            return Err(LoraError::Invalid(format!("--lora-dropout {dropout} is out of range: expected 0 <= P < 1")));
        }
        match &targets {
            Targets::Names(names) if names.is_empty() || names.iter().any(|n| n.trim().is_empty()) => {
                return Err(LoraError::Invalid(format!(
                    "--lora-targets `{targets}` has an empty name: expected a comma-separated list such as {}",
                    DEFAULT_TARGETS.join(",")
                )));
            }
            Targets::Pattern(pattern) => {
                full_match(pattern).map_err(|e| LoraError::Invalid(format!("target_modules pattern `{pattern}` is not a valid regular expression: {e}")))?;
            }
            Targets::Names(_) => {}
        }
        Ok(LoraSpec { rank, alpha, dropout, targets, rslora: false, quantize_base: false, double_quant: false })
    }

    /// Returns the factor on the LoRA branch: alpha / r, or alpha / sqrt(r) with rank-stabilised
    /// scaling.
    pub fn scaling(&self) -> f32 {
        if self.rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }

    /// True when the layer with canonical path `prefix` (such as `h.0.mlp.c_fc`) is targeted.
    pub fn targets_module(&self, prefix: &str) -> bool {
        let full = format!("{BODY_PREFIX}{prefix}");
        match &self.targets {
            Targets::Names(names) => names.iter().any(|t| name_matches(&full, t.trim())),
            Targets::Pattern(pattern) => full_match(pattern).is_ok_and(|re| re.is_match(&full)),
        }
    }

    /// Returns the targeted layers of a model, in block order.
    ///
    /// # Errors
    /// [`LoraError::Invalid`] when a target matches no layer, naming the layers there are.
    pub fn modules(&self, config: &Gpt2Config) -> Result<Vec<LoraModule>, LoraError> {
        let mut modules = Vec::new();
        for i in 0..config.n_layer {
            for linear in BLOCK_LINEARS {
                let prefix = format!("h.{i}.{linear}");
                if self.targets_module(&prefix) {
                    let (n_in, n_out) = linear_shape(config, linear);
                    modules.push(LoraModule { prefix, n_in, n_out });
                }
            }
        }
        let unmatched: Vec<&str> = match &self.targets {
            Targets::Names(names) => names
                .iter()
                .map(|t| t.trim())
                .filter(|t| {
                    let matches_layer = |i: usize, linear: &str| name_matches(&format!("{BODY_PREFIX}h.{i}.{linear}"), t);
                    !(0..config.n_layer).any(|i| BLOCK_LINEARS.iter().any(|linear| matches_layer(i, linear)))
                })
                .collect(),
            Targets::Pattern(_) if modules.is_empty() => vec!["the pattern"],
            Targets::Pattern(_) => Vec::new(),
        };
        if !unmatched.is_empty() {
            return Err(LoraError::Invalid(format!(
                "LoRA target `{}` matches no layer of the model; GPT-2's linear layers are {} (c_proj names both attn.c_proj and mlp.c_proj)",
                unmatched.join(", "),
                BLOCK_LINEARS.join(", ")
            )));
        }
        Ok(modules)
    }

    /// Trainable parameters of the adapter alone, without the head.
    pub fn parameter_count(&self, modules: &[LoraModule]) -> u64 {
        modules.iter().map(|m| (self.rank * (m.n_in + m.n_out)) as u64).sum()
    }
}

/// Returns whether the module `full` is named by `target`, by PEFT's rule: equal, or ending with
/// a dot and the target.
fn name_matches(full: &str, target: &str) -> bool {
    full == target || full.strip_suffix(target).is_some_and(|head| head.ends_with('.'))
}

fn full_match(pattern: &str) -> Result<regex::Regex, regex::Error> {
    regex::Regex::new(&format!("^(?:{pattern})$"))
}

/// (in, out) of one of the [`BLOCK_LINEARS`].
fn linear_shape(config: &Gpt2Config, linear: &str) -> (usize, usize) {
    let (c, inner) = (config.n_embd, config.inner_dim());
    match linear {
        "attn.c_attn" => (c, 3 * c),
        "attn.c_proj" => (c, c),
        "mlp.c_fc" => (c, inner),
        "mlp.c_proj" => (inner, c),
        other => unreachable!("`{other}` is not one of BLOCK_LINEARS"),
    }
}

/// Checks that every linear layer of the blocks can be stored as NF4 (`--quantize nf4`): its
/// output width must be a multiple of the 64-value block.
///
/// # Errors
/// [`LoraError::Invalid`] naming the first layer that cannot.
pub fn check_quantizable(config: &Gpt2Config) -> Result<(), LoraError> {
    for linear in BLOCK_LINEARS {
        let (n_in, n_out) = linear_shape(config, linear);
        if n_out % crate::kernels::nf4::BLOCK_SIZE != 0 {
            return Err(LoraError::Invalid(format!(
                "--quantize nf4 stores weights in blocks of {} values along each row, but {linear} is ({n_in}, {n_out}); use a model whose n_embd is a multiple of 64, or drop --quantize",
                crate::kernels::nf4::BLOCK_SIZE
            )));
        }
    }
    Ok(())
}

/// Returns the weights a QLoRA run computes with: every linear weight of the blocks replaced by its NF4
/// round trip (quantised, then dequantised), so that merging an adapter trained on the quantised
/// base reproduces the trained model.
///
/// # Errors
/// [`LoraError::Invalid`] for a shape or value that NF4 cannot store.
pub fn dequantized_base(weights: &Weights, config: &Gpt2Config, double_quant: bool) -> Result<Weights, LoraError> {
    let mut out = weights.clone();
    for i in 0..config.n_layer {
        for linear in BLOCK_LINEARS {
            let name = format!("h.{i}.{linear}.weight");
            let Some(tensor) = out.get_mut(&name) else { continue };
            let (rows, cols) = (tensor.shape[0], tensor.shape[1..].iter().product());
            let matrix = crate::kernels::nf4::quantize(&tensor.data, rows, cols, double_quant)
                .map_err(|e| LoraError::Invalid(format!("cannot store `{name}` as NF4: {e}")))?;
            tensor.data = crate::kernels::nf4::dequantize(&matrix);
        }
    }
    Ok(out)
}

/// Parses `--lora-targets`: a comma-separated list of module names.
pub fn parse_targets(list: &str) -> Targets {
    Targets::Names(list.split(',').map(|t| t.trim().to_string()).collect())
}

/// Creates a fresh adapter: A drawn from U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with
/// a = sqrt(5), as PEFT initialises it) and B zero, so the adapted model starts equal to the base.
pub fn init_adapter(spec: &LoraSpec, modules: &[LoraModule], seed: u64) -> Weights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4c6f_5241);
    let mut weights = Weights::default();
    for m in modules {
        let bound = 1.0 / (m.n_in as f64).sqrt();
        let mut a = HostTensor::filled(vec![spec.rank, m.n_in], 0.0);
        for value in &mut a.data {
            *value = rng.random_range(-bound..bound) as f32;
        }
        weights.insert(m.a_name(), a);
        weights.insert(m.b_name(), HostTensor::filled(vec![m.n_out, spec.rank], 0.0));
    }
    weights
}

/// Folds the adapter into the base weights: `W += s * (B A)^T` for every targeted layer, in f64
/// per element and rounded once. `score.weight`, when the adapter carries one, replaces the
/// base head.
///
/// # Errors
/// [`LoraError::Tensor`] when a base or adapter tensor is missing or mis-shaped.
pub fn merge(base: &mut Weights, spec: &LoraSpec, modules: &[LoraModule], adapter: &Weights) -> Result<(), LoraError> {
    let s = f64::from(spec.scaling());
    let r = spec.rank;
    let missing = |name: &str| LoraError::Tensor { path: PathBuf::from("(adapter)"), message: format!("tensor `{name}` is missing") };
    for m in modules {
        let a = adapter.get(&m.a_name()).ok_or_else(|| missing(&m.a_name()))?;
        let b = adapter.get(&m.b_name()).ok_or_else(|| missing(&m.b_name()))?;
        let w = base.get_mut(&m.weight_name()).ok_or_else(|| missing(&m.weight_name()))?;
        if a.shape != [r, m.n_in] || b.shape != [m.n_out, r] || w.shape != [m.n_in, m.n_out] {
            return Err(LoraError::Tensor {
                path: PathBuf::from("(adapter)"),
                message: format!(
                    "`{}`: A {}, B {} and W {} do not compose; expected ({r}, {}), ({}, {r}) and ({}, {})",
                    m.prefix,
                    fmt_shape(&a.shape),
                    fmt_shape(&b.shape),
                    fmt_shape(&w.shape),
                    m.n_in,
                    m.n_out,
                    m.n_in,
                    m.n_out
                ),
            });
        }
        // W[i, o] += s * sum_k B[o, k] * A[k, i]
        for i in 0..m.n_in {
            for o in 0..m.n_out {
                let delta: f64 = (0..r).map(|k| f64::from(b.data[o * r + k]) * f64::from(a.data[k * m.n_in + i])).sum();
                let cell = &mut w.data[i * m.n_out + o];
                *cell = (f64::from(*cell) + s * delta) as f32;
            }
        }
    }
    if let Some(score) = adapter.get(SCORE_WEIGHT) {
        base.insert(SCORE_WEIGHT, score.clone());
    }
    Ok(())
}

/// An adapter read from disk.
#[derive(Clone, Debug)]
pub struct Adapter {
    /// Its settings.
    pub spec: LoraSpec,
    /// Its targeted layers in the base model.
    pub modules: Vec<LoraModule>,
    /// A and B of every targeted layer, and `score.weight` when the adapter trained the head.
    pub weights: Weights,
    /// `base_model_name_or_path` as recorded.
    pub base_model: String,
    /// Label names stored by this engine with a trained head (PEFT stores none).
    pub labels: Option<Vec<String>>,
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` as PEFT does for a
/// sequence classifier: peft_type LORA, task_type SEQ_CLS, fan_in_fan_out true (GPT-2's Conv1D
/// stores weights (in, out)), modules_to_save `score`. `weights` must hold A and B of every
/// module, and `score.weight` when `labels` are given. The label names go into the file's
/// metadata (`labels`, a JSON list), which PEFT ignores. Each file is written atomically.
///
/// # Errors
/// A missing or mis-shaped tensor, or a failed write.
pub fn save_adapter(
    dir: &Path,
    spec: &LoraSpec,
    modules: &[LoraModule],
    weights: &Weights,
    base_model: &str,
    labels: Option<&[String]>,
) -> Result<(), LoraError> {
    let with_head = labels.is_some();
    std::fs::create_dir_all(dir).map_err(|source| LoraError::Io { path: dir.to_path_buf(), source })?;
    let targets = match &spec.targets {
        Targets::Names(names) => json!(names),
        Targets::Pattern(pattern) => json!(pattern),
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": targets,
        "fan_in_fan_out": true,
        "bias": "none",
        "use_rslora": spec.rslora,
        "use_dora": false,
        "modules_to_save": if with_head { json!(["score"]) } else { Value::Null },
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": Value::Null,
        "layers_pattern": Value::Null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": Value::Null,
        "auto_mapping": Value::Null,
    });
    let text = serde_json::to_string_pretty(&config).expect("a JSON value serializes");
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    write_atomic(&config_path, text.as_bytes()).map_err(|source| LoraError::Io { path: config_path, source })?;

    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let mut names: Vec<(String, String)> = Vec::new();
    for m in modules {
        for name in [m.a_name(), m.b_name()] {
            names.push((format!("{PEFT_PREFIX}{BODY_PREFIX}{name}"), name));
        }
    }
    if with_head {
        names.push((format!("{PEFT_PREFIX}{SCORE_WEIGHT}"), SCORE_WEIGHT.to_string()));
    }
    let mut encoded = Vec::with_capacity(names.len());
    for (stored, name) in names {
        let tensor = weights
            .get(&name)
            .ok_or_else(|| LoraError::Tensor { path: path.clone(), message: format!("tensor `{name}` is missing from the trained weights") })?;
        let bytes: Vec<u8> = tensor.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        encoded.push((stored, tensor.shape.clone(), bytes));
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("format".to_string(), json!("pt"));
    if let Some(labels) = labels {
        metadata.insert(LABELS_KEY.to_string(), json!(serde_json::to_string(labels).expect("strings serialize")));
    }
    let file = serialize_f32(&encoded, metadata);
    write_atomic(&path, &file).map_err(|source| LoraError::Io { path, source })
}

/// Encodes F32 tensors as safetensors with sorted header keys, so that equal tensors give equal
/// files. The safetensors crate writes its metadata map in hash order, which varies by process.
/// Layout: an 8-byte little-endian header length, the JSON header padded with spaces to a
/// multiple of 8 bytes, then the tensors' bytes in name order.
fn serialize_f32(tensors: &[(String, Vec<usize>, Vec<u8>)], metadata: serde_json::Map<String, Value>) -> Vec<u8> {
    let mut order: Vec<&(String, Vec<usize>, Vec<u8>)> = tensors.iter().collect();
    order.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".to_string(), Value::Object(metadata));
    let mut offset = 0usize;
    for (name, shape, bytes) in &order {
        header.insert(name.clone(), json!({ "dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes.len()] }));
        offset += bytes.len();
    }
    let mut text = serde_json::to_string(&Value::Object(header)).expect("a JSON value serializes");
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + offset);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    for (_, _, bytes) in order {
        out.extend_from_slice(bytes);
    }
    out
}

/// Reads `adapter_config.json` into settings. It accepts peft_type LORA, `target_modules` as a
/// list or a pattern, and `use_rslora`. It rejects DoRA, trained biases, per-layer rank or alpha
/// patterns and layer selections, because this engine does not implement them.
///
/// # Errors
/// [`LoraError::Io`] or [`LoraError::Config`].
pub fn read_adapter_config(dir: &Path) -> Result<(LoraSpec, String, bool), LoraError> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| LoraError::Io { path: path.clone(), source })?;
    let config_err = |message: String| LoraError::Config { path: path.clone(), message };
    let value: Value = serde_json::from_str(&text).map_err(|e| config_err(format!("not valid JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(config_err("expected a JSON object".into()));
    };
    let peft_type = object.get("peft_type").and_then(Value::as_str).unwrap_or("(missing)");
    if peft_type != "LORA" {
        return Err(config_err(format!("peft_type is `{peft_type}`, expected LORA; only LoRA adapters can be loaded")));
    }
    let rank = object
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r >= 1)
        .ok_or_else(|| config_err(format!("`r` is {}, expected a positive integer", object.get("r").unwrap_or(&Value::Null))))?;
    let alpha = object
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| config_err(format!("`lora_alpha` is {}, expected a number", object.get("lora_alpha").unwrap_or(&Value::Null))))?;
    let dropout = object.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let targets = match object.get("target_modules") {
        Some(Value::String(pattern)) => Targets::Pattern(pattern.clone()),
        Some(Value::Array(items)) => {
            let names: Option<Vec<String>> = items.iter().map(|v| v.as_str().map(str::to_string)).collect();
            Targets::Names(names.ok_or_else(|| config_err("`target_modules` holds a value that is not a string".into()))?)
        }
        other => {
            return Err(config_err(format!(
                "`target_modules` is {}, expected a list of module names or a pattern",
                other.unwrap_or(&Value::Null)
            )))
        }
    };
    let flag = |key: &str| object.get(key).and_then(Value::as_bool).unwrap_or(false);
    if flag("use_dora") {
        return Err(config_err("use_dora is true: DoRA adapters are not supported; use a plain LoRA adapter".into()));
    }
    let bias = object.get("bias").and_then(Value::as_str).unwrap_or("none");
    if bias != "none" {
        return Err(config_err(format!("bias is `{bias}`: only adapters without trained biases (bias \"none\") are supported")));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if object.get(key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(config_err(format!("`{key}` is not empty: per-layer ranks and alphas are not supported")));
        }
    }
    for key in ["layers_to_transform", "layer_replication", "exclude_modules", "target_parameters"] {
        if object.get(key).is_some_and(|v| !v.is_null()) {
            return Err(config_err(format!("`{key}` is set: layer selections beyond target_modules are not supported")));
        }
    }
    let with_head = match object.get("modules_to_save") {
        None | Some(Value::Null) => false,
        Some(Value::Array(items)) => items.iter().any(|v| v.as_str() == Some("score")),
        Some(other) => return Err(config_err(format!("`modules_to_save` is {other}, expected a list or null"))),
    };
    let mut spec = LoraSpec::new(rank as usize, alpha as f32, dropout as f32, targets).map_err(|e| config_err(e.to_string()))?;
    spec.rslora = flag("use_rslora");
    let base = object.get("base_model_name_or_path").and_then(Value::as_str).unwrap_or("").to_string();
    Ok((spec, base, with_head))
}

/// Reads an adapter directory written by PEFT or by this engine for the base model `config`.
/// `num_labels` is the head size the caller expects, checked against a stored `score.weight`.
///
/// # Errors
/// Unreadable files, settings this engine does not implement, and tensors that do not fit the
/// base model: an adapter trained on another base model names the first such tensor.
pub fn load_adapter(dir: &Path, config: &Gpt2Config, num_labels: Option<usize>) -> Result<Adapter, LoraError> {
    let (spec, base_model, with_head) = read_adapter_config(dir)?;
    let path = dir.join(ADAPTER_WEIGHTS_FILE);
    let modules = spec.modules(config).map_err(|e| LoraError::Config {
        path: dir.join(ADAPTER_CONFIG_FILE),
        message: format!("{e}; the adapter was made for another model (base `{base_model}`)"),
    })?;
    let bytes = std::fs::read(&path).map_err(|source| LoraError::Io { path: path.clone(), source })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|error| LoraError::Load(rejected_file(&path, &bytes, error)))?;
    let tensor_err = |message: String| LoraError::Tensor { path: path.clone(), message };
    let labels: Option<Vec<String>> = SafeTensors::read_metadata(&bytes)
        .ok()
        .and_then(|(_, meta)| meta.metadata().as_ref().and_then(|m| m.get(LABELS_KEY).cloned()))
        .and_then(|text| serde_json::from_str(&text).ok());
    let mut expected: HashMap<String, Vec<usize>> = HashMap::new();
    for m in &modules {
        expected.insert(m.a_name(), vec![spec.rank, m.n_in]);
        expected.insert(m.b_name(), vec![m.n_out, spec.rank]);
    }
    let mut weights = Weights::default();
    let mut names = file.names();
    names.sort();
    for stored in names {
        let view = file.tensor(stored).map_err(|e| tensor_err(format!("tensor `{stored}` cannot be read: {e}")))?;
        let name = canonical_adapter_name(stored);
        if name == SCORE_WEIGHT {
            let shape = view.shape().to_vec();
            if shape.len() != 2 || shape[1] != config.n_embd || num_labels.is_some_and(|k| k != shape[0]) {
                return Err(tensor_err(format!(
                    "`{stored}` has shape {}, expected ({}, {}): the head is for {} labels and n_embd {}; the adapter was trained on another base model or other labels (base `{base_model}`)",
                    fmt_shape(&shape),
                    num_labels.map_or("K".to_string(), |k| k.to_string()),
                    config.n_embd,
                    shape.first().copied().unwrap_or(0),
                    shape.get(1).copied().unwrap_or(0)
                )));
            }
            weights.insert(name, read_tensor(&path, stored, &view, &shape)?);
            continue;
        }
        let Some(shape) = expected.get(&name) else {
            return Err(tensor_err(format!(
                "tensor `{stored}` ({}) is not a LoRA matrix of a targeted layer of this model ({} layers, targets {}); the adapter was made for another base model (base `{base_model}`)",
                fmt_shape(view.shape()),
                config.n_layer,
                spec.targets
            )));
        };
        if view.shape() != shape.as_slice() {
            return Err(tensor_err(format!(
                "tensor `{stored}` has shape {}, but this base model (n_embd {}, n_inner {}) and r {} need {}; the adapter was made for another base model (base `{base_model}`)",
                fmt_shape(view.shape()),
                config.n_embd,
                config.inner_dim(),
                spec.rank,
                fmt_shape(shape)
            )));
        }
        weights.insert(name, read_tensor(&path, stored, &view, shape)?);
    }
    for m in &modules {
        for name in [m.a_name(), m.b_name()] {
            if weights.get(&name).is_none() {
                return Err(tensor_err(format!(
                    "tensor `{PEFT_PREFIX}{BODY_PREFIX}{name}` is missing: adapter_config.json targets `{}`, which needs A and B for every matching layer",
                    m.prefix
                )));
            }
        }
    }
    if with_head && weights.get(SCORE_WEIGHT).is_none() {
        log::warn!("{}: modules_to_save names score but the file has no score weight; the base model's head is used", path.display());
    }
    Ok(Adapter { spec, modules, weights, base_model, labels })
}

/// A base model with an adapter folded into its weights.
pub struct MergedModel {
    /// The model; its config names the labels when it is a classifier.
    pub model: crate::model::load::LoadedModel,
    /// Label names of a classifier, `None` for a language model.
    pub labels: Option<Vec<String>>,
    /// The adapter that was merged.
    pub adapter: Adapter,
}

/// Opens the base model in `base_dir`, reads the adapter in `adapter_dir` and merges it. The
/// result is a classifier when the adapter carries a trained head (`score.weight`) or the base
/// is one. Its labels come from the base config, then from the adapter's metadata, then
/// `LABEL_i`. Otherwise the result is a language model.
///
/// # Errors
/// An unreadable base model or adapter, an adapter for another base model, or a classifier
/// without any trained head.
pub fn open_with_adapter(base_dir: &Path, adapter_dir: &Path) -> Result<MergedModel, MergeError> {
    use crate::model::load::{open_classifier, open_language_model};
    let config_path = base_dir.join("config.json");
    let config = Gpt2Config::from_file(&config_path).map_err(|error| crate::model::load::ModelError::Config { path: config_path.clone(), error })?;
    let base_is_classifier = config.architectures.iter().flatten().any(|a| a == "GPT2ForSequenceClassification");
    let adapter = load_adapter(adapter_dir, &config, None)?;
    let head_rows = adapter.weights.get(SCORE_WEIGHT).map(|t| t.shape[0]);
    let base_labels = if base_is_classifier { config.label_names() } else { None };
    let labels = match (head_rows, base_labels) {
        (Some(k), Some(labels)) if labels.len() == k => Some(labels),
        (Some(k), Some(labels)) => {
            return Err(MergeError::Lora(LoraError::Tensor {
                path: adapter_dir.join(ADAPTER_WEIGHTS_FILE),
                message: format!("the adapter's head has {k} classes but the base classifier has {} ({})", labels.len(), labels.join(", ")),
            }))
        }
        (Some(k), None) => Some(match &adapter.labels {
            Some(labels) if labels.len() == k => labels.clone(),
            _ => crate::model::config::default_label_names(k),
        }),
        (None, labels) => labels,
    };
    let mut model = match &labels {
        Some(labels) => {
            let model = open_classifier(base_dir, labels.len(), 0)?;
            if model.random_init || (model.new_head && head_rows.is_none()) {
                return Err(MergeError::Lora(LoraError::Invalid(format!(
                    "the classification head is missing: neither {} nor the adapter in {} contains trained score weights; pass the base model the adapter was trained on",
                    base_dir.display(),
                    adapter_dir.display()
                ))));
            }
            model
        }
        None => open_language_model(base_dir, 0)?,
    };
    if model.random_init {
        return Err(MergeError::Lora(LoraError::Invalid(format!(
            "{} has no model.safetensors: an adapter needs the trained base weights it was made for",
            base_dir.display()
        ))));
    }
    merge(&mut model.weights, &adapter.spec, &adapter.modules, &adapter.weights)?;
    if let Some(labels) = &labels {
        model.config = model.config.to_classifier(labels).map_err(|error| crate::model::load::ModelError::Config { path: config_path, error })?;
    }
    Ok(MergedModel { model, labels, adapter })
}

/// Errors of [`open_with_adapter`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MergeError {
    /// The base model could not be opened.
    #[error(transparent)]
    Model(#[from] crate::model::load::ModelError),
    /// The adapter could not be read or does not fit.
    #[error(transparent)]
    Lora(#[from] LoraError),
}

/// `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight` (or with the adapter name,
/// `...lora_A.default.weight`) to `h.0.attn.c_attn.lora_A.weight`; the head to `score.weight`.
fn canonical_adapter_name(stored: &str) -> String {
    let name = stored.strip_prefix(PEFT_PREFIX).unwrap_or(stored);
    let name = name.strip_prefix(BODY_PREFIX).unwrap_or(name);
    name.replace(".default.", ".").replace(".modules_to_save.", ".")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Gpt2Config {
        let mut config = Gpt2Config::mini();
        config.n_layer = 2;
        config
    }

    fn spec(targets: &str) -> LoraSpec {
        LoraSpec::new(4, 8.0, 0.0, parse_targets(targets)).unwrap()
    }

    #[test]
    fn targets_follow_peft_suffix_rule() {
        let config = tiny();
        let all = spec("c_attn,c_proj,c_fc").modules(&config).unwrap();
        assert_eq!(all.len(), 8, "c_proj names both projections: {all:?}");
        let attn = spec("attn.c_proj").modules(&config).unwrap();
        let prefixes: Vec<&str> = attn.iter().map(|m| m.prefix.as_str()).collect();
        assert_eq!(prefixes, ["h.0.attn.c_proj", "h.1.attn.c_proj"]);
        let one = spec("transformer.h.1.mlp.c_fc").modules(&config).unwrap();
        assert_eq!(one, vec![LoraModule { prefix: "h.1.mlp.c_fc".into(), n_in: config.n_embd, n_out: config.inner_dim() }]);
        // "proj" is not a dotted suffix of any module.
        let err = spec("c_attn,proj").modules(&config).unwrap_err().to_string();
        assert!(err.contains("`proj`"), "{err}");
        let pattern = LoraSpec::new(4, 8.0, 0.0, Targets::Pattern(r".*\.h\.0\.mlp\..*".into())).unwrap();
        assert_eq!(pattern.modules(&config).unwrap().len(), 2);
    }

    #[test]
    fn settings_out_of_range_are_refused() {
        let t = || parse_targets("c_attn");
        for (rank, alpha, dropout, needle) in [(0, 8.0, 0.0, "--lora-rank 0"), (4, 0.0, 0.0, "--lora-alpha 0"), (4, 8.0, 1.0, "--lora-dropout 1")] {
            let err = LoraSpec::new(rank, alpha, dropout, t()).unwrap_err().to_string();
            assert!(err.contains(needle), "expected `{needle}` in `{err}`");
        }
        let err = LoraSpec::new(4, 8.0, 0.0, parse_targets("c_attn,,c_fc")).unwrap_err().to_string();
        assert!(err.contains("empty name"), "{err}");
    }

    #[test]
    fn fresh_adapter_has_zero_b_and_bounded_a() {
        let config = tiny();
        let s = spec("c_attn,c_fc");
        let modules = s.modules(&config).unwrap();
        let w = init_adapter(&s, &modules, 7);
        for m in &modules {
            let a = w.get(&m.a_name()).unwrap();
            let bound = 1.0 / (m.n_in as f32).sqrt();
            assert!(a.data.iter().all(|v| v.abs() <= bound), "{} exceeds {bound}", m.a_name());
            let spread = a.data.iter().fold(0.0f32, |acc, v| acc.max(v.abs()));
            assert!(spread > 0.5 * bound, "{} is not spread over its range: max |a| {spread}", m.a_name());
            assert!(w.get(&m.b_name()).unwrap().data.iter().all(|&v| v == 0.0));
        }
        assert_eq!(s.parameter_count(&modules), w.num_params() as u64);
    }

    #[test]
    fn merge_adds_scaled_transposed_product() {
        let config = tiny();
        let s = spec("h.0.attn.c_proj");
        let modules = s.modules(&config).unwrap();
        let m = &modules[0];
        let c = config.n_embd;
        let mut adapter = Weights::default();
        let a: Vec<f32> = (0..4 * c).map(|i| (i % 7) as f32 * 0.25 - 0.5).collect();
        let b: Vec<f32> = (0..c * 4).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
        adapter.insert(m.a_name(), HostTensor { shape: vec![4, c], data: a.clone() });
        adapter.insert(m.b_name(), HostTensor { shape: vec![c, 4], data: b.clone() });
        let mut base = Weights::default();
        base.insert(m.weight_name(), HostTensor::filled(vec![c, c], 1.0));
        merge(&mut base, &s, &modules, &adapter).unwrap();
        let w = base.get(&m.weight_name()).unwrap();
        for (i, o) in [(0usize, 0usize), (3, 17), (c - 1, 2)] {
            let delta: f64 = (0..4).map(|k| f64::from(b[o * 4 + k]) * f64::from(a[k * c + i])).sum();
            let want = 1.0 + 2.0 * delta;
            assert!((f64::from(w.data[i * c + o]) - want).abs() < 1e-6, "W[{i}, {o}] = {}, expected {want}", w.data[i * c + o]);
        }
    }

    #[test]
    fn adapter_round_trips_through_peft_layout() {
        let config = tiny();
        let s = spec("c_attn,c_proj");
        let modules = s.modules(&config).unwrap();
        let mut w = init_adapter(&s, &modules, 3);
        for m in &modules {
            w.get_mut(&m.b_name()).unwrap().data.iter_mut().enumerate().for_each(|(i, v)| *v = i as f32 * 0.01);
        }
        w.insert(SCORE_WEIGHT, HostTensor::filled(vec![2, config.n_embd], 0.5));
        let dir = tempfile::tempdir().unwrap();
        let labels = vec!["ham".to_string(), "spam".to_string()];
        save_adapter(dir.path(), &s, &modules, &w, "assets/models/x", Some(&labels)).unwrap();
        let loaded = load_adapter(dir.path(), &config, Some(2)).unwrap();
        assert_eq!(loaded.spec, s);
        assert_eq!(loaded.modules, modules);
        assert_eq!(loaded.base_model, "assets/models/x");
        assert_eq!(loaded.weights, w);
        assert_eq!(loaded.labels, Some(labels.clone()));
        // Equal tensors give equal files.
        let first = std::fs::read(dir.path().join(ADAPTER_WEIGHTS_FILE)).unwrap();
        save_adapter(dir.path(), &s, &modules, &w, "assets/models/x", Some(&labels)).unwrap();
        assert_eq!(std::fs::read(dir.path().join(ADAPTER_WEIGHTS_FILE)).unwrap(), first, "the adapter file is not reproducible");
    }

    #[test]
    fn adapter_for_another_base_model_is_refused() {
        let config = tiny();
        let s = spec("c_attn");
        let modules = s.modules(&config).unwrap();
        let w = init_adapter(&s, &modules, 3);
        let dir = tempfile::tempdir().unwrap();
        save_adapter(dir.path(), &s, &modules, &w, "small-base", None).unwrap();
        let mut wider = config.clone();
        wider.n_embd *= 2;
        let err = load_adapter(dir.path(), &wider, None).unwrap_err().to_string();
        assert!(err.contains("h.0.attn.c_attn.lora_A.weight"), "{err}");
        assert!(err.contains("another base model"), "{err}");
        let mut shallower = config.clone();
        shallower.n_layer = 1;
        let err = load_adapter(dir.path(), &shallower, None).unwrap_err().to_string();
        assert!(err.contains("h.1.attn.c_attn"), "{err}");
        assert!(err.contains("another base model"), "{err}");
    }

    #[test]
    fn unsupported_peft_settings_are_named() {
        let config = tiny();
        let dir = tempfile::tempdir().unwrap();
        let write = |extra: &str| {
            let text = format!(r#"{{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["c_attn"]{extra}}}"#);
            std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), text).unwrap();
        };
        for (extra, needle) in [
            (r#", "use_dora": true"#, "DoRA"),
            (r#", "bias": "all""#, "bias"),
            (r#", "rank_pattern": {"c_attn": 8}"#, "rank_pattern"),
            (r#", "layers_to_transform": [0]"#, "layers_to_transform"),
        ] {
            write(extra);
            let err = load_adapter(dir.path(), &config, None).unwrap_err().to_string();
            assert!(err.contains(needle), "expected `{needle}` in `{err}`");
        }
        std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), r#"{"peft_type": "IA3", "r": 4}"#).unwrap();
        let err = load_adapter(dir.path(), &config, None).unwrap_err().to_string();
        assert!(err.contains("IA3"), "{err}");
    }
}
