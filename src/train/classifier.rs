//! Fine-tuning a GPT into a text classifier: data, training loop, evaluation and the report card.

use super::eval::{evaluate, Evaluation};
use super::metrics::SplitMetrics;
use super::report::{self, HistoryRecord};
use super::schedule::{learning_rate, Schedule};
use crate::data::{self, Balance, BatchIter, EncodedExamples, ReadOptions};
use crate::fsutil::write_atomic;
use crate::gpu::{Gpu, GpuError};
use crate::graph::executor::OptimizerSettings;
use crate::graph::Session;
use crate::model::gpt2::{build_graph_with, check_f16, BatchShape, Head, Precision, Trainable};
use crate::model::lora::{self, LoraError, LoraModule, LoraSpec};
use crate::model::load::{open_classifier, ModelError};
use crate::model::weights::HeadKind;
use crate::train::checkpoint::{self, TrainState};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Errors of a training or evaluation run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// The data could not be read or prepared.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// The model could not be opened.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The device failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// An output could not be written.
    #[error("failed to write {}: {message}", .path.display())]
    Write {
        /// The output path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The loss became NaN or infinite.
    #[error(
        "the training loss became {loss} at step {step} (last finite loss {last_finite:?}); {checkpoint}. Lower --lr or set --clip-grad-norm, then resume with --resume, or pass --on-nan skip"
    )]
    NonFinite {
        /// Optimizer step.
        step: usize,
        /// The non-finite value.
        loss: f32,
        /// The last finite loss seen.
        last_finite: Option<f32>,
        /// Location of the checkpoint of the last good state.
        checkpoint: String,
    },
    /// The run was interrupted (Ctrl-C) and left a checkpoint.
    #[error("stopped at step {step} of {total}; the checkpoint is in {}. Continue with: shadertune train --resume {}", .checkpoint.display(), .out.display())]
    Stopped {
        /// Steps done.
        step: usize,
        /// Steps planned.
        total: usize,
        /// The checkpoint directory.
        checkpoint: PathBuf,
        /// The run's output directory.
        out: PathBuf,
    },
    /// A checkpoint could not be written or read, or does not match the run.
    #[error(transparent)]
    Checkpoint(#[from] crate::train::checkpoint::CheckpointError),
    /// The device failed during a training step (lost, out of memory, driver error).
    #[error("training step {step} failed: {error}; {checkpoint}")]
    DeviceFailed {
        /// Optimizer step that failed.
        step: usize,
        /// The device error.
        error: GpuError,
        /// The location of the last checkpoint and the command that continues from it.
        checkpoint: String,
    },
    /// LoRA settings or an adapter file are invalid.
    #[error(transparent)]
    Lora(#[from] LoraError),
}

/// Action of a run on a batch with a NaN or infinite loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnNan {
    /// Stop with an error after writing a checkpoint of the last good state.
    #[default]
    Stop,
    /// Skip the batch (its update is discarded on the device) and go on.
    Skip,
}

impl std::str::FromStr for OnNan {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stop" => Ok(OnNan::Stop),
            "skip" => Ok(OnNan::Skip),
            other => Err(format!("invalid --on-nan `{other}`, expected stop or skip")),
        }
    }
}

