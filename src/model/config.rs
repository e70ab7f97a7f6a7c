//! GPT-2 hyperparameters as stored in a Hugging Face `config.json`.
//!
//! Field names follow the `config.json` written by `transformers` (`n_layer`, `n_head`, `n_embd`,
//! `n_positions`, `layer_norm_epsilon`, ...). Fields this crate does not interpret are kept in
//! [`Gpt2Config::extra`] and written back by [`Gpt2Config::save`], so a loaded and saved config
//! still loads in `transformers`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::fsutil::write_atomic;

/// File name of the configuration inside a Hugging Face model directory.
pub const CONFIG_FILE_NAME: &str = "config.json";

/// Id of `<|endoftext|>` in the GPT-2 vocabulary. GPT-2 has no pad token, so batches are
/// right-padded with this id and a classifier config names it as `pad_token_id`.
pub const ENDOFTEXT_TOKEN_ID: u32 = 50256;

/// Number of tokens in the GPT-2 BPE vocabulary.
pub const GPT2_VOCAB_SIZE: usize = 50257;

/// Activations that are the tanh approximation of GELU, the only GELU the kernels implement.
/// `transformers` 5.x maps both names to the same function.
pub const SUPPORTED_ACTIVATIONS: [&str; 2] = ["gelu_new", "gelu_pytorch_tanh"];

/// Ending of the `architectures` entry of a text classifier (`GPT2ForSequenceClassification`).
const CLASSIFIER_ARCHITECTURE_SUFFIX: &str = "ForSequenceClassification";

/// Number of classes `transformers` assumes when a classifier config names none.
const DEFAULT_NUM_LABELS: usize = 2;

/// Fields that must be present in `config.json` because no default describes a real model.
const REQUIRED_FIELDS: [&str; 5] = ["n_layer", "n_head", "n_embd", "vocab_size", "n_positions"];

/// Errors from reading, validating or writing a GPT-2 configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// Reading or writing the config file failed.
    #[error("could not access `{path}`: {error}")]
    Io {
        /// File that was read or written.
        path: PathBuf,
        /// Underlying I/O error. The message includes it, so it is not also reported as the
        /// error's source, which would print it twice in an error chain.
        error: std::io::Error,
    },
    /// The text is not JSON, or a field has the wrong JSON type.
    #[error("invalid config JSON in {origin}: {error}")]
    Parse {
        /// File path, or `JSON text` when parsed from a string.
        origin: String,
        /// Underlying JSON error with line and column, included in the message and not
        /// reported as the source.
        error: serde_json::Error,
    },
    /// A required field is absent or null.
    #[error(
        "config field `{field}` is missing in {origin}; a GPT-2 config.json must set {required}"
    )]
    MissingField {
        /// Name of the missing field.
        field: &'static str,
        /// File path, or `JSON text` when parsed from a string.
        origin: String,
        /// All required fields, comma-separated.
        required: String,
    },
    /// A size field is zero.
    #[error("config field `{field}` is 0; it must be at least 1")]
    ZeroSize {
        /// Name of the zero field.
        field: &'static str,
    },
    /// `n_embd` is not a multiple of `n_head`, so the heads cannot split the channels evenly.
    #[error("n_embd = {n_embd} is not divisible by n_head = {n_head}, but each attention head needs n_embd / n_head channels; set n_head to a divisor of n_embd (GPT-2 small has n_embd 768 and n_head 12)")]
    HeadsDoNotDivide {
        /// Channels (C).
        n_embd: usize,
        /// Attention heads (NH).
        n_head: usize,
    },
    /// `layer_norm_epsilon` is zero, negative or not finite.
    #[error("layer_norm_epsilon = {value} is invalid; it must be a finite number greater than 0 (GPT-2 uses 1e-5)")]
    InvalidEpsilon {
        /// Value found.
        value: f64,
    },
    /// `activation_function` names an activation the kernels do not implement.
    #[error("activation_function = \"{value}\" is not supported; only the tanh approximation of GELU is implemented (\"gelu_new\" or \"gelu_pytorch_tanh\")")]
    UnsupportedActivation {
        /// Value found.
        value: String,
    },
    /// `model_type` is not `gpt2`.
    #[error("model_type = \"{value}\" is not supported; expected \"gpt2\"")]
    UnsupportedModelType {
        /// Value found.
        value: String,
    },
    /// An attention variant that the kernels do not implement is switched on.
    #[error("config field `{field}` = {value} is not supported: {reason}")]
    UnsupportedOption {
        /// Name of the field.
        field: &'static str,
        /// Value found, as JSON.
        value: String,
        /// Behaviour the kernels implement instead.
        reason: &'static str,
    },
    /// A special token id does not fit in the vocabulary.
    #[error("config field `{field}` = {value} is out of range; token ids must be below vocab_size = {vocab_size}")]
    TokenIdOutOfRange {
        /// Name of the field.
        field: &'static str,
        /// Value found.
        value: u32,
        /// Vocabulary size (V).
        vocab_size: usize,
    },
    /// The classification labels are inconsistent.
    #[error("invalid classification labels: {reason}")]
    InvalidLabels {
        /// Description of the inconsistency, with the values involved.
        reason: String,
    },
    /// The parameter count does not fit in `usize`.
    #[error("the parameter count overflows usize for n_layer = {n_layer}, n_embd = {n_embd}, vocab_size = {vocab_size}, n_positions = {n_positions}")]
    SizeOverflow {
        /// Layers (L).
        n_layer: usize,
        /// Channels (C).
        n_embd: usize,
        /// Vocabulary size (V).
        vocab_size: usize,
        /// Maximum sequence length.
        n_positions: usize,
    },
}

