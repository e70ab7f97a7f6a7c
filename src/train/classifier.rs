//! Fine-tuning a GPT into a text classifier: data, training loop, evaluation and the report card.

use super::eval::{evaluate, Evaluation};
use super::metrics::SplitMetrics;
use super::report::{self, HistoryRecord};
use super::schedule::{learning_rate, Schedule};
use crate::data::{self, Balance, BatchIter, EncodedExamples, ReadOptions};
use crate::fsutil::write_atomic;
use crate::gpu::{Gpu, GpuError};
use crate::graph::executor::{OptimizerSettings, StepInputs};
use crate::graph::Session;
use crate::model::gpt2::{build_graph, BatchShape, Head, Trainable};
use crate::model::load::{open_classifier, ModelError};
use serde::Serialize;
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
    #[error("the training loss became {loss} at step {step} (last finite loss {last_finite:?}); lower --lr or set --clip-grad-norm")]
    NonFinite {
        /// Optimizer step.
        step: usize,
        /// The non-finite value.
        loss: f32,
        /// The last finite loss seen.
        last_finite: Option<f32>,
    },
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
        }
    }
}

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
        "split: {} train, {} validation, {} test; {} tokens per sequence, {} examples truncated",
        splits.train.len(),
        splits.validation.len(),
        splits.test.len(),
        seq_len,
        truncated
    );
    if let Trainable::LastBlocks(n) = config.trainable {
        if n > model.config.n_layer {
            return Err(TrainError::Invalid(format!(
                "--train last-blocks:{n} asks for more blocks than the model has ({})",
                model.config.n_layer
            )));
        }
    }

    let head = Head::Classifier { num_labels: labels.len() };
    let shape = BatchShape { batch: config.batch_size, seq_len };
    let max_binding = gpu.limits().max_storage_buffer_binding_size;
    let graph = build_graph(&model.config, head, shape, config.trainable, max_binding);
    let settings = OptimizerSettings {
        weight_decay: config.weight_decay,
        clip_grad_norm: config.clip_grad_norm,
        ..OptimizerSettings::default()
    };
    let mut session = Session::new(gpu, graph, &model.weights, true, settings)?;
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
    let mut history = Vec::new();
    let progress = indicatif::ProgressBar::new(total_steps as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}")
            .expect("progress template is valid"),
    );
    let num_labels = labels.len();
    let mut step = 0usize;
    let mut micro = 0usize;
    let mut last_finite: Option<f32> = None;
    let mut running_loss = 0.0f64;
    let mut running_count = 0usize;
    let train_started = Instant::now();
    for epoch in 0..config.epochs {
        for batch in BatchIter::train(&train_data, config.batch_size, config.seed, epoch as u64)? {
            session.set_inputs(&StepInputs { ids: &batch.ids, lengths: &batch.lengths, targets: &batch.labels });
            micro += 1;
            let update = micro % config.grad_accum == 0;
            let lr = learning_rate(config.schedule, config.lr, step, config.warmup_steps, total_steps);
            session.submit(true, update.then_some(lr), 1.0 / config.grad_accum as f32)?;
            let out = session.read_loss()?;
            if !out.loss.is_finite() {
                return Err(TrainError::NonFinite { step, loss: out.loss, last_finite });
            }
            last_finite = Some(out.loss);
            running_loss += f64::from(out.loss);
            running_count += 1;
            if !update {
                continue;
            }
            step += 1;
            progress.inc(1);
            let rate = step as f64 / train_started.elapsed().as_secs_f64();
            progress.set_message(format!("epoch {} loss {:.4} {rate:.2} steps/s", epoch + 1, running_loss / running_count as f64));
            if step % config.eval_every == 0 || step == total_steps {
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
                running_loss = 0.0;
                running_count = 0;
            }
        }
    }
    progress.finish_and_clear();
    log::info!("training: {step} steps in {:.1} s", train_started.elapsed().as_secs_f64());

    let full = |session: &mut Session<'_>, d: &EncodedExamples| evaluate(session, d, config.batch_size, num_labels, None);
    let train_eval = full(&mut session, &train_data)?;
    let val_eval = full(&mut session, &val_data)?;
    let test_eval = full(&mut session, &test_data)?;
    let metrics = |e: &Evaluation| SplitMetrics::from_predictions(&labels, &e.truths, &e.predictions, e.loss);

    let mut weights = model.weights.clone();
    session.download_weights(&mut weights)?;
    let model_out = config.out_dir.join("model");
    save_classifier(&model_out, &model, &weights, &labels)?;

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
            adapter: None,
            backend: gpu.describe(),
            seconds: started.elapsed().as_secs_f64(),
            trainable_parameters: summary.trainable_params,
            frozen_parameters: summary.frozen_params,
            train: config.trainable.to_string(),
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
        report::plot_losses(&dir.join("loss.png"), history).map_err(plot_err(dir.join("loss.png")))?;
        report::plot_accuracy(&dir.join("accuracy.png"), history).map_err(plot_err(dir.join("accuracy.png")))?;
    }
    report::plot_confusion_matrix(&dir.join("confusion_matrix.png"), &report.test)
        .map_err(plot_err(dir.join("confusion_matrix.png")))?;
    Ok(())
}