/// Everything a fine-tuning run needs. Defaults follow the GPT-2 small spam recipe: AdamW lr
/// 5e-5, weight decay 0.1, 5 epochs of batch 8, last block + final norm + head trainable.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// Model directory (config.json, optional model.safetensors, optional tokenizer).
    pub model_dir: PathBuf,
    /// Labelled data file or directory.
    pub data: PathBuf,
    /// Column and format selection.
    pub read: ReadOptions,
    /// Label balancing before the split.
    pub balance: Balance,
    /// Train, validation and test fractions.
    pub split: [f64; 3],
    /// Seed of balancing, splitting, shuffling and initialisation.
    pub seed: u64,
    /// Token cap per example; `None` uses the longest training example (capped at n_positions).
    pub max_length: Option<usize>,
    /// Parameters to train.
    pub trainable: Trainable,
    /// Peak learning rate.
    pub lr: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Passes over the training split.
    pub epochs: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Linear warm-up length in optimizer steps.
    pub warmup_steps: usize,
    /// Learning rate after warm-up.
    pub schedule: Schedule,
    /// Clip gradients to this global norm.
    pub clip_grad_norm: Option<f32>,
    /// Evaluate every this many optimizer steps.
    pub eval_every: usize,
    /// Batches per split in the periodic evaluation.
    pub eval_batches: usize,
    /// Output directory.
    pub out_dir: PathBuf,
    /// Optimizer steps between checkpoints in `out_dir/checkpoint/` (0: only at the end).
    pub save_every: usize,
    /// Continue from the checkpoint in `out_dir` instead of starting over.
    pub resume: bool,
    /// Action on a NaN or infinite loss.
    pub on_nan: OnNan,
    /// Set from another thread (Ctrl-C) to stop at the next step with a checkpoint.
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// The run's command line, stored in checkpoints so that a resume can repeat the run.
    pub command: Vec<String>,
    /// The directory the command ran in, against which its relative paths resolve.
    pub working_dir: Option<PathBuf>,
    /// Train LoRA adapters on the targeted layers instead of the base weights, which stay
    /// frozen; `trainable` must then be [`Trainable::Head`].
    pub lora: Option<LoraSpec>,
    /// Storage of the frozen linear weights on the device.
    pub precision: Precision,
}

impl TrainConfig {
    /// Creates the default settings for a model and data set.
    pub fn new(model_dir: PathBuf, data: PathBuf, out_dir: PathBuf) -> Self {
        TrainConfig {
            model_dir,
            data,
            read: ReadOptions::default(),
            balance: Balance::Undersample,
            split: [0.7, 0.1, 0.2],
            seed: 123,
            max_length: None,
            trainable: Trainable::LastBlocks(1),
            precision: Precision::F32,
            lr: 5e-5,
            weight_decay: 0.1,
            epochs: 5,
            batch_size: 8,
            grad_accum: 1,
            warmup_steps: 0,
            schedule: Schedule::Constant,
            clip_grad_norm: None,
            eval_every: 50,
            eval_batches: 5,
            out_dir,
            save_every: 0,
            resume: false,
            on_nan: OnNan::Stop,
            stop: None,
            command: Vec::new(),
            working_dir: None,
            lora: None,
        }
    }
}

/// Each batch runs on the positions its longest row needs, rounded up to a multiple of this and
/// capped at the split's sequence length T, so a run builds at most one shorter pass per multiple
/// of 8 below T. Most texts are far shorter than the longest one, which sets T.
pub(crate) const POSITION_MULTIPLE: usize = 8;

/// Optimizer steps whose losses the host reads in one transfer on a GPU. The device runs ahead
/// of the host by at most this many steps, and a non-finite loss is noticed within as many.
const LOSS_READ_EVERY: usize = 10;

/// Environment variable that sets the steps between loss reads on any adapter, for tests of the
/// deferred reads on CPU drivers.
pub const LOSS_READ_VARIABLE: &str = "SHADERTUNE_LOSS_READ_EVERY";

/// Sizes of the data at each stage, for `metrics.json`.
#[derive(Clone, Debug, Serialize)]
pub struct DatasetSummary {
    /// Data file or directory.
    pub path: String,
    /// Rows read.
    pub rows: usize,
    /// Rows of each label as read.
    pub rows_per_label: BTreeMap<String, usize>,
    /// Rows kept by balancing.
    pub rows_after_balancing: usize,
    /// Train, validation and test sizes.
    pub split_sizes: BTreeMap<String, usize>,
    /// Tokens per sequence.
    pub max_length: usize,
    /// Examples cut to `max_length`.
    pub truncated: usize,
}

/// Run details for `metrics.json`.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    /// Model directory.
    pub model: String,
    /// Adapter directory, when an adapter was trained.
    pub adapter: Option<String>,
    /// Adapter name, backend and driver.
    pub backend: String,
    /// Wall-clock seconds of the whole run.
    pub seconds: f64,
    /// Trainable parameters.
    pub trainable_parameters: u64,
    /// Frozen parameters.
    pub frozen_parameters: u64,
    /// Trainable set.
    pub train: String,
    /// Storage of the frozen linear weights.
    pub precision: Precision,
    /// Optimizer steps taken.
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f32,
    /// Epochs.
    pub epochs: usize,
    /// Batch size.
    pub batch_size: usize,
    /// Seed.
    pub seed: u64,
    /// True when the model started from random weights.
    pub random_init: bool,
}