fn default_layer_norm_epsilon() -> f64 {
    // Default of `transformers.GPT2Config` and the value of every released GPT-2 checkpoint.
    1e-5
}

fn default_activation_function() -> String {
    "gelu_new".to_string()
}

fn default_initializer_range() -> f64 {
    // Standard deviation of GPT-2's normal initialisation, default of `transformers.GPT2Config`.
    0.02
}

fn default_model_type() -> String {
    "gpt2".to_string()
}

fn default_true() -> bool {
    true
}

/// Reads `id2label`, whose JSON keys are decimal strings such as `"0"`. Parsing the keys here
/// is needed because `#[serde(flatten)]` buffers the map and then rejects string keys for
/// integer types.
fn deserialize_id2label<'de, D>(
    deserializer: D,
) -> Result<Option<BTreeMap<usize, String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let raw: Option<BTreeMap<String, String>> = Option::deserialize(deserializer)?;
    let Some(raw) = raw else {
        return Ok(None);
    };
    let mut labels = BTreeMap::new();
    for (key, name) in raw {
        let id = key.trim().parse::<usize>().map_err(|_| {
            serde::de::Error::custom(format!(
                "id2label key \"{key}\" is not a class index; expected a decimal number such as \"0\""
            ))
        })?;
        labels.insert(id, name);
    }
    Ok(Some(labels))
}

