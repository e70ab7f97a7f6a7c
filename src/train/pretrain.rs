//! Next-token pretraining on plain text.
//!
//! The corpus files are tokenized with the GPT-2 tokenizer, each followed by `<|endoftext|>`.
//! The last `val_fraction` of each file's tokens is held out for validation. Both parts are cut
//! into windows of `seq_len + 1` tokens with stride `seq_len` (inputs are the first `seq_len`,
//! targets the last). Training windows are shuffled per epoch from the seed. A step takes
//! `batch_size` of them and the remainder of an epoch is dropped, so every batch has one shape.
//! The loss is the chunked language-model loss, so (B*T, V) logits never exist.

use crate::data::Gpt2Tokenizer;
use crate::gpu::{Gpu, GpuError};
use crate::graph::executor::{OptimizerSettings, StepInputs};
use crate::graph::Session;
use crate::model::config::Gpt2Config;
use crate::model::gpt2::{build_graph, BatchShape, Head, Trainable};
use crate::model::weights::{self, HeadKind, Weights};
use crate::train::checkpoint::{self, CheckpointError, TrainState};
use crate::train::schedule::{learning_rate, Schedule};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Settings of a pretraining run. A checkpoint stores them, and a resumed run reuses them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PretrainSettings {
    /// Plain-text UTF-8 files.
    pub corpus: Vec<PathBuf>,
    /// Sequences per step.
    pub batch_size: usize,
    /// Tokens per sequence (at most the model's n_positions).
    pub seq_len: usize,
    /// Passes over the training windows.
    pub epochs: usize,
    /// Stop after this many steps, if fewer than `epochs` passes take.
    pub max_steps: Option<usize>,
    /// Peak learning rate; linear warm-up, then cosine decay to 0 at the last step.
    pub lr: f32,
    /// Steps of warm-up.
    pub warmup_steps: usize,
    /// AdamW decoupled weight decay.
    pub weight_decay: f32,
    /// AdamW second-moment decay.
    pub beta2: f32,
    /// Global gradient-norm clip.
    pub clip_grad_norm: f32,
    /// Fraction of each file's tokens held out for validation.
    pub val_fraction: f64,
    /// Steps between validation passes.
    pub eval_every: usize,
    /// Batches per validation pass (0: the whole validation part).
    pub eval_batches: usize,
    /// Steps between checkpoints (0: only at the end).
    pub save_every: usize,
    /// Seed of the data order and, without a starting model, of the initial weights.
    pub seed: u64,
    /// Storage type of the final model.safetensors (checkpoints are always f32).
    #[serde(default)]
    pub save_dtype: String,
    /// Re-draw, in the final model only, the embedding rows of tokens that never occur in the
    /// training text (see [`redraw_unseen_embeddings`]).
    #[serde(default)]
    pub redraw_unseen: bool,
    /// The language-model directory whose weights the run started from (`--model`), or `None`
    /// for weights initialised from `seed`. Recorded only: a resume starts from its checkpoint.
    #[serde(default)]
    pub start_model: Option<PathBuf>,
}

/// Errors of a pretraining run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PretrainError {
    /// A corpus file could not be read or is not usable text.
    #[error("corpus file {}: {message}", .path.display())]
    Corpus {
        /// The file.
        path: PathBuf,
        /// The problem.
        message: String,
    },
    /// A setting is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The loss became NaN or infinite.
    #[error(
        "the loss became {loss} at step {step} (last finite loss {last_finite:.4}); {checkpoint}. Lower --lr or raise --warmup-steps and resume"
    )]
    NonFinite {
        /// The 1-based step.
        step: usize,
        /// The non-finite loss.
        loss: f32,
        /// The last finite training loss.
        last_finite: f32,
        /// Location of the last good checkpoint.
        checkpoint: String,
    },
    /// The device failed.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// An output file could not be written.
    #[error("cannot write {}: {message}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The failure.
        message: String,
    },
}

/// Token streams of a corpus.
#[derive(Clone, Debug)]
pub struct Corpus {
    /// Training tokens of every file, in order.
    pub train: Vec<u32>,
    /// Validation tokens of every file, in order.
    pub validation: Vec<u32>,
    /// Token count of each file (end-of-text included).
    pub file_tokens: Vec<(PathBuf, usize)>,
}