/// The report card written to `metrics.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Metrics on the training split.
    pub train: SplitMetrics,
    /// Metrics on the validation split.
    pub validation: SplitMetrics,
    /// Metrics on the test split.
    pub test: SplitMetrics,
    /// Data sizes.
    pub dataset: DatasetSummary,
    /// Run details.
    pub run: RunSummary,
}

/// Checks before any work that the output directory can be written.
pub fn check_output_dir(dir: &Path) -> Result<(), TrainError> {
    let err = |e: std::io::Error| TrainError::Write { path: dir.to_path_buf(), message: format!("{e}; choose another --out") };
    std::fs::create_dir_all(dir).map_err(err)?;
    let probe = tempfile::NamedTempFile::new_in(dir).map_err(err)?;
    drop(probe);
    Ok(())
}

/// Writes each split as JSON Lines (`{"text": ..., "label": ...}` per line) under `dir/splits/`,
/// so that any split can be evaluated again with `shadertune eval`.
fn write_splits(dir: &Path, splits: &data::Splits) -> Result<(), TrainError> {
    for (name, examples) in [("train", &splits.train), ("validation", &splits.validation), ("test", &splits.test)] {
        let mut text = String::new();
        for e in examples.iter() {
            let line = serde_json::json!({ "text": e.text, "label": e.label });
            text.push_str(&line.to_string());
            text.push('\n');
        }
        let path = dir.join("splits").join(format!("{name}.jsonl"));
        write_atomic(&path, text.as_bytes()).map_err(|e| TrainError::Write { path: path.clone(), message: e.to_string() })?;
    }
    Ok(())
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).expect("report structs serialize");
    write_atomic(path, text.as_bytes()).map_err(|e| TrainError::Write { path: path.to_path_buf(), message: e.to_string() })
}