/// GPT-2 hyperparameters with the Hugging Face `config.json` field names.
///
/// Build one with [`Gpt2Config::from_file`] (which validates it) or a preset
/// ([`Gpt2Config::small`], [`Gpt2Config::mini`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    /// Number of transformer blocks (L).
    pub n_layer: usize,
    /// Number of attention heads (NH).
    pub n_head: usize,
    /// Channels of the residual stream (C).
    pub n_embd: usize,
    /// Vocabulary size (V), the rows of `wte`.
    pub vocab_size: usize,
    /// Maximum sequence length, the rows of `wpe`.
    pub n_positions: usize,
    /// Epsilon added to the variance in every layer norm.
    #[serde(default = "default_layer_norm_epsilon")]
    pub layer_norm_epsilon: f64,
    /// Activation of the MLP. Only the tanh GELU (`gelu_new`, `gelu_pytorch_tanh`) is supported.
    #[serde(default = "default_activation_function")]
    pub activation_function: String,
    /// Hidden width of the MLP, 4 * `n_embd` when `None`.
    #[serde(default)]
    pub n_inner: Option<usize>,
    /// Standard deviation of the normal initialisation of weights and embeddings.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// Model family, which must be `gpt2`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Whether attention scores are divided by sqrt(head size). The kernels always divide.
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    /// Whether attention scores are further divided by the layer index, which is not implemented.
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Id of the beginning-of-text token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// Id of the end-of-text token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,
    /// Id used to right-pad batches, set for classifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Number of classes (K) of a classifier. `transformers` leaves it out and derives it from
    /// `id2label` (see [`Gpt2Config::label_count`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    /// Class index to label name.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "deserialize_id2label"
    )]
    pub id2label: Option<BTreeMap<usize, String>>,
    /// Label name to class index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, usize>>,
    /// Model classes that can load the checkpoint, such as `GPT2LMHeadModel`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Every other field of `config.json`, kept so that saving does not drop it.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Gpt2Config {
    /// Builds the configuration of a GPT-2 with the GPT-2 vocabulary and defaults for the rest.
    fn with_sizes(n_layer: usize, n_head: usize, n_embd: usize, n_positions: usize) -> Self {
        Gpt2Config {
            n_layer,
            n_head,
            n_embd,
            vocab_size: GPT2_VOCAB_SIZE,
            n_positions,
            layer_norm_epsilon: default_layer_norm_epsilon(),
            activation_function: default_activation_function(),
            n_inner: None,
            initializer_range: default_initializer_range(),
            model_type: default_model_type(),
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            bos_token_id: Some(ENDOFTEXT_TOKEN_ID),
            eos_token_id: Some(ENDOFTEXT_TOKEN_ID),
            pad_token_id: None,
            num_labels: None,
            id2label: None,
            label2id: None,
            architectures: Some(vec!["GPT2LMHeadModel".to_string()]),
            extra: Map::new(),
        }
    }

    /// Returns the configuration of GPT-2 small, the 124M-parameter release: 12 layers,
    /// 12 heads, 768 channels, 1024 positions.
    pub fn small() -> Self {
        Self::with_sizes(12, 12, 768, 1024)
    }

    /// Returns a small GPT with the GPT-2 vocabulary (4 layers, 4 heads, 256 channels,
    /// 256 positions), sized to pretrain and fine-tune on a laptop.
    pub fn mini() -> Self {
        Self::with_sizes(4, 4, 256, 256)
    }

    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.to_path_buf(),
            error,
        })?;
        Self::parse(&text, &format!("`{}`", path.display()))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, "JSON text")
    }

    fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let parse_error = |error| ConfigError::Parse {
            origin: origin.to_string(),
            error,
        };
        let value: Value = serde_json::from_str(text).map_err(parse_error)?;
        // Check required fields before serde so that the error names the field and the file
        // rather than a position in the text.
        if let Value::Object(fields) = &value {
            for field in REQUIRED_FIELDS {
                if fields.get(field).is_none_or(Value::is_null) {
                    return Err(ConfigError::MissingField {
                        field,
                        origin: origin.to_string(),
                        required: REQUIRED_FIELDS.join(", "),
                    });
                }
            }
        }
        let config: Gpt2Config = serde_json::from_value(value).map_err(parse_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the configuration describes a GPT-2 the kernels can run.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let sizes = [
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("vocab_size", self.vocab_size),
            ("n_positions", self.n_positions),
            ("n_inner", self.n_inner.unwrap_or(1)),
        ];
        for (field, value) in sizes {
            if value == 0 {
                return Err(ConfigError::ZeroSize { field });
            }
        }

        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ConfigError::HeadsDoNotDivide {
                n_embd: self.n_embd,
                n_head: self.n_head,
            });
        }

        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon > 0.0) {
            return Err(ConfigError::InvalidEpsilon {
                value: self.layer_norm_epsilon,
            });
        }

        if !SUPPORTED_ACTIVATIONS.contains(&self.activation_function.as_str()) {
            return Err(ConfigError::UnsupportedActivation {
                value: self.activation_function.clone(),
            });
        }

        if self.model_type != "gpt2" {
            return Err(ConfigError::UnsupportedModelType {
                value: self.model_type.clone(),
            });
        }

        if !self.scale_attn_weights {
            return Err(ConfigError::UnsupportedOption {
                field: "scale_attn_weights",
                value: "false".to_string(),
                reason: "the attention kernels always divide scores by sqrt(n_embd / n_head)",
            });
        }

        if self.scale_attn_by_inverse_layer_idx {
            return Err(ConfigError::UnsupportedOption {
                field: "scale_attn_by_inverse_layer_idx",
                value: "true".to_string(),
                reason: "the attention kernels do not scale scores by the layer index",
            });
        }

        let token_ids = [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
        ];
        for (field, id) in token_ids {
            if let Some(value) = id {
                if value as usize >= self.vocab_size {
                    return Err(ConfigError::TokenIdOutOfRange {
                        field,
                        value,
                        vocab_size: self.vocab_size,
                    });
                }
            }
        }

        self.validate_labels()?;
        if self.checked_num_params().is_none() {
            return Err(ConfigError::SizeOverflow {
                n_layer: self.n_layer,
                n_embd: self.n_embd,
                vocab_size: self.vocab_size,
                n_positions: self.n_positions,
            });
        }
        Ok(())
    }

    /// Checks that `num_labels`, `id2label` and `label2id` agree and number the classes 0..K.
    fn validate_labels(&self) -> Result<(), ConfigError> {
        if self.num_labels == Some(0) {
            return Err(ConfigError::InvalidLabels {
                reason: "num_labels is 0; a classifier needs at least 1 class".to_string(),
            });
        }
        if let (Some(count), Some(id2label)) = (self.num_labels, &self.id2label) {
            if id2label.len() != count {
                return Err(ConfigError::InvalidLabels {
                    reason: format!(
                        "num_labels is {count} but id2label has {} entries",
                        id2label.len()
                    ),
                });
            }
        }
        if let Some(id2label) = &self.id2label {
            let count = id2label.len();
            if let Some((&id, name)) = id2label.iter().find(|(&id, _)| id >= count) {
                return Err(ConfigError::InvalidLabels {
                    reason: format!(
                        "id2label maps id {id} to \"{name}\", but the {count} ids must be 0..{count}"
                    ),
                });
            }
            if let Some(label2id) = &self.label2id {
                for (&id, name) in id2label {
                    if label2id.get(name) != Some(&id) {
                        return Err(ConfigError::InvalidLabels {
                            reason: format!(
                                "id2label maps {id} to \"{name}\" but label2id maps \"{name}\" to {:?}",
                                label2id.get(name)
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Returns whether `architectures` names a sequence classifier, such as
    /// `GPT2ForSequenceClassification`. Labels alone do not decide it, because `transformers`
    /// writes a default two-entry `id2label` into many language-model configs.
    pub fn is_classifier(&self) -> bool {
        self.architectures
            .iter()
            .flatten()
            .any(|name| name.ends_with(CLASSIFIER_ARCHITECTURE_SUFFIX))
    }

    /// Returns the number of classes (K) of a classifier config: `num_labels` when set, else the
    /// size of `id2label`, else 2 (the `transformers` default). `None` when
    /// [`Gpt2Config::is_classifier`] is false.
    pub fn label_count(&self) -> Option<usize> {
        if !self.is_classifier() {
            return None;
        }
        let count = self
            .num_labels
            .or_else(|| self.id2label.as_ref().map(BTreeMap::len))
            .unwrap_or(DEFAULT_NUM_LABELS);
        Some(count)
    }

    /// Returns the label names in class order: `id2label`'s values, or `LABEL_i` for each of
    /// `num_labels` classes as transformers names them, or `None` when neither is set.
    pub fn label_names(&self) -> Option<Vec<String>> {
        match (&self.id2label, self.num_labels) {
            (Some(map), _) => Some(map.values().cloned().collect()),
            (None, Some(k)) => Some(default_label_names(k)),
            (None, None) => None,
        }
    }

    /// Returns the hidden width of the MLP: `n_inner`, or 4 * `n_embd` when unset.
    pub fn inner_dim(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Returns the head size (HS), `n_embd / n_head`.
    pub fn head_size(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Returns the number of parameters of the model this config describes: embeddings,
    /// blocks and final layer norm, plus `score` (K, C) for a classifier config. The
    /// language-model head is tied to `wte` and adds nothing. Saturates at `usize::MAX`, which
    /// [`Gpt2Config::validate`] rejects.
    pub fn num_params(&self) -> usize {
        self.checked_num_params().unwrap_or(usize::MAX)
    }

    fn checked_num_params(&self) -> Option<usize> {
        let c = self.n_embd;
        let inner = self.n_inner.map_or_else(|| c.checked_mul(4), Some)?;
        let embeddings = self
            .vocab_size
            .checked_add(self.n_positions)?
            .checked_mul(c)?;
        // Per block: ln_1 and ln_2 (2C each), c_attn (C*3C + 3C), attn.c_proj (C*C + C),
        // c_fc (C*I + I) and mlp.c_proj (I*C + C).
        let attention = c.checked_mul(4)?.checked_mul(c)?.checked_add(4 * c)?;
        let mlp = c
            .checked_mul(inner)?
            .checked_mul(2)?
            .checked_add(inner)?
            .checked_add(c)?;
        let block = attention.checked_add(mlp)?.checked_add(4 * c)?;
        let blocks = block.checked_mul(self.n_layer)?;
        let head = match self.label_count() {
            Some(classes) => classes.checked_mul(c)?,
            None => 0,
        };
        embeddings
            .checked_add(blocks)?
            .checked_add(2 * c)?
            .checked_add(head)
    }

    /// Returns a copy configured as a `GPT2ForSequenceClassification` with one class per
    /// label, in order: `num_labels`, `id2label`, `label2id`, `pad_token_id` 50256 and
    /// `architectures`. Rejects an empty list and duplicate names.
    pub fn to_classifier(&self, labels: &[String]) -> Result<Self, ConfigError> {
        if labels.is_empty() {
            return Err(ConfigError::InvalidLabels {
                reason: "the label list is empty; a classifier needs at least 1 class".to_string(),
            });
        }
        let mut seen = BTreeSet::new();
        for name in labels {
            if !seen.insert(name.as_str()) {
                return Err(ConfigError::InvalidLabels {
                    reason: format!("label \"{name}\" appears more than once"),
                });
            }
        }
        let mut config = self.clone();
        config.num_labels = Some(labels.len());
        config.id2label = Some(labels.iter().cloned().enumerate().collect());
        config.label2id = Some(labels.iter().cloned().zip(0..).collect());
        config.pad_token_id = Some(ENDOFTEXT_TOKEN_ID);
        config.architectures = Some(vec!["GPT2ForSequenceClassification".to_string()]);
        config.validate()?;
        Ok(config)
    }

    /// Writes `dir/config.json` atomically, with every field of [`Gpt2Config::extra`].
    pub fn save(&self, dir: &Path) -> Result<(), ConfigError> {
        let path = dir.join(CONFIG_FILE_NAME);
        let mut text = serde_json::to_string_pretty(self)
            .expect("a Gpt2Config has string keys and finite-or-null numbers, so it serializes");
        text.push('\n');
        write_atomic(&path, text.as_bytes()).map_err(|error| ConfigError::Io { path, error })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT2_SMALL_PARAMS: usize = 124_439_808;

    fn labels(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn small_json() -> Value {
        serde_json::to_value(Gpt2Config::small()).unwrap()
    }

    fn parse_value(value: &Value) -> Result<Gpt2Config, ConfigError> {
        Gpt2Config::from_json_str(&value.to_string())
    }

    #[test]
    fn small_preset_counts_124m_params() {
        let config = Gpt2Config::small();
        config.validate().unwrap();
        assert_eq!(config.num_params(), GPT2_SMALL_PARAMS);
        assert_eq!(config.head_size(), 64);
        assert_eq!(config.inner_dim(), 3072);
    }

    #[test]
    fn mini_preset_is_valid() {
        let config = Gpt2Config::mini();
        config.validate().unwrap();
        assert_eq!((config.n_layer, config.n_head, config.n_embd), (4, 4, 256));
        assert_eq!(config.n_positions, 256);
        assert_eq!(config.vocab_size, GPT2_VOCAB_SIZE);
        // wte 50257*256 + wpe 256*256 + 4 blocks of 12*256^2 + 13*256 + ln_f 2*256.
        let expected = 50257 * 256 + 256 * 256 + 4 * (12 * 256 * 256 + 13 * 256) + 2 * 256;
        assert_eq!(config.num_params(), expected);
    }

    #[test]
    fn unknown_fields_survive_save() {
        let mut value = small_json();
        value["summary_type"] = Value::from("cls_index");
        value["task_specific_params"] = serde_json::json!({"text-generation": {"max_length": 50}});
        let config = parse_value(&value).unwrap();
        assert_eq!(config.extra["summary_type"], Value::from("cls_index"));

        let dir = tempfile::tempdir().unwrap();
        config.save(dir.path()).unwrap();
        let reloaded = Gpt2Config::from_file(&dir.path().join(CONFIG_FILE_NAME)).unwrap();
        assert_eq!(reloaded, config);
        let raw: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(
            raw["task_specific_params"]["text-generation"]["max_length"],
            50
        );
    }

    #[test]
    fn classifier_config_round_trips() {
        let config = Gpt2Config::mini()
            .to_classifier(&labels(&["ham", "spam"]))
            .unwrap();
        assert_eq!(config.num_labels, Some(2));
        assert_eq!(config.pad_token_id, Some(ENDOFTEXT_TOKEN_ID));
        assert_eq!(config.id2label.as_ref().unwrap()[&1], "spam");
        assert_eq!(config.label2id.as_ref().unwrap()["ham"], 0);
        assert_eq!(
            config.architectures.as_deref(),
            Some(&["GPT2ForSequenceClassification".to_string()][..])
        );
        assert_eq!(
            config.num_params(),
            Gpt2Config::mini().num_params() + 2 * 256
        );

        let dir = tempfile::tempdir().unwrap();
        config.save(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join("config.json")).unwrap();
        let raw: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            raw["id2label"]["1"], "spam",
            "id2label keys must be JSON strings: {text}"
        );
        assert_eq!(
            Gpt2Config::from_file(&dir.path().join("config.json")).unwrap(),
            config
        );
    }

    #[test]
    fn label_count_falls_back_to_id2label() {
        let mut value = small_json();
        value["architectures"] = serde_json::json!(["GPT2ForSequenceClassification"]);
        value["id2label"] = serde_json::json!({"0": "neg", "1": "pos", "2": "neutral"});
        let config = parse_value(&value).unwrap();
        assert!(config.is_classifier());
        assert_eq!(config.label_count(), Some(3));

        value.as_object_mut().unwrap().remove("id2label");
        let config = parse_value(&value).unwrap();
        assert_eq!(config.label_count(), Some(DEFAULT_NUM_LABELS));
    }

    #[test]
    fn default_labels_keep_lm_config() {
        // transformers writes these two default labels into many language-model configs.
        let mut value = small_json();
        value["id2label"] = serde_json::json!({"0": "LABEL_0", "1": "LABEL_1"});
        value["label2id"] = serde_json::json!({"LABEL_0": 0, "LABEL_1": 1});
        let config = parse_value(&value).unwrap();
        assert!(!config.is_classifier());
        assert_eq!(config.label_count(), None);
        assert_eq!(config.num_params(), GPT2_SMALL_PARAMS);
    }

    #[test]
    fn defaults_fill_optional_fields() {
        let text =
            r#"{"n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 10, "n_positions": 16}"#;
        let config = Gpt2Config::from_json_str(text).unwrap();
        assert_eq!(config.layer_norm_epsilon, 1e-5);
        assert_eq!(config.activation_function, "gelu_new");
        assert_eq!(config.initializer_range, 0.02);
        assert_eq!(config.label_count(), None);
    }

    #[test]
    fn io_error_names_path() {
        let err = Gpt2Config::from_file(Path::new("/nonexistent/config.json")).unwrap_err();
        assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent/config.json"),
            "{err}"
        );
    }

    #[test]
    fn parse_error_on_bad_json() {
        let err = Gpt2Config::from_json_str("{\"n_layer\": 12,").unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let mut value = small_json();
        value["n_layer"] = Value::from("twelve");
        let err = parse_value(&value).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        assert!(
            err.to_string().contains("n_layer") || err.to_string().contains("string"),
            "{err}"
        );
    }

    #[test]
    fn missing_field_is_named() {
        for field in REQUIRED_FIELDS {
            let mut value = small_json();
            value.as_object_mut().unwrap().remove(field);
            let err = parse_value(&value).unwrap_err();
            assert!(
                matches!(err, ConfigError::MissingField { field: f, .. } if f == field),
                "{err:?}"
            );
            assert!(
                err.to_string().contains(field),
                "message for {field}: {err}"
            );
        }
    }

    #[test]
    fn zero_size_is_named() {
        for field in [
            "n_layer",
            "n_head",
            "n_embd",
            "vocab_size",
            "n_positions",
            "n_inner",
        ] {
            let mut value = small_json();
            value[field] = Value::from(0);
            let err = parse_value(&value).unwrap_err();
            assert!(
                matches!(err, ConfigError::ZeroSize { field: f } if f == field),
                "{field}: {err:?}"
            );
            assert!(err.to_string().contains(field), "{err}");
        }
    }

    #[test]
    fn heads_must_divide_channels() {
        let mut config = Gpt2Config::small();
        config.n_head = 7;
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::HeadsDoNotDivide {
                    n_embd: 768,
                    n_head: 7
                }
            ),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("768") && message.contains('7'),
            "{message}"
        );
    }

    #[test]
    fn epsilon_must_be_positive() {
        for value in [0.0, -1e-5, f64::NAN, f64::INFINITY] {
            let mut config = Gpt2Config::small();
            config.layer_norm_epsilon = value;
            let err = config.validate().unwrap_err();
            assert!(
                matches!(err, ConfigError::InvalidEpsilon { .. }),
                "{value}: {err:?}"
            );
            assert!(err.to_string().contains("layer_norm_epsilon"), "{err}");
        }
    }

    #[test]
    fn only_tanh_gelu_is_accepted() {
        let mut config = Gpt2Config::small();
        config.activation_function = "gelu_pytorch_tanh".to_string();
        config.validate().unwrap();
        for name in ["gelu", "relu", "silu"] {
            config.activation_function = name.to_string();
            let err = config.validate().unwrap_err();
            assert!(
                matches!(err, ConfigError::UnsupportedActivation { .. }),
                "{name}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains(name) && message.contains("tanh"),
                "{message}"
            );
        }
    }

    #[test]
    fn model_type_must_be_gpt2() {
        let mut value = small_json();
        value["model_type"] = Value::from("llama");
        let err = parse_value(&value).unwrap_err();
        assert!(
            matches!(err, ConfigError::UnsupportedModelType { .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("llama"), "{err}");
    }

    #[test]
    fn unsupported_attention_options() {
        let mut config = Gpt2Config::small();
        config.scale_attn_by_inverse_layer_idx = true;
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::UnsupportedOption {
                    field: "scale_attn_by_inverse_layer_idx",
                    ..
                }
            ),
            "{err:?}"
        );
        let mut config = Gpt2Config::small();
        config.scale_attn_weights = false;
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::UnsupportedOption {
                    field: "scale_attn_weights",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn token_id_must_fit_vocab() {
        let mut config = Gpt2Config::small();
        config.pad_token_id = Some(50257);
        let err = config.validate().unwrap_err();
        assert!(
            matches!(
                err,
                ConfigError::TokenIdOutOfRange {
                    field: "pad_token_id",
                    value: 50257,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("50257"), "{err}");
    }

    #[test]
    fn inconsistent_labels_are_rejected() {
        let base = Gpt2Config::small();
        let err = base.to_classifier(&[]).unwrap_err();
        assert!(matches!(err, ConfigError::InvalidLabels { .. }), "{err:?}");
        let err = base.to_classifier(&labels(&["a", "b", "a"])).unwrap_err();
        assert!(err.to_string().contains("\"a\""), "{err}");

        let mut config = base.to_classifier(&labels(&["a", "b"])).unwrap();
        config.num_labels = Some(3);
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("num_labels is 3"), "{err}");

        let mut value = small_json();
        value["id2label"] = serde_json::json!({"0": "a", "5": "b"});
        let err = parse_value(&value).unwrap_err();
        assert!(err.to_string().contains("id 5"), "{err}");
    }

    #[test]
    fn overflowing_sizes_are_rejected() {
        let mut config = Gpt2Config::small();
        config.vocab_size = usize::MAX / 2;
        let err = config.validate().unwrap_err();
        assert!(matches!(err, ConfigError::SizeOverflow { .. }), "{err:?}");
        assert_eq!(config.num_params(), usize::MAX);
    }

    #[test]
    fn real_gpt2_config_parses() {
        // The `config.json` of the released 124M GPT-2, as transformers wrote it.
        let text = r#"{"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
            "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
            "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
            "resid_pdrop": 0.1, "summary_activation": null, "vocab_size": 50257}"#;
        let config = Gpt2Config::from_json_str(text).unwrap();
        assert_eq!(config.num_params(), GPT2_SMALL_PARAMS);
        assert_eq!(config.extra["n_ctx"], 1024);
        assert_eq!(config.extra["summary_activation"], Value::Null);
    }
}

/// Returns transformers' names for `count` unnamed classes: `LABEL_0`, `LABEL_1`, ...
pub fn default_label_names(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("LABEL_{i}")).collect()
}
