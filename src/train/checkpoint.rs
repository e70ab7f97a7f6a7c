//! Training checkpoints: weights, AdamW moments and the position of the run, swapped in whole.
//!
//! A checkpoint is a directory `checkpoint/` inside a run's output directory:
//! - `config.json` and `model.safetensors`: the model, loadable as a Hugging Face checkpoint;
//! - `optimizer.safetensors`: the AdamW moments `{weight}.adam_m` and `{weight}.adam_v` (F32,
//!   whole tensors in canonical names) of every trainable weight;
//! - `state.json`: the step, the data position and the run's settings ([`TrainState`]).
//!
//! A new checkpoint is written whole into `checkpoint.partial/`, then swapped in by two renames
//! (`checkpoint` to `checkpoint.previous`, `checkpoint.partial` to `checkpoint`) before the old
//! one is deleted. A crash at any moment leaves a complete checkpoint under one of the two
//! names, and [`find`] looks in both.

use crate::fsutil::write_atomic;
use crate::graph::Session;
use crate::model::config::Gpt2Config;
use crate::model::lora::{self, LoraModule, LoraSpec};
use crate::model::weights::{self, HeadKind, LoadOptions, Weights};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Version of the checkpoint layout; a checkpoint with another version is rejected.
pub const FORMAT_VERSION: u32 = 1;

const DIR: &str = "checkpoint";
const PARTIAL: &str = "checkpoint.partial";
const PREVIOUS: &str = "checkpoint.previous";

/// Errors while writing or reading a checkpoint.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A file could not be written.
    #[error("cannot write checkpoint file {}: {message}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The failure.
        message: String,
    },
    /// No checkpoint in the directory.
    #[error("{} contains no checkpoint (no checkpoint/state.json); pass the --out directory of an earlier run", .dir.display())]
    Missing {
        /// The directory searched.
        dir: PathBuf,
    },
    /// A checkpoint file is unreadable or does not match the run.
    #[error("checkpoint {}: {message}", .path.display())]
    Invalid {
        /// The offending file.
        path: PathBuf,
        /// The problem and the next step.
        message: String,
    },
    /// Reading state from the device failed.
    #[error(transparent)]
    Gpu(#[from] crate::gpu::GpuError),
}

/// Position of a run, enough to continue it bit for bit.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Command that wrote it: `pretrain` or `train`.
    pub kind: String,
    /// Optimizer steps taken; the learning-rate schedule and the data position use it.
    pub step: u64,
    /// AdamW's step count t, where it is below `step`: an update skipped for a NaN or infinite
    /// gradient does not count. Absent when it equals `step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_steps: Option<u64>,
    /// Run settings as the command stored them; a resumed run reuses them.
    pub settings: serde_json::Value,
    /// Identity of the training data (token count and hash), so that a resume on other data is
    /// refused instead of silently changing the batches.
    pub data_fingerprint: String,
    /// Command-specific progress (losses so far, best validation loss ...).
    pub progress: serde_json::Value,
}

/// Returns the directory of the newest complete checkpoint under `run_dir`.
///
/// # Errors
///
/// [`CheckpointError::Missing`] when neither `checkpoint/` nor `checkpoint.previous/` contains a
/// state.json.
pub fn find(run_dir: &Path) -> Result<PathBuf, CheckpointError> {
    for name in [DIR, PREVIOUS] {
        let dir = run_dir.join(name);
        if dir.join("state.json").is_file() {
            return Ok(dir);
        }
    }
    Err(CheckpointError::Missing { dir: run_dir.to_path_buf() })
}

/// Writes a checkpoint of `session` (weights from `weights` after download, AdamW moments read
/// from the device) and `state` into `run_dir/checkpoint/`, replacing the previous one.
///
/// # Errors
///
/// A failed write or device read. The previous checkpoint then stays in place.
pub fn save(
    run_dir: &Path,
    session: &Session<'_>,
    weights: &Weights,
    config: &Gpt2Config,
    state: &TrainState,
    adapter: Option<(&LoraSpec, &[LoraModule], &str, &[String])>,
) -> Result<PathBuf, CheckpointError> {
    let partial = run_dir.join(PARTIAL);
    let write_err = |path: &Path, message: String| CheckpointError::Write { path: path.to_path_buf(), message };
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| write_err(&partial, e.to_string()))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| write_err(&partial, e.to_string()))?;

    config.save(&partial).map_err(|e| write_err(&partial.join("config.json"), e.to_string()))?;
    match adapter {
        // The base weights are frozen and stay in the model directory; the adapter (with the
        // head) is all that changes.
        Some((spec, modules, base_model, labels)) => lora::save_adapter(&partial, spec, modules, weights, base_model, Some(labels))
            .map_err(|e| write_err(&partial.join(lora::ADAPTER_WEIGHTS_FILE), e.to_string()))?,
        None => {
            let model_path = partial.join("model.safetensors");
            weights::save(&model_path, weights, config, true).map_err(|e| write_err(&model_path, e.to_string()))?;
        }
    }

    let mut moments: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (name, tensor) in &weights.tensors {
        for suffix in [".adam_m", ".adam_v"] {
            if let Some(values) = session.read_param_state(name, suffix, tensor.data.len())? {
                moments.push((format!("{name}{suffix}"), tensor.shape.clone(), values));
            }
        }
    }
    let optimizer_path = partial.join("optimizer.safetensors");
    write_f32_tensors(&optimizer_path, &moments).map_err(|message| write_err(&optimizer_path, message))?;

    let state_path = partial.join("state.json");
    let text = serde_json::to_string_pretty(state).expect("train state serializes");
    write_atomic(&state_path, text.as_bytes()).map_err(|e| write_err(&state_path, e.to_string()))?;

    let dir = run_dir.join(DIR);
    let previous = run_dir.join(PREVIOUS);
    if previous.exists() {
        std::fs::remove_dir_all(&previous).map_err(|e| write_err(&previous, e.to_string()))?;
    }
    if dir.exists() {
        std::fs::rename(&dir, &previous).map_err(|e| write_err(&dir, e.to_string()))?;
    }
    std::fs::rename(&partial, &dir).map_err(|e| write_err(&dir, e.to_string()))?;
    if previous.exists() {
        std::fs::remove_dir_all(&previous).map_err(|e| write_err(&previous, e.to_string()))?;
    }
    Ok(dir)
}