/// Fine-tunes a classifier with the settings in `config` and writes the model and report card to its output
/// directory. Returns the report.
pub fn train_classifier(gpu: &Gpu, config: &TrainConfig) -> Result<Report, TrainError> {
    let started = Instant::now();
    if config.batch_size == 0 || config.epochs == 0 || config.grad_accum == 0 || config.eval_every == 0 {
        return Err(TrainError::Invalid("--batch-size, --epochs, --grad-accum and --eval-every must be at least 1".into()));
    }
    if let Some(clip) = config.clip_grad_norm.filter(|c| !(c.is_finite() && *c > 0.0)) {
        return Err(TrainError::Invalid(format!(
            "--clip-grad-norm {clip} is invalid: expected a positive number, such as 1.0 (leave it out for no clipping)"
        )));
    }
    data::validate_fractions(config.split)?;
    check_output_dir(&config.out_dir)?;

    let dataset = data::read_labelled(&config.data, &config.read)?;
    log::info!(
        "data: {} rows from {} ({})",
        dataset.rows_read,
        config.data.display(),
        dataset.rows_per_label.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", ")
    );
    let labels = dataset.label_names.clone();
    let balanced = data::balance(dataset.examples.clone(), config.balance, config.seed);
    let rows_after_balancing = balanced.len();
    let splits = data::split(balanced, config.split, config.seed)?;
    write_splits(&config.out_dir, &splits)?;

    let model = open_classifier(&config.model_dir, labels.len(), config.seed)?;
    if model.random_init {
        log::warn!(
            "{} has no model.safetensors: starting from random weights; frozen random layers carry no knowledge, so train with --train all",
            config.model_dir.display()
        );
    }
    let n_positions = model.config.n_positions;
    let train_data = data::encode_examples(&model.tokenizer, &splits.train, &labels, config.max_length, n_positions)?;
    // Validation and test use the training sequence length, so one graph serves all splits.
    let seq_len = train_data.seq_len;
    let encode = |examples| data::encode_examples(&model.tokenizer, examples, &labels, Some(seq_len), n_positions);
    let val_data = encode(&splits.validation)?;
    let test_data = encode(&splits.test)?;
    let val_data = EncodedExamples { seq_len, ..val_data };
    let test_data = EncodedExamples { seq_len, ..test_data };
    let truncated = train_data.truncated + val_data.truncated + test_data.truncated;
    log::info!(
        "split: {} train, {} validation, {} test; {} tokens per sequence, {} truncated",
        splits.train.len(),
        splits.validation.len(),
        splits.test.len(),
        seq_len,
        if truncated == 1 { "1 example".to_string() } else { format!("{truncated} examples") }
    );
    if let Trainable::LastBlocks(n) = config.trainable {
        if n > model.config.n_layer {
            return Err(TrainError::Invalid(format!(
                "--train last-blocks:{n} asks for more blocks than the model has ({})",
                model.config.n_layer
            )));
        }
    }

    let lora_modules: Option<Vec<LoraModule>> = match &config.lora {
        Some(spec) => {
            if config.trainable != Trainable::Head {
                return Err(TrainError::Invalid(format!(
                    "--train {} cannot be combined with LoRA: the base model stays frozen and only the adapters and the head train; drop --train",
                    config.trainable
                )));
            }
            if spec.quantize_base && config.precision == Precision::F16 {
                return Err(TrainError::Invalid(crate::model::gpt2::F16_WITH_QUANTIZE.into()));
            }
            if spec.quantize_base {
                lora::check_quantizable(&model.config)?;
            }
            Some(spec.modules(&model.config)?)
        }
        None => None,
    };
    let base_name = config.model_dir.display().to_string();
    let adapter_of = || config.lora.as_ref().zip(lora_modules.as_deref()).map(|(s, m)| (s, m, base_name.as_str(), labels.as_slice()));

    let head = Head::Classifier { num_labels: labels.len() };
    let fingerprint = data_fingerprint(&splits, seq_len);
    let resumed = if config.resume {
        let loaded = checkpoint::load(&config.out_dir, "train", HeadKind::Classifier { num_labels: labels.len() })?;
        check_resume(&loaded, &model.config, &fingerprint)?;
        Some(loaded)
    } else {
        None
    };
    let shape = BatchShape { batch: config.batch_size, seq_len };
    let max_binding = gpu.limits().max_storage_buffer_binding_size;
    if config.precision == Precision::F16 {
        check_f16(&model.config).map_err(TrainError::Invalid)?;
        crate::model::gpt2::check_f16_adapter(gpu).map_err(TrainError::Invalid)?;
        let all_blocks_train = match config.trainable {
            Trainable::All => true,
            Trainable::LastBlocks(n) => n >= model.config.n_layer,
            Trainable::Head | Trainable::Nothing => false,
        };
        if all_blocks_train && config.lora.is_none() {
            log::warn!("--precision f16 stores frozen linear weights in f16, but --train {} freezes none; the run is the same as with f32", config.trainable);
        }
    }
    let graph = build_graph_with(&model.config, head, shape, config.trainable, config.lora.as_ref(), config.precision, max_binding);
    let settings = OptimizerSettings {
        weight_decay: config.weight_decay,
        clip_grad_norm: config.clip_grad_norm,
        ..OptimizerSettings::default()
    };
    // A LoRA run starts from the base weights plus fresh adapters; a resumed LoRA checkpoint
    // holds only the adapters and the head.
    let mut start_weights = match &resumed {
        Some(loaded) if loaded.adapter.is_none() => loaded.weights.clone(),
        _ => model.weights.clone(),
    };
    if let (Some(spec), Some(modules)) = (&config.lora, &lora_modules) {
        let adapter = match &resumed {
            Some(loaded) if loaded.adapter.is_some() => loaded.weights.clone(),
            Some(loaded) => {
                return Err(TrainError::Invalid(format!(
                    "{}: the checkpoint contains a full model, not LoRA adapters; resume with the original command",
                    loaded.dir.display()
                )))
            }
            None => lora::init_adapter(spec, modules, config.seed),
        };
        for (name, tensor) in adapter.tensors {
            start_weights.insert(name, tensor);
        }
    }
    let mut session = Session::new(gpu, graph, &start_weights, true, settings)?;
    session.set_dropout_seed(config.seed);
    let (model_config, lora, trainable, precision) = (model.config.clone(), config.lora.clone(), config.trainable, config.precision);
    session.allow_shorter_batches(
        POSITION_MULTIPLE,
        Box::new(move |seq_len| {
            let shape = BatchShape { batch: shape.batch, seq_len };
            build_graph_with(&model_config, head, shape, trainable, lora.as_ref(), precision, max_binding)
        }),
    );
    let mut progress_state = RunProgress::default();
    if let Some(loaded) = &resumed {
        checkpoint::restore_optimizer(&mut session, loaded)?;
        progress_state = serde_json::from_value(loaded.state.progress.clone()).unwrap_or_default();
        log::info!("resuming from {} at step {}", loaded.dir.display(), loaded.state.step);
    }
    let summary = session.summary();
    log::info!(
        "model: {} ({} layers, n_embd {}), {} trainable and {} frozen parameters ({})",
        config.model_dir.display(),
        model.config.n_layer,
        model.config.n_embd,
        summary.trainable_params,
        summary.frozen_params,
        config.trainable
    );

    let batches_per_epoch = train_data.examples.len() / config.batch_size;
    if batches_per_epoch == 0 {
        return Err(TrainError::Invalid(format!(
            "the training split has {} examples, fewer than one batch of {}; lower --batch-size",
            train_data.examples.len(),
            config.batch_size
        )));
    }
    let total_steps = (batches_per_epoch * config.epochs).div_ceil(config.grad_accum);
    let history_path = config.out_dir.join("history.jsonl");
    let _ = std::fs::remove_file(&history_path);
    let mut history = progress_state.history.clone();
    for record in &history {
        report::append_history(&history_path, record)
            .map_err(|e| TrainError::Write { path: history_path.clone(), message: e.to_string() })?;
    }
    let mut weights_host = start_weights.clone();
    let save_checkpoint = |session: &Session<'_>, weights: &mut crate::model::weights::Weights, step: usize, progress: &RunProgress| {
        session.download_weights(weights)?;
        let applied = session.applied_optimizer_steps()?;
        let state = TrainState {
            format_version: checkpoint::FORMAT_VERSION,
            kind: "train".into(),
            step: step as u64,
            applied_steps: (applied != step as u64).then_some(applied),
            settings: serde_json::json!({ "command": config.command, "working_dir": config.working_dir }),
            data_fingerprint: fingerprint.clone(),
            progress: serde_json::to_value(progress).expect("progress serializes"),
        };
        let classifier_config = model
            .config
            .to_classifier(&labels)
            .map_err(|e| TrainError::Write { path: config.out_dir.join("checkpoint"), message: e.to_string() })?;
        let dir = checkpoint::save(&config.out_dir, session, weights, &classifier_config, &state, adapter_of())?;
        Ok::<PathBuf, TrainError>(dir)
    };
    let progress = indicatif::ProgressBar::new(total_steps as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("progress template is valid"),
    );
    let num_labels = labels.len();
    let mut step = progress_state.step;
    let first_step = step;
    let mut micro = 0usize;
    let skip_micro = step * config.grad_accum;
    progress.set_position(step as u64);
    let train_started = Instant::now();
    let stop_requested = || config.stop.as_ref().is_some_and(|s| s.load(std::sync::atomic::Ordering::SeqCst));
    let mut stopped = false;
    // On a GPU the host reads the losses of LOSS_READ_EVERY steps in one transfer, and between
    // reads and evaluations it submits each step without waiting for the one before. A CPU
    // driver runs each dispatch on all cores and waits for the slowest, so there a host thread
    // that runs ahead only slows the device: the host waits for every step.
    let requested = std::env::var(LOSS_READ_VARIABLE).ok();
    let loss_read_every = match requested.as_deref().map(str::parse::<usize>) {
        Some(Ok(steps)) if steps > 0 => steps,
        Some(_) => {
            return Err(TrainError::Invalid(format!(
                "{LOSS_READ_VARIABLE}={} is invalid: expected a whole number of steps, 1 or more",
                requested.unwrap_or_default()
            )))
        }
        None if gpu.info().device_type == wgpu::DeviceType::Cpu => 1,
        None => LOSS_READ_EVERY,
    };
    session.log_losses(loss_read_every * config.grad_accum)?;
    let device_failed = |error: GpuError, step: usize| {
        // The device state is gone, so the last checkpoint on disk is what remains.
        progress.finish_and_clear();
        let checkpoint = match checkpoint::find(&config.out_dir) {
            Ok(dir) => format!("the last checkpoint is in {}; continue with: shadertune train --resume {}", dir.display(), config.out_dir.display()),
            Err(_) => "no checkpoint was written yet (set --save-every to write them during training)".to_string(),
        };
        TrainError::DeviceFailed { step, error, checkpoint }
    };
    // Reads the logged losses into the progress, and stops the run at a non-finite one unless
    // --on-nan skips it. The optimizer skipped that step's update on the device and applied the
    // later ones, so the weights are finite and a checkpoint of them is the last good state.
    let read_losses = |session: &mut Session<'_>, weights: &mut crate::model::weights::Weights, progress_state: &mut RunProgress, micro: usize, step: usize| {
        let losses = session.drain_losses().map_err(|error| device_failed(error, step))?;
        let first = micro + 1 - losses.len();
        for (i, out) in losses.iter().enumerate() {
            let loss_step = (first + i - 1) / config.grad_accum + 1;
            if out.loss.is_finite() {
                progress_state.last_finite = Some(out.loss);
                progress_state.running_loss += f64::from(out.loss);
                progress_state.running_count += 1;
                continue;
            }
            if config.on_nan == OnNan::Skip {
                progress.suspend(|| log::warn!("skipping a batch with loss {} at step {loss_step}", out.loss));
                progress_state.skipped_batches += 1;
                continue;
            }
            progress.finish_and_clear();
            let dir = save_checkpoint(session, weights, step, progress_state)?;
            let checkpoint = format!(
                "AdamW skips every update whose gradient norm is not finite, and a checkpoint of the last good state (step {step}) is in {}, from which a resumed run goes on with step {}",
                dir.display(),
                step + 1
            );
            return Err(TrainError::NonFinite { step: loss_step, loss: out.loss, last_finite: progress_state.last_finite, checkpoint });
        }
        Ok(())
    };
    'epochs: for epoch in 0..config.epochs {
        for batch in BatchIter::train(&train_data, config.batch_size, config.seed, epoch as u64)? {
            micro += 1;
            if micro <= skip_micro {
                // Batches the checkpointed run already trained on.
                continue;
            }
            let at_boundary = (micro - 1) % config.grad_accum == 0;
            if at_boundary && stop_requested() {
                stopped = true;
                micro -= 1;
                break 'epochs;
            }
            let update = micro % config.grad_accum == 0;
            let lr = learning_rate(config.schedule, config.lr, step, config.warmup_steps, total_steps);
            session
                .set_batch(&batch)
                .and_then(|()| session.submit(true, update.then_some(lr), 1.0 / config.grad_accum as f32))
                .map_err(|error| device_failed(error, step + 1))?;
            if !update {
                continue;
            }
            step += 1;
            progress_state.step = step;
            progress.inc(1);
            let evaluate_now = step % config.eval_every == 0 || step == total_steps;
            let save_now = config.save_every > 0 && step % config.save_every == 0 && step < total_steps;
            if evaluate_now || save_now || session.logged_losses() >= loss_read_every * config.grad_accum {
                read_losses(&mut session, &mut weights_host, &mut progress_state, micro, step)?;
                let rate = (step - first_step) as f64 / train_started.elapsed().as_secs_f64();
                let mean = progress_state.running_loss / progress_state.running_count.max(1) as f64;
                progress.set_message(format!("epoch {} loss {mean:.4} {rate:.2} steps/s", epoch + 1));
            }
            if evaluate_now {
                let limit = Some(config.eval_batches);
                let train_eval = evaluate(&mut session, &train_data, config.batch_size, num_labels, limit)?;
                let val_eval = evaluate(&mut session, &val_data, config.batch_size, num_labels, limit)?;
                let record = HistoryRecord {
                    step: step as u64,
                    epoch: epoch as u64,
                    train_loss: train_eval.loss,
                    validation_loss: Some(val_eval.loss),
                    train_accuracy: Some(train_eval.accuracy()),
                    validation_accuracy: Some(val_eval.accuracy()),
                    seconds: started.elapsed().as_secs_f64(),
                };
                progress.suspend(|| {
                    log::info!(
                        "step {step} (epoch {}): train loss {:.4}, validation loss {:.4}, train accuracy {:.3}, validation accuracy {:.3}",
                        epoch + 1,
                        record.train_loss,
                        val_eval.loss,
                        train_eval.accuracy(),
                        val_eval.accuracy()
                    )
                });
                report::append_history(&history_path, &record)
                    .map_err(|e| TrainError::Write { path: history_path.clone(), message: e.to_string() })?;
                history.push(record);
                progress_state.history = history.clone();
                progress_state.running_loss = 0.0;
                progress_state.running_count = 0;
            }
            if save_now {
                let dir = save_checkpoint(&session, &mut weights_host, step, &progress_state)?;
                progress.suspend(|| log::info!("checkpoint written to {}", dir.display()));
            }
        }
    }
    // A stop, or the end of the data, leaves losses in the log; the final checkpoint's progress
    // includes them.
    read_losses(&mut session, &mut weights_host, &mut progress_state, micro, step)?;
    progress.finish_and_clear();
    let dir = save_checkpoint(&session, &mut weights_host, step, &progress_state)?;
    if stopped {
        return Err(TrainError::Stopped { step, total: total_steps, checkpoint: dir, out: config.out_dir.clone() });
    }
    log::info!("training: {step} steps in {:.1} s", train_started.elapsed().as_secs_f64());

    let full = |session: &mut Session<'_>, d: &EncodedExamples| evaluate(session, d, config.batch_size, num_labels, None);
    let train_eval = full(&mut session, &train_data)?;
    let val_eval = full(&mut session, &val_data)?;
    let test_eval = full(&mut session, &test_data)?;
    let metrics = |e: &Evaluation| SplitMetrics::from_predictions(&labels, &e.truths, &e.predictions, e.loss);

    let model_out = config.out_dir.join("model");
    let adapter_out = match adapter_of() {
        Some((spec, modules, base, labels)) => {
            // The adapter in PEFT's format, and the model with it merged, which loads anywhere.
            let dir = config.out_dir.join("adapter");
            lora::save_adapter(&dir, spec, modules, &weights_host, base, Some(labels))?;
            // A QLoRA adapter was trained against the NF4 base, so it merges into that.
            let mut merged = if spec.quantize_base { lora::dequantized_base(&model.weights, &model.config, spec.double_quant)? } else { model.weights.clone() };
            lora::merge(&mut merged, spec, modules, &weights_host)?;
            save_classifier(&model_out, &model, &merged, &labels)?;
            Some(dir.display().to_string())
        }
        None => {
            save_classifier(&model_out, &model, &weights_host, &labels)?;
            None
        }
    };

    let report = Report {
        train: metrics(&train_eval),
        validation: metrics(&val_eval),
        test: metrics(&test_eval),
        dataset: DatasetSummary {
            path: config.data.display().to_string(),
            rows: dataset.rows_read,
            rows_per_label: dataset.rows_per_label.clone().into_iter().collect(),
            rows_after_balancing,
            split_sizes: [
                ("train".to_string(), splits.train.len()),
                ("validation".to_string(), splits.validation.len()),
                ("test".to_string(), splits.test.len()),
            ]
            .into_iter()
            .collect(),
            max_length: seq_len,
            truncated,
        },
        run: RunSummary {
            model: config.model_dir.display().to_string(),
            adapter: adapter_out,
            backend: gpu.describe(),
            seconds: started.elapsed().as_secs_f64(),
            trainable_parameters: summary.trainable_params,
            frozen_parameters: summary.frozen_params,
            train: match &config.lora {
                Some(spec) => format!(
                    "{} r={} alpha={} targets={}",
                    match (spec.quantize_base, spec.double_quant) {
                        (true, true) => "qlora nf4 double-quant",
                        (true, false) => "qlora nf4",
                        _ => "lora",
                    },
                    spec.rank,
                    spec.alpha,
                    spec.targets
                ),
                None => config.trainable.to_string(),
            },
            precision: config.precision,
            steps: step,
            lr: config.lr,
            epochs: config.epochs,
            batch_size: config.batch_size,
            seed: config.seed,
            random_init: model.random_init,
        },
    };
    write_report(&config.out_dir, &report, &history)?;
    Ok(report)
}

