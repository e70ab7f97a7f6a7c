//! Opening a model directory: config, weights (or random init), tokenizer.

use crate::data::Gpt2Tokenizer;
use crate::model::config::Gpt2Config;
use crate::model::weights::{self, HeadKind, LoadOptions, Weights};
use std::path::{Path, PathBuf};

/// Errors while opening a model directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// config.json is missing or invalid.
    #[error("{}: {error}", .path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What was wrong.
        error: crate::model::config::ConfigError,
    },
    /// model.safetensors is missing, truncated or does not match the config.
    #[error(transparent)]
    Weights(#[from] crate::model::weights::LoadError),
    /// The tokenizer files are missing or invalid.
    #[error(transparent)]
    Tokenizer(#[from] crate::data::DataError),
    /// The tokenizer produces ids the model has no embedding for.
    #[error("{}: the tokenizer has {tokenizer} tokens but config.json gives vocab_size {model}; use the tokenizer the model was trained with", .dir.display())]
    VocabMismatch {
        /// The model directory.
        dir: PathBuf,
        /// Tokenizer vocabulary size.
        tokenizer: usize,
        /// Model vocab_size.
        model: usize,
    },
    /// A classifier checkpoint was given where a language model is needed.
    #[error("{} describes a sequence classifier (GPT2ForSequenceClassification); generation and pretraining need a language model such as the base model it was fine-tuned from", .path.display())]
    NotLanguageModel {
        /// The config file.
        path: PathBuf,
    },
    /// The checkpoint already has a classification head for other labels.
    #[error("{} has a classification head for {found} labels but the data has {expected} ({labels}); start from the base model instead", .path.display())]
    HeadMismatch {
        /// The checkpoint.
        path: PathBuf,
        /// Labels of the stored head.
        found: usize,
        /// Labels in the data.
        expected: usize,
        /// The data's labels.
        labels: String,
    },
}

/// Returns the directory of bundled assets: `$SHADERTUNE_ASSETS`, else `assets/` of the source tree the
/// binary was built from.
pub fn assets_dir() -> PathBuf {
    match std::env::var_os("SHADERTUNE_ASSETS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets")),
    }
}

/// Returns the model directory that `train` uses when no `--model` is given.
pub fn default_model_dir() -> PathBuf {
    assets_dir().join("models").join("gpt2-tiny")
}

/// A model opened from a directory.
pub struct LoadedModel {
    /// The directory it came from.
    pub dir: PathBuf,
    /// Its configuration.
    pub config: Gpt2Config,
    /// Its weights in canonical names, head included.
    pub weights: Weights,
    /// Its tokenizer (the bundled GPT-2 tokenizer when the directory has none).
    pub tokenizer: Gpt2Tokenizer,
    /// True when the directory had no weights and they were initialised randomly.
    pub random_init: bool,
    /// True when the classification head was initialised here.
    pub new_head: bool,
}

fn load_tokenizer(dir: &Path) -> Result<Gpt2Tokenizer, ModelError> {
    let has_own = dir.join("tokenizer.json").exists() || dir.join("vocab.json").exists();
    if has_own {
        return Ok(Gpt2Tokenizer::from_dir(dir)?);
    }
    let bundled = assets_dir().join("tokenizer");
    log::info!("{} has no tokenizer files; using the bundled GPT-2 tokenizer", dir.display());
    Ok(Gpt2Tokenizer::from_dir(&bundled)?)
}

/// Opens `dir` as a language model (GPT2LMHeadModel layout, head tied to wte) for generation or
/// further pretraining. A directory with only a config.json gets random weights from `seed`.
///
/// # Errors
///
/// A missing or invalid config, tokenizer or weights file, or a classifier checkpoint (its
/// `score` head cannot predict tokens).
pub fn open_language_model(dir: &Path, seed: u64) -> Result<LoadedModel, ModelError> {
    let config_path = dir.join("config.json");
    let config =
        Gpt2Config::from_file(&config_path).map_err(|error| ModelError::Config { path: config_path.clone(), error })?;
    let is_classifier = config.architectures.iter().flatten().any(|a| a == "GPT2ForSequenceClassification");
    if is_classifier {
        return Err(ModelError::NotLanguageModel { path: config_path });
    }
    let tokenizer = load_tokenizer(dir)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::VocabMismatch { dir: dir.to_path_buf(), tokenizer: tokenizer.vocab_size(), model: config.vocab_size });
    }
    let weights_path = dir.join("model.safetensors");
    if !weights_path.exists() {
        let weights = weights::init_random(&config, HeadKind::LanguageModel, seed)
            .map_err(|error| ModelError::Config { path: config_path.clone(), error })?;
        return Ok(LoadedModel { dir: dir.to_path_buf(), config, weights, tokenizer, random_init: true, new_head: false });
    }
    let weights = weights::load(&weights_path, &config, HeadKind::LanguageModel, LoadOptions::default())?;
    Ok(LoadedModel { dir: dir.to_path_buf(), config, weights, tokenizer, random_init: false, new_head: false })
}

/// Opens `dir` for a classifier with `num_labels` classes. Missing weights are initialised with
/// GPT-2's scheme from `seed`; a missing `score.weight` is initialised the same way.
pub fn open_classifier(dir: &Path, num_labels: usize, seed: u64) -> Result<LoadedModel, ModelError> {
    let config_path = dir.join("config.json");
    let mut config =
        Gpt2Config::from_file(&config_path).map_err(|error| ModelError::Config { path: config_path.clone(), error })?;
    let is_classifier = config.architectures.iter().flatten().any(|a| a == "GPT2ForSequenceClassification");
    if !is_classifier {
        // transformers writes placeholder labels (LABEL_0, LABEL_1) into every config; they
        // mean nothing for a language model, whose new head takes the data's labels.
        config.num_labels = None;
        config.id2label = None;
        config.label2id = None;
    }
    let tokenizer = load_tokenizer(dir)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::VocabMismatch { dir: dir.to_path_buf(), tokenizer: tokenizer.vocab_size(), model: config.vocab_size });
    }
    let head = HeadKind::Classifier { num_labels };
    let weights_path = dir.join("model.safetensors");
    if !weights_path.exists() {
        let weights = weights::init_random(&config, head, seed)
            .map_err(|error| ModelError::Config { path: config_path.clone(), error })?;
        return Ok(LoadedModel { dir: dir.to_path_buf(), config, weights, tokenizer, random_init: true, new_head: true });
    }
    if let (true, Some(found)) = (is_classifier, config.label_count()) {
        if found != num_labels {
            return Err(ModelError::HeadMismatch {
                path: config_path,
                found,
                expected: num_labels,
                labels: String::new(),
            });
        }
    }
    let mut weights = weights::load(&weights_path, &config, head, LoadOptions { allow_missing_head: true })?;
    let new_head = weights.get("score.weight").is_none();
    if new_head {
        weights.insert("score.weight", weights::init_score(&config, num_labels, seed));
    }
    Ok(LoadedModel { dir: dir.to_path_buf(), config, weights, tokenizer, random_init: false, new_head })
}