impl Corpus {
    /// Token counts and an FNV-1a hash of every token, identifying the data of a run.
    pub fn fingerprint(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for &t in self.train.iter().chain(&self.validation) {
            for byte in t.to_le_bytes() {
                hash ^= u64::from(byte);
                hash = hash.wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{} train + {} validation tokens, fnv1a {hash:016x}", self.train.len(), self.validation.len())
    }
}

/// Reads and tokenizes `paths`, holding out the last `val_fraction` of each file's tokens.
///
/// # Errors
///
/// An unreadable file, invalid UTF-8 (with the line number), or a file without text.
pub fn read_corpus(paths: &[PathBuf], tokenizer: &Gpt2Tokenizer, val_fraction: f64) -> Result<Corpus, PretrainError> {
    if paths.is_empty() {
        return Err(PretrainError::Invalid("no corpus given: pass one or more plain-text files with --corpus".into()));
    }
    if !(0.0..1.0).contains(&val_fraction) {
        return Err(PretrainError::Invalid(format!("invalid --val-fraction {val_fraction}: expected a value in [0, 1)")));
    }
    let mut corpus = Corpus { train: Vec::new(), validation: Vec::new(), file_tokens: Vec::new() };
    for path in paths {
        let err = |message: String| PretrainError::Corpus { path: path.clone(), message };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let text = std::str::from_utf8(&bytes).map_err(|e| {
            let line = bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1;
            err(format!("line {line}: invalid UTF-8 (byte offset {}); convert the file to UTF-8", e.valid_up_to()))
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if text.trim().is_empty() {
            return Err(err("no text: expected plain text to train on".into()));
        }
        let mut tokens = tokenizer.encode(text);
        tokens.push(tokenizer.eos_id());
        let held_out = (tokens.len() as f64 * val_fraction).round() as usize;
        let cut = tokens.len() - held_out;
        corpus.file_tokens.push((path.clone(), tokens.len()));
        corpus.validation.extend_from_slice(&tokens[cut..]);
        corpus.train.extend_from_slice(&tokens[..cut]);
    }
    Ok(corpus)
}

/// Number of windows of `seq_len + 1` tokens at stride `seq_len` in `tokens`.
pub fn window_count(tokens: usize, seq_len: usize) -> usize {
    tokens.saturating_sub(1) / seq_len
}

/// One row of the run's history, written at each validation pass.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PretrainRecord {
    /// Optimizer steps taken.
    pub step: usize,
    /// Mean training loss of the steps since the previous record (absent at step 0).
    pub train_loss: Option<f32>,
    /// Mean validation loss over the validation batches.
    pub val_loss: f32,
    /// Learning rate of the last step.
    pub lr: f32,
    /// Training tokens seen.
    pub tokens: u64,
    /// Seconds of training so far, resumed runs included.
    pub elapsed_s: f64,
}

/// Progress report of a running pretraining.
#[derive(Clone, Debug)]
pub enum Event {
    /// A step finished.
    Step {
        /// Steps done.
        step: usize,
        /// Steps in the run.
        total: usize,
        /// Its training loss.
        loss: f32,
        /// Training tokens per second since the run (or resume) started.
        tokens_per_s: f64,
    },
    /// A validation pass finished.
    Eval(PretrainRecord),
    /// A checkpoint was written.
    Saved(PathBuf),
}

/// Outcome of a run.
#[derive(Clone, Debug, Serialize)]
pub struct PretrainSummary {
    /// The settings.
    pub settings: PretrainSettings,
    /// The model's configuration.
    pub config: Gpt2Config,
    /// Steps done.
    pub steps: usize,
    /// Steps planned.
    pub total_steps: usize,
    /// True when the run was interrupted before `total_steps`.
    pub stopped_early: bool,
    /// Training and validation token counts and hash.
    pub data: String,
    /// Validation passes.
    pub history: Vec<PretrainRecord>,
    /// Seconds of training, resumed runs included.
    pub elapsed_s: f64,
    /// The adapter.
    pub adapter: String,
    /// Embedding rows re-drawn in the final model, when `redraw_unseen` is set and any token is
    /// absent from the training text.
    pub redrawn: Option<RedrawnEmbeddings>,
}

/// Tokens that occur at least this often in the training text give the spread of re-drawn rows.
const FREQUENT_COUNT: usize = 20;

/// Summary of [`redraw_unseen_embeddings`].
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RedrawnEmbeddings {
    /// Vocabulary entries that never occur in the training text, whose rows were re-drawn.
    pub tokens: usize,
    /// Standard deviation of the new rows around their centre.
    pub spread: f32,
    /// L2 norm of the centre, the mean of the rows that were replaced.
    pub centre_norm: f32,
}

/// Replaces the `wte` rows of tokens that never occur in `train` with their mean plus normal
/// noise of standard deviation `spread`. The spread is that of the rows of tokens occurring at
/// least FREQUENT_COUNT times, around their own mean. Returns `None`, changing nothing, when
/// every token occurs or no token is frequent.
///
/// Why: the tied LM head pushes the logits of absent tokens down at every step, and AdamW turns
/// that small, constant gradient into full-size steps in one shared direction. After
/// pretraining, their rows are nearly one vector (mean pairwise cosine 0.998 after one pass
/// over the bundled corpus), so a classifier fine-tuned from the model starts unable to tell
/// those tokens apart. Keeping the mean keeps their average logit as low as the model learned,
/// and the noise makes every row distinct at the scale of learned ones.
pub fn redraw_unseen_embeddings(weights: &mut Weights, train: &[u32], seed: u64) -> Option<RedrawnEmbeddings> {
    let wte = weights.get_mut("wte.weight")?;
    let (vocab, width) = (wte.shape[0], wte.shape[1]);
    let mut counts = vec![0usize; vocab];
    for &token in train {
        if let Some(count) = counts.get_mut(token as usize) {
            *count += 1;
        }
    }
    let unseen: Vec<usize> = (0..vocab).filter(|&t| counts[t] == 0).collect();
    let frequent: Vec<usize> = (0..vocab).filter(|&t| counts[t] >= FREQUENT_COUNT).collect();
    if unseen.is_empty() || frequent.is_empty() {
        return None;
    }

    let row = |t: usize| &wte.data[t * width..(t + 1) * width];
    let mean_of = |rows: &[usize]| {
        let mut mean = vec![0.0f64; width];
        for &t in rows {
            for (m, &x) in mean.iter_mut().zip(row(t)) {
                *m += f64::from(x);
            }
        }
        mean.iter().map(|m| m / rows.len() as f64).collect::<Vec<f64>>()
    };
    let frequent_mean = mean_of(&frequent);
    let squares: f64 = frequent
        .iter()
        .flat_map(|&t| row(t).iter().zip(&frequent_mean).map(|(&x, m)| (f64::from(x) - m).powi(2)))
        .sum();
    let spread = (squares / (frequent.len() * width) as f64).sqrt();
    let centre = mean_of(&unseen);

    // A seed of its own, so the noise does not repeat the draws of the random initialisation.
    let mut sampler = crate::model::weights::NormalSampler::new(seed ^ 0x7265_6472_6177_0001);
    for &t in &unseen {
        for (x, c) in wte.data[t * width..(t + 1) * width].iter_mut().zip(&centre) {
            *x = (c + spread * sampler.standard()) as f32;
        }
    }
    let centre_norm = centre.iter().map(|c| c * c).sum::<f64>().sqrt();
    Some(RedrawnEmbeddings { tokens: unseen.len(), spread: spread as f32, centre_norm: centre_norm as f32 })
}

/// Progress stored in a checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Progress {
    history: Vec<PretrainRecord>,
    loss_sum: f64,
    loss_steps: usize,
    last_finite: Option<f32>,
    elapsed_s: f64,
}

/// Starting point of a run: a model, or a checkpoint of an interrupted run.
pub enum Start {
    /// Fresh weights (random or pretrained) with this configuration.
    Model {
        /// The configuration.
        config: Gpt2Config,
        /// The weights (language-model head tied to wte).
        weights: Weights,
    },
    /// A checkpoint read with [`checkpoint::load`].
    Resume(Box<checkpoint::Loaded>),
}

/// Trains `start` on `corpus` with `settings`, writing checkpoints into `out_dir/checkpoint/` and
/// the final model (config.json, model.safetensors, tokenizer, pretrain.json) into `out_dir`.
/// Setting `stop` ends the run at the next step boundary with a checkpoint.
///
/// # Errors
///
/// Invalid settings, a corpus too small for one batch, a device failure, a non-finite loss, or
/// a failed write. A failure never removes the last checkpoint.
#[allow(clippy::too_many_arguments)]
pub fn pretrain(
    gpu: &Gpu,
    start: Start,
    settings: &PretrainSettings,
    corpus: &Corpus,
    tokenizer: &Gpt2Tokenizer,
    out_dir: &Path,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(&Event),
) -> Result<PretrainSummary, PretrainError> {
    let (config, mut weights, resume) = match start {
        Start::Model { config, weights } => (config, weights, None),
        Start::Resume(loaded) => (loaded.config.clone(), loaded.weights.clone(), Some(loaded)),
    };
    let s = settings;
    let invalid = |m: String| Err(PretrainError::Invalid(m));
    if s.batch_size == 0 || s.epochs == 0 || s.eval_every == 0 {
        return invalid(format!(
            "--batch-size ({}), --epochs ({}) and --eval-every ({}) must be at least 1",
            s.batch_size, s.epochs, s.eval_every
        ));
    }
    if s.seq_len == 0 || s.seq_len > config.n_positions {
        return invalid(format!("invalid --max-length {}: expected 1 to the model's n_positions ({})", s.seq_len, config.n_positions));
    }
    if !(s.lr > 0.0 && s.lr.is_finite()) {
        return invalid(format!("invalid --lr {}: expected a positive number", s.lr));
    }
    let train_windows = window_count(corpus.train.len(), s.seq_len);
    let batches_per_epoch = train_windows / s.batch_size;
    if batches_per_epoch == 0 {
        return invalid(format!(
            "the corpus has {} training tokens, {train_windows} windows of {} tokens, fewer than one batch of {}; add text or lower --batch-size/--max-length",
            corpus.train.len(),
            s.seq_len + 1,
            s.batch_size
        ));
    }
    let val_windows = window_count(corpus.validation.len(), s.seq_len);
    if s.val_fraction > 0.0 && val_windows == 0 {
        return invalid(format!(
            "the validation part has {} tokens, fewer than one window of {}; raise --val-fraction or lower --max-length",
            corpus.validation.len(),
            s.seq_len + 1
        ));
    }
    let total_steps = (batches_per_epoch * s.epochs).min(s.max_steps.unwrap_or(usize::MAX));
    let fingerprint = corpus.fingerprint();

    let shape = BatchShape { batch: s.batch_size, seq_len: s.seq_len };
    let graph = build_graph(&config, Head::LanguageModelLoss, shape, Trainable::All, gpu.limits().max_storage_buffer_binding_size);
    let optimizer = OptimizerSettings {
        beta1: 0.9,
        beta2: s.beta2,
        eps: 1e-8,
        weight_decay: s.weight_decay,
        clip_grad_norm: (s.clip_grad_norm > 0.0).then_some(s.clip_grad_norm),
        skip_nonfinite: true,
    };
    let mut session = Session::new(gpu, graph, &weights, true, optimizer)?;
    session.log_losses(LOSS_READ_EVERY)?;

    let mut progress = Progress::default();
    let mut step = 0usize;
    if let Some(loaded) = &resume {
        if loaded.state.data_fingerprint != fingerprint {
            return Err(PretrainError::Invalid(format!(
                "the corpus differs from the checkpoint's ({} now, {} then); resume with the same files",
                fingerprint, loaded.state.data_fingerprint
            )));
        }
        checkpoint::restore_optimizer(&mut session, loaded)?;
        progress = serde_json::from_value(loaded.state.progress.clone()).unwrap_or_default();
        step = loaded.state.step as usize;
    }

    let started = Instant::now();
    let elapsed_before = progress.elapsed_s;
    let elapsed = |started: &Instant| elapsed_before + started.elapsed().as_secs_f64();
    let tokens_per_step = (s.batch_size * s.seq_len) as u64;
    let lengths = vec![s.seq_len as u32; s.batch_size];
    let mut ids = vec![0u32; s.batch_size * s.seq_len];
    let mut targets = vec![0i32; s.batch_size * s.seq_len];
    let first_step = step;

    let save = |session: &Session<'_>, weights: &mut Weights, step: usize, progress: &Progress| -> Result<PathBuf, PretrainError> {
        session.download_weights(weights)?;
        let state = TrainState {
            format_version: checkpoint::FORMAT_VERSION,
            kind: "pretrain".into(),
            step: step as u64,
            applied_steps: Some(session.applied_optimizer_steps()?).filter(|&t| t != step as u64),
            settings: serde_json::to_value(settings).expect("settings serialize"),
            data_fingerprint: fingerprint.clone(),
            progress: serde_json::to_value(progress).expect("progress serializes"),
        };
        Ok(checkpoint::save(out_dir, session, weights, &config, &state, None)?)
    };

    if step == 0 && val_windows > 0 {
        let val_loss = validate(&mut session, corpus, s, &mut ids, &mut targets, &lengths)?;
        let record = PretrainRecord { step: 0, train_loss: None, val_loss, lr: 0.0, tokens: 0, elapsed_s: elapsed(&started) };
        on_event(&Event::Eval(record.clone()));
        progress.history.push(record);
    }

    // Training tokens per second from the start (or resume) of this process to `step`'s read.
    let rate = |loss_step: usize| {
        let trained = (loss_step - first_step) as u64 * tokens_per_step;
        trained as f64 / started.elapsed().as_secs_f64().max(1e-9)
    };
    let mut order: Vec<usize> = Vec::new();
    let mut order_epoch = usize::MAX;
    let mut stopped_early = false;
    while step < total_steps {
        if stop.load(Ordering::SeqCst) {
            stopped_early = true;
            break;
        }
        let epoch = step / batches_per_epoch;
        if epoch != order_epoch {
            order = (0..train_windows).collect();
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(s.seed ^ (epoch as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            order.shuffle(&mut rng);
            order_epoch = epoch;
        }
        let in_epoch = step % batches_per_epoch;
        for (row, &w) in order[in_epoch * s.batch_size..(in_epoch + 1) * s.batch_size].iter().enumerate() {
            let window = &corpus.train[w * s.seq_len..w * s.seq_len + s.seq_len + 1];
            ids[row * s.seq_len..(row + 1) * s.seq_len].copy_from_slice(&window[..s.seq_len]);
            for (t, &next) in window[1..].iter().enumerate() {
                targets[row * s.seq_len + t] = next as i32;
            }
        }
        session.set_inputs(&StepInputs { ids: &ids, lengths: &lengths, targets: &targets });
        let lr = learning_rate(Schedule::Cosine, s.lr, step, s.warmup_steps, total_steps);
        session.submit(true, Some(lr), 1.0)?;
        step += 1;
        let evaluate = step % s.eval_every == 0 || step == total_steps;
        let checkpoint = s.save_every > 0 && step % s.save_every == 0 && step < total_steps;
        // The losses are read in batches, and always before a validation pass or a checkpoint,
        // so a checkpoint never follows a non-finite loss unnoticed.
        if evaluate || checkpoint || session.logged_losses() == LOSS_READ_EVERY {
            read_losses(&mut session, &mut progress, step, total_steps, out_dir, &rate, on_event)?;
        }
        if evaluate {
            let val_loss = if val_windows > 0 { validate(&mut session, corpus, s, &mut ids, &mut targets, &lengths)? } else { f32::NAN };
            let record = PretrainRecord {
                step,
                train_loss: Some((progress.loss_sum / progress.loss_steps.max(1) as f64) as f32),
                val_loss,
                lr,
                tokens: step as u64 * tokens_per_step,
                elapsed_s: elapsed(&started),
            };
            progress.loss_sum = 0.0;
            progress.loss_steps = 0;
            on_event(&Event::Eval(record.clone()));
            progress.history.push(record);
        }
        if checkpoint {
            progress.elapsed_s = elapsed(&started);
            let dir = save(&session, &mut weights, step, &progress)?;
            on_event(&Event::Saved(dir));
        }
    }
    // A stop between reads leaves losses in the log, which the checkpoint's progress includes.
    read_losses(&mut session, &mut progress, step, total_steps, out_dir, &rate, on_event)?;
    progress.elapsed_s = elapsed(&started);
    let dir = save(&session, &mut weights, step, &progress)?;
    on_event(&Event::Saved(dir));

    let mut summary = PretrainSummary {
        settings: settings.clone(),
        config: config.clone(),
        steps: step,
        total_steps,
        stopped_early,
        data: fingerprint.clone(),
        history: progress.history.clone(),
        elapsed_s: progress.elapsed_s,
        adapter: gpu.describe(),
        redrawn: None,
    };
    if !stopped_early {
        // The checkpoint keeps the trained rows, so a resumed run continues from them.
        if s.redraw_unseen {
            summary.redrawn = redraw_unseen_embeddings(&mut weights, &corpus.train, s.seed);
        }
        write_model(out_dir, &config, &weights, tokenizer, &summary)?;
    }
    Ok(summary)
}

/// Training steps whose losses the host reads in one transfer. The device runs ahead of the host
/// by at most this many steps, and a non-finite loss is noticed within as many.
const LOSS_READ_EVERY: usize = 10;

/// Reads the losses logged since the last read, the last of them from step `step`, into
/// `progress` and reports each as an [`Event::Step`]. `rate` gives the tokens per second to
/// report for a step.
///
/// # Errors
///
/// A device failure, or [`PretrainError::NonFinite`] for the first non-finite loss.
fn read_losses(
    session: &mut Session<'_>,
    progress: &mut Progress,
    step: usize,
    total_steps: usize,
    out_dir: &Path,
    rate: &dyn Fn(usize) -> f64,
    on_event: &mut dyn FnMut(&Event),
) -> Result<(), PretrainError> {
    let losses = session.drain_losses()?;
    let first = step + 1 - losses.len();
    for (i, out) in losses.iter().enumerate() {
        let loss_step = first + i;
        if !out.loss.is_finite() {
            let checkpoint = match checkpoint::find(out_dir) {
                Ok(dir) => format!("the last checkpoint, {}, is intact", dir.display()),
                Err(_) => "no checkpoint was written yet".to_string(),
            };
            let last_finite = progress.last_finite.unwrap_or(f32::NAN);
            return Err(PretrainError::NonFinite { step: loss_step, loss: out.loss, last_finite, checkpoint });
        }
        progress.last_finite = Some(out.loss);
        progress.loss_sum += f64::from(out.loss);
        progress.loss_steps += 1;
        on_event(&Event::Step { step: loss_step, total: total_steps, loss: out.loss, tokens_per_s: rate(loss_step) });
    }
    Ok(())
}

/// Mean loss over the validation windows (the first `eval_batches` batches of them), weighted
/// by the positions each batch counts. The last batch is padded with ignored rows.
fn validate(
    session: &mut Session<'_>,
    corpus: &Corpus,
    s: &PretrainSettings,
    ids: &mut [u32],
    targets: &mut [i32],
    lengths: &[u32],
) -> Result<f32, PretrainError> {
    let windows = window_count(corpus.validation.len(), s.seq_len);
    let batches = windows.div_ceil(s.batch_size);
    let batches = if s.eval_batches == 0 { batches } else { batches.min(s.eval_batches) };
    let (mut sum, mut count) = (0.0f64, 0.0f64);
    for b in 0..batches {
        for row in 0..s.batch_size {
            let w = b * s.batch_size + row;
            let span = row * s.seq_len..(row + 1) * s.seq_len;
            if w < windows {
                let window = &corpus.validation[w * s.seq_len..w * s.seq_len + s.seq_len + 1];
                ids[span.clone()].copy_from_slice(&window[..s.seq_len]);
                for (t, &next) in window[1..].iter().enumerate() {
                    targets[span.start + t] = next as i32;
                }
            } else {
                ids[span.clone()].fill(0);
                targets[span].fill(-1);
            }
        }
        session.set_inputs(&StepInputs { ids, lengths, targets });
        // A forward-only submit of the training session: no gradient or weight changes.
        session.submit(false, None, 1.0)?;
        let out = session.read_loss()?;
        sum += f64::from(out.loss) * f64::from(out.counted);
        count += f64::from(out.counted);
    }
    Ok(if count > 0.0 { (sum / count) as f32 } else { f32::NAN })
}

/// Writes the final model as a Hugging Face GPT2LMHeadModel directory plus `pretrain.json`.
fn write_model(
    dir: &Path,
    config: &Gpt2Config,
    weights: &Weights,
    tokenizer: &Gpt2Tokenizer,
    summary: &PretrainSummary,
) -> Result<(), PretrainError> {
    let write_err = |path: PathBuf, message: String| PretrainError::Write { path, message };
    config.save(dir).map_err(|e| write_err(dir.join("config.json"), e.to_string()))?;
    debug_assert_eq!(HeadKind::from_config(config), HeadKind::LanguageModel);
    let path = dir.join("model.safetensors");
    let dtype: weights::SaveDtype = summary.settings.save_dtype.parse().unwrap_or_default();
    weights::save_as(&path, weights, config, true, dtype).map_err(|e| write_err(path.clone(), e.to_string()))?;
    tokenizer.save(dir).map_err(|e| write_err(dir.to_path_buf(), e.to_string()))?;
    let path = dir.join("pretrain.json");
    let text = serde_json::to_string_pretty(summary).expect("summary serializes");
    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|e| write_err(path.clone(), e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::HostTensor;

    /// Returns a (vocab, width) table whose row t is filled with t + column / 10.
    fn table(vocab: usize, width: usize) -> Weights {
        let mut weights = Weights::default();
        let mut wte = HostTensor::filled(vec![vocab, width], 0.0);
        for (i, x) in wte.data.iter_mut().enumerate() {
            *x = (i / width) as f32 + (i % width) as f32 / 10.0;
        }
        weights.insert("wte.weight", wte);
        weights
    }

    #[test]
    fn redraw_replaces_only_absent_tokens() {
        let (vocab, width) = (300, 64);
        // Tokens 0..100 occur FREQUENT_COUNT times, 100..150 once, 150..300 never.
        let mut train: Vec<u32> = (0..100u32).flat_map(|t| std::iter::repeat_n(t, FREQUENT_COUNT)).collect();
        train.extend(100..150u32);
        let original = table(vocab, width);
        let mut weights = original.clone();
        let redrawn = redraw_unseen_embeddings(&mut weights, &train, 9).expect("150 tokens are absent");
        assert_eq!(redrawn.tokens, 150);

        let before = &original.tensors["wte.weight"].data;
        let after = &weights.tensors["wte.weight"].data;
        assert_eq!(before[..150 * width], after[..150 * width], "rows of tokens that occur must not change");
        // Frequent rows are t + c/10 for t < 100: around their mean the spread is the standard
        // deviation of 0..100, sqrt((100^2 - 1) / 12).
        let want_spread = ((100.0f64 * 100.0 - 1.0) / 12.0).sqrt();
        assert!((f64::from(redrawn.spread) - want_spread).abs() < 1e-3, "spread {} expected {want_spread}", redrawn.spread);
        // The new rows keep the mean of the old ones, row 224.5 + c / 10, within the noise of the
        // mean of 150 draws (spread / sqrt(150) = 2.4; four of those allowed).
        for c in 0..width {
            let mean: f64 = (150..vocab).map(|t| f64::from(after[t * width + c])).sum::<f64>() / 150.0;
            let want = 224.5 + c as f64 / 10.0;
            assert!((mean - want).abs() < 4.0 * want_spread / 150f64.sqrt(), "column {c}: mean {mean} expected {want}");
        }
        let squares: f64 = (150..vocab)
            .flat_map(|t| (0..width).map(move |c| (t, c)))
            .map(|(t, c)| (f64::from(after[t * width + c]) - 224.5 - c as f64 / 10.0).powi(2))
            .sum();
        let measured = (squares / (150 * width) as f64).sqrt();
        assert!((measured / want_spread - 1.0).abs() < 0.05, "noise spread {measured} expected {want_spread}");

        let mut again = original.clone();
        assert_eq!(redraw_unseen_embeddings(&mut again, &train, 9), Some(redrawn));
        assert_eq!(again.tensors["wte.weight"].data, *after, "the same seed must redraw the same rows");
    }

    #[test]
    fn redraw_skips_when_nothing_qualifies() {
        let original = table(4, 8);
        let mut weights = original.clone();
        let every_token: Vec<u32> = (0..4u32).flat_map(|t| std::iter::repeat_n(t, FREQUENT_COUNT)).collect();
        assert_eq!(redraw_unseen_embeddings(&mut weights, &every_token, 1), None);
        assert_eq!(redraw_unseen_embeddings(&mut weights, &[0, 1], 1), None, "no token occurs FREQUENT_COUNT times");
        assert_eq!(weights.tensors["wte.weight"].data, original.tensors["wte.weight"].data);
    }
}