/// Progress of a run, stored in its checkpoints.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct RunProgress {
    step: usize,
    history: Vec<HistoryRecord>,
    running_loss: f64,
    running_count: usize,
    last_finite: Option<f32>,
    skipped_batches: usize,
}

/// Identity of the training data as the run uses it: the split's texts and labels and the
/// sequence length, hashed with FNV-1a.
fn data_fingerprint(splits: &data::Splits, seq_len: usize) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash ^= u64::from(b);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for e in splits.train.iter() {
        feed(e.text.as_bytes());
        feed(&[0]);
        feed(e.label.as_bytes());
        feed(&[0]);
    }
    format!("{} training examples of {seq_len} tokens, fnv1a {hash:016x}", splits.train.len())
}

/// Refuses a checkpoint written for another model shape or other data.
fn check_resume(loaded: &checkpoint::Loaded, config: &crate::model::config::Gpt2Config, fingerprint: &str) -> Result<(), TrainError> {
    let shape = |c: &crate::model::config::Gpt2Config| {
        format!("{} layers, {} heads, n_embd {}, vocab {}, n_positions {}", c.n_layer, c.n_head, c.n_embd, c.vocab_size, c.n_positions)
    };
    if shape(&loaded.config) != shape(config) {
        return Err(TrainError::Invalid(format!(
            "{}: the checkpoint is for a model with {}, but this run's model has {}; resume with the model the run started from",
            loaded.dir.display(),
            shape(&loaded.config),
            shape(config)
        )));
    }
    if loaded.state.data_fingerprint != fingerprint {
        return Err(TrainError::Invalid(format!(
            "{}: the checkpoint was trained on other data ({}; now {}); resume with the same data, split and seed",
            loaded.dir.display(),
            loaded.state.data_fingerprint,
            fingerprint
        )));
    }
    Ok(())
}

