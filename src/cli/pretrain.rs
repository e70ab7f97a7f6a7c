//! `shadertune pretrain`: next-token training of a GPT on plain text.

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use shadertune::data::Gpt2Tokenizer;
use shadertune::model::config::Gpt2Config;
use shadertune::model::load::{assets_dir, open_language_model};
use shadertune::model::weights::{init_random, HeadKind};
use shadertune::train::checkpoint;
use shadertune::train::classifier::check_output_dir;
use shadertune::train::pretrain::{pretrain, read_corpus, Event, PretrainSettings, Start};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub(crate) struct PretrainArgs {
    /// Plain-text UTF-8 files to train on (each ends with <|endoftext|>).
    #[arg(long, num_args = 1.., required_unless_present = "resume")]
    corpus: Vec<PathBuf>,
    /// Model shape for random initialisation: a config.json, or a preset: `mini` (4 layers,
    /// 256 channels) or `small` (GPT-2 124M). Default: mini.
    #[arg(long, conflicts_with = "model")]
    config: Option<String>,
    /// Continue pretraining a language model directory (config.json, model.safetensors)
    /// instead of starting from random weights.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Output directory: the final Hugging Face model, pretrain.json and checkpoint/.
    #[arg(long, required_unless_present = "resume")]
    out: Option<PathBuf>,
    /// Continue the interrupted run whose --out directory is DIR, with its stored settings.
    #[arg(long, value_name = "DIR")]
    resume: Option<PathBuf>,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence. Default: the model's n_positions, at most 256.
    #[arg(long)]
    max_length: Option<usize>,
    /// Passes over the training windows.
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// Stop after this many steps even if the epochs are not done.
    #[arg(long)]
    steps: Option<usize>,
    /// Peak learning rate (linear warm-up, then cosine decay to 0).
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Steps of learning-rate warm-up.
    #[arg(long, default_value_t = 100)]
    warmup_steps: usize,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// Clip gradients to this global L2 norm (0 turns clipping off).
    #[arg(long, default_value_t = 1.0)]
    clip_grad_norm: f32,
    /// Fraction of each file held out (its end) for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// Steps between validation passes.
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Batches per validation pass (0: all of the validation part).
    #[arg(long, default_value_t = 20)]
    eval_batches: usize,
    /// Steps between checkpoints (0: only at the end and on Ctrl-C).
    #[arg(long, default_value_t = 200)]
    save_every: usize,
    /// Seed of the data order and of random initialisation.
    #[arg(long, default_value_t = 1234)]
    seed: u64,
    /// Storage type of the final model.safetensors: f32, or f16 for half the size
    /// (checkpoints stay f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
    save_dtype: String,
    /// In the final model, re-draw the token embeddings of tokens that never occur in the
    /// training text: their mean plus noise at the spread of the rows of tokens seen at least 20
    /// times. Pretraining leaves them nearly identical, so a classifier fine-tuned on text that
    /// contains them starts unable to tell them apart. With --resume, turns this on for the
    /// resumed run and rewrites its final model.
    #[arg(long)]
    redraw_unseen: bool,
    #[command(flatten)]
    device: super::DeviceArgs,
}