/// A checkpoint read from disk.
pub struct Loaded {
    /// Its directory.
    pub dir: PathBuf,
    /// The model configuration.
    pub config: Gpt2Config,
    /// The weights.
    pub weights: Weights,
    /// AdamW moments by `{weight}.adam_m` / `{weight}.adam_v`.
    pub moments: HashMap<String, Vec<f32>>,
    /// Position of the run.
    pub state: TrainState,
    /// The adapter of a LoRA run; `weights` then holds only its tensors and the head.
    pub adapter: Option<lora::Adapter>,
}

/// Reads the newest checkpoint under `run_dir` for a model with `head`, checking that it was
/// written by `kind`.
///
/// # Errors
///
/// A missing checkpoint, another format version or kind, or an unreadable or inconsistent file.
pub fn load(run_dir: &Path, kind: &str, head: HeadKind) -> Result<Loaded, CheckpointError> {
    let dir = find(run_dir)?;
    let invalid = |path: &Path, message: String| CheckpointError::Invalid { path: path.to_path_buf(), message };
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| invalid(&state_path, e.to_string()))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| invalid(&state_path, format!("not a train state: {e}")))?;
    if state.format_version != FORMAT_VERSION {
        return Err(invalid(
            &state_path,
            format!("format version {} but this build reads version {FORMAT_VERSION}", state.format_version),
        ));
    }
    if state.kind != kind {
        return Err(invalid(
            &state_path,
            format!("written by `shadertune {}`, so it cannot resume `shadertune {kind}`", state.kind),
        ));
    }
    let config_path = dir.join("config.json");
    let config = Gpt2Config::from_file(&config_path).map_err(|e| invalid(&config_path, e.to_string()))?;
    let (weights, adapter) = if dir.join(lora::ADAPTER_CONFIG_FILE).is_file() {
        let num_labels = match head {
            HeadKind::Classifier { num_labels } => Some(num_labels),
            HeadKind::LanguageModel => None,
        };
        let adapter = lora::load_adapter(&dir, &config, num_labels).map_err(|e| invalid(&dir, e.to_string()))?;
        (adapter.weights.clone(), Some(adapter))
    } else {
        let model_path = dir.join("model.safetensors");
        let weights = weights::load(&model_path, &config, head, LoadOptions::default()).map_err(|e| invalid(&model_path, e.to_string()))?;
        (weights, None)
    };
    let optimizer_path = dir.join("optimizer.safetensors");
    let moments = read_f32_tensors(&optimizer_path, &weights).map_err(|message| invalid(&optimizer_path, message))?;
    Ok(Loaded { dir, config, weights, moments, state, adapter })
}

/// Uploads the AdamW moments of `loaded` into `session` and restores its step count.
///
/// # Errors
///
/// A trainable weight of the session without stored moments (the checkpoint was written with
/// another set of trainable weights), or a device error.
pub fn restore_optimizer(session: &mut Session<'_>, loaded: &Loaded) -> Result<(), CheckpointError> {
    for (name, tensor) in &loaded.weights.tensors {
        for suffix in [".adam_m", ".adam_v"] {
            let key = format!("{name}{suffix}");
            let zeros;
            let values = match loaded.moments.get(&key) {
                Some(v) => v.as_slice(),
                None => {
                    zeros = vec![0.0f32; tensor.data.len()];
                    &zeros
                }
            };
            let trainable = session.write_param_state(name, suffix, values)?;
            if trainable && !loaded.moments.contains_key(&key) {
                return Err(CheckpointError::Invalid {
                    path: loaded.dir.join("optimizer.safetensors"),
                    message: format!("no `{key}`: the checkpoint was written with other trainable weights; resume with the same --train"),
                });
            }
        }
    }
    session.set_optimizer_steps(loaded.state.step, loaded.state.applied_steps.unwrap_or(loaded.state.step));
    Ok(())
}

fn write_f32_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<(), String> {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, data)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(data)).map_err(|e| e.to_string())?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_, String>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| e.to_string())?;
    write_atomic(path, &bytes).map_err(|e| e.to_string())
}

/// Reads `{weight}.adam_m`/`.adam_v` tensors, each F32 with its weight's shape.
fn read_f32_tensors(path: &Path, weights: &Weights) -> Result<HashMap<String, Vec<f32>>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| format!("not a safetensors file: {e}"))?;
    let mut out = HashMap::new();
    for (name, view) in file.tensors() {
        let weight = name.strip_suffix(".adam_m").or_else(|| name.strip_suffix(".adam_v")).ok_or_else(|| {
            format!("unexpected tensor `{name}`: expected `{{weight}}.adam_m` or `{{weight}}.adam_v`")
        })?;
        let tensor = weights.get(weight).ok_or_else(|| format!("`{name}` names no weight of the model"))?;
        if view.dtype() != Dtype::F32 || view.shape() != tensor.shape.as_slice() {
            return Err(format!(
                "`{name}` is {:?} {:?}, expected F32 {:?} like its weight",
                view.dtype(),
                view.shape(),
                tensor.shape
            ));
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        out.insert(name, values);
    }
    Ok(out)
}