/// Writes a Hugging Face GPT2ForSequenceClassification directory: config.json with the labels,
/// model.safetensors with `score.weight`, and the tokenizer.
pub fn save_classifier(
    dir: &Path,
    model: &crate::model::load::LoadedModel,
    weights: &crate::model::weights::Weights,
    labels: &[String],
) -> Result<(), TrainError> {
    let write_err = |message: String| TrainError::Write { path: dir.to_path_buf(), message };
    let config = model.config.to_classifier(labels).map_err(|e| write_err(e.to_string()))?;
    config.save(dir).map_err(|e| write_err(e.to_string()))?;
    crate::model::weights::save(&dir.join("model.safetensors"), weights, &config, true)
        .map_err(|e| write_err(e.to_string()))?;
    model.tokenizer.save(dir).map_err(|e| write_err(e.to_string()))?;
    Ok(())
}

/// Writes metrics.json and the plots.
pub fn write_report(dir: &Path, report: &Report, history: &[HistoryRecord]) -> Result<(), TrainError> {
    write_json(&dir.join("metrics.json"), report)?;
    let plot_err = |path: PathBuf| move |e: report::ReportError| TrainError::Write { path, message: e.to_string() };
    if !history.is_empty() {
        // A run whose evaluations never had a finite loss (all its batches skipped for NaN, say)
        // still has its report; only the curve is missing.
        let plots: [(&str, fn(&Path, &[HistoryRecord]) -> Result<(), report::ReportError>); 2] =
            [("loss.png", report::plot_losses), ("accuracy.png", report::plot_accuracy)];
        for (name, plot) in plots {
            match plot(&dir.join(name), history) {
                Err(report::ReportError::NothingToPlot { path, what }) => log::warn!("{} not written: {what}", path.display()),
                other => other.map_err(plot_err(dir.join(name)))?,
            }
        }
    }
    report::plot_confusion_matrix(&dir.join("confusion_matrix.png"), &report.test)
        .map_err(plot_err(dir.join("confusion_matrix.png")))?;
    Ok(())
}