pub(crate) fn run(args: &PretrainArgs) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // Failing to install the handler only loses the clean stop on Ctrl-C.
        if let Err(e) = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)) {
            log::warn!("Ctrl-C will not stop at a step boundary: {e}");
        }
    }

    let (start, settings, out, tokenizer) = match &args.resume {
        Some(run_dir) => {
            let loaded = checkpoint::load(run_dir, "pretrain", HeadKind::LanguageModel)?;
            let mut settings: PretrainSettings = serde_json::from_value(loaded.state.settings.clone())
                .map_err(|e| anyhow::anyhow!("{}: the stored settings are unreadable: {e}", loaded.dir.display()))?;
            // Only the final model depends on it, so it may be turned on for a resumed run.
            settings.redraw_unseen |= args.redraw_unseen;
            eprintln!("resuming {} at step {} with its stored settings", run_dir.display(), loaded.state.step);
            let out = args.out.clone().unwrap_or_else(|| run_dir.clone());
            let tokenizer = match out.join("tokenizer.json").exists() {
                true => Gpt2Tokenizer::from_dir(&out)?,
                false => Gpt2Tokenizer::from_dir(&assets_dir().join("tokenizer"))?,
            };
            (Start::Resume(Box::new(loaded)), settings, out, tokenizer)
        }
        None => {
            let out = args.out.clone().expect("clap requires --out without --resume");
            let (config, weights, tokenizer) = match &args.model {
                Some(dir) => {
                    let model = open_language_model(dir, args.seed)?;
                    (model.config, model.weights, model.tokenizer)
                }
                None => {
                    let config = match args.config.as_deref().unwrap_or("mini") {
                        "mini" => Gpt2Config::mini(),
                        "small" => Gpt2Config::small(),
                        path => Gpt2Config::from_file(std::path::Path::new(path))?,
                    };
                    let weights = init_random(&config, HeadKind::LanguageModel, args.seed)?;
                    (config, weights, Gpt2Tokenizer::from_dir(&assets_dir().join("tokenizer"))?)
                }
            };
            if tokenizer.vocab_size() > config.vocab_size {
                anyhow::bail!(
                    "the tokenizer has {} tokens but the model's vocab_size is {}; use a config with the GPT-2 vocabulary (50257)",
                    tokenizer.vocab_size(),
                    config.vocab_size
                );
            }
            // Absolute corpus paths, so that a resume from another directory finds the files.
            let corpus = args.corpus.iter().map(std::path::absolute).collect::<Result<Vec<_>, _>>()?;
            let settings = PretrainSettings {
                corpus,
                batch_size: args.batch_size,
                seq_len: args.max_length.unwrap_or(config.n_positions.min(256)),
                epochs: args.epochs,
                max_steps: args.steps,
                lr: args.lr,
                warmup_steps: args.warmup_steps,
                weight_decay: args.weight_decay,
                beta2: 0.95,
                clip_grad_norm: args.clip_grad_norm,
                val_fraction: args.val_fraction,
                eval_every: args.eval_every,
                eval_batches: args.eval_batches,
                save_every: args.save_every,
                seed: args.seed,
                save_dtype: args.save_dtype.clone(),
                redraw_unseen: args.redraw_unseen,
                start_model: args.model.as_deref().map(std::path::absolute).transpose()?,
            };
            (Start::Model { config, weights }, settings, out, tokenizer)
        }
    };
    check_output_dir(&out)?;
    let corpus = read_corpus(&settings.corpus, &tokenizer, settings.val_fraction)?;
    eprintln!(
        "corpus: {} training and {} validation tokens from {} file(s)",
        corpus.train.len(),
        corpus.validation.len(),
        corpus.file_tokens.len()
    );
    let gpu = args.device.open()?;
    eprintln!("adapter: {}", gpu.describe());

    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
            .expect("the progress template is valid"),
    );
    let mut last_val = f32::NAN;
    // Without a terminal the bar is hidden, so a log line reports progress every few steps.
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut on_event = |event: &Event| match event {
        Event::Step { step, total, loss, tokens_per_s } => {
            bar.set_length(*total as u64);
            bar.set_position(*step as u64);
            bar.set_message(format!("loss {loss:.4}  val {last_val:.4}  {tokens_per_s:.0} tok/s"));
            if !terminal && step % 10 == 0 {
                eprintln!("step {step:>6}/{total}  loss {loss:.4}  {tokens_per_s:.0} tok/s");
            }
        }
        Event::Eval(record) => {
            last_val = record.val_loss;
            let train = record.train_loss.map_or("-".to_string(), |l| format!("{l:.4}"));
            bar.suspend(|| {
                eprintln!(
                    "step {:>6}  train loss {train}  val loss {:.4}  lr {:.2e}  {} tokens  {:.0} s",
                    record.step, record.val_loss, record.lr, record.tokens, record.elapsed_s
                )
            });
        }
        Event::Saved(dir) => bar.suspend(|| log::info!("checkpoint written to {}", dir.display())),
    };
    let summary = pretrain(&gpu, start, &settings, &corpus, &tokenizer, &out, &stop, &mut on_event)?;
    bar.finish_and_clear();
    if summary.stopped_early {
        eprintln!(
            "stopped at step {} of {}; the checkpoint is in {}. Continue with: shadertune pretrain --resume {}",
            summary.steps,
            summary.total_steps,
            out.join("checkpoint").display(),
            out.display()
        );
        return Ok(());
    }
    if let Some(redrawn) = &summary.redrawn {
        eprintln!(
            "re-drew the embeddings of {} tokens absent from the training text (centre norm {:.2}, spread {:.4})",
            redrawn.tokens, redrawn.centre_norm, redrawn.spread
        );
    }
    let last = summary.history.last();
    println!(
        "pretrained {} steps in {:.0} s; final validation loss {}; model written to {}",
        summary.steps,
        summary.elapsed_s,
        last.map_or("-".to_string(), |r| format!("{:.4}", r.val_loss)),
        out.display()
    );
    Ok(())
}
