//! `shadertune train`: fine-tune a GPT into a text classifier and write its report card.

use clap::Args;
use shadertune::data::{Balance, ColumnSpec, DataFormat, ReadOptions};
use shadertune::model::gpt2::{Precision, Trainable};
use shadertune::model::load::{assets_dir, default_model_dir};
use shadertune::model::lora::{parse_targets, LoraSpec};
use shadertune::train::checkpoint;
use shadertune::train::classifier::{train_classifier, OnNan, Report, TrainConfig};
use shadertune::train::report::{format_confusion_table, format_per_label};
use shadertune::train::schedule::Schedule;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub(crate) struct TrainArgs {
    /// Model: a Hugging Face directory (config.json, model.safetensors, tokenizer) or a name in
    /// the local Hugging Face cache (gpt2, gpt2-medium, gpt2-large, gpt2-xl). Default: the
    /// bundled model.
    #[arg(long)]
    model: Option<String>,
    /// Labelled data: TSV (label<TAB>text or text<TAB>label), CSV with a header, JSONL, or a
    /// directory of such files. Default: the bundled SMS Spam Collection.
    #[arg(long)]
    data: Option<PathBuf>,
    #[command(flatten)]
    columns: DataArgs,
    /// Label balancing before the split: undersample (every label cut to the rarest one's
    /// count) or none.
    #[arg(long, default_value = "undersample", value_parser = parse_balance)]
    balance: Balance,
    /// Train, validation and test fractions, summing to 1.
    #[arg(long, default_value = "0.7,0.1,0.2", value_parser = parse_split)]
    split: [f64; 3],
    /// Seed of balancing, splitting, shuffling and initialisation.
    #[arg(long, default_value_t = 123)]
    seed: u64,
    /// Tokens per example; longer texts are truncated and counted. Default: the longest
    /// training example, capped at the model's n_positions.
    #[arg(long)]
    max_length: Option<usize>,
    /// Parameters to train: head, last-blocks:N (last N blocks + final layer norm + head) or all.
    /// Default: last-blocks:1, or all for a model without weights.
    #[arg(long)]
    train: Option<Trainable>,
    /// Peak learning rate of AdamW. Default: 5e-5, or the bundled model's recommendation.
    #[arg(long)]
    lr: Option<f32>,
    /// Decoupled weight decay of AdamW.
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f32,
    /// Passes over the training split. Default: 5, or the bundled model's recommendation.
    #[arg(long)]
    epochs: Option<usize>,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Micro-batches whose gradients are summed per optimizer step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// Optimizer steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Learning rate after warm-up: constant or cosine (decays to 0 at the last step).
    #[arg(long, default_value = "constant")]
    schedule: Schedule,
    /// Clip gradients to this global L2 norm (off by default).
    #[arg(long)]
    clip_grad_norm: Option<f32>,
    /// Evaluate every this many optimizer steps.
    #[arg(long, default_value_t = 50)]
    eval_every: usize,
    /// Batches of each split in a periodic evaluation.
    #[arg(long, default_value_t = 5)]
    eval_batches: usize,
    /// Output directory. Default: runs/<timestamp>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Optimizer steps between checkpoints in OUT/checkpoint/ (0: only at the end). Ctrl-C
    /// also writes one.
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Continue the interrupted run whose --out directory is DIR, with its original command line.
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// On a NaN or infinite loss: stop (with a checkpoint of the last good state) or skip the batch.
    #[arg(long, default_value = "stop")]
    on_nan: OnNan,
    /// Storage of the frozen linear weights of the blocks: f32, or f16 (half their memory; the
    /// kernels multiply and sum in f32). Trainable weights, embeddings and biases stay f32.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    #[command(flatten)]
    lora: LoraArgs,
    #[command(flatten)]
    device: super::DeviceArgs,
}

/// LoRA settings, shared by `train` and `plan`.
#[derive(Args, Debug, Clone)]
pub(crate) struct LoraArgs {
    /// Train LoRA adapters of rank R on the targeted layers instead of the model: the base
    /// weights stay frozen and only the adapters and the head train. Writes OUT/adapter/ (PEFT
    /// format) and OUT/model/ with the adapters merged.
    #[arg(long, value_name = "R")]
    lora_rank: Option<usize>,
    /// LoRA alpha: the adapters' output is scaled by alpha / R. Default: 2 x R.
    #[arg(long, value_name = "A", requires = "lora_rank")]
    lora_alpha: Option<f32>,
    /// Layers that get adapters, by PEFT's module names: c_attn, c_proj (both projections),
    /// c_fc, attn.c_proj, mlp.c_proj, or full paths such as h.11.mlp.c_fc.
    #[arg(long, value_name = "LIST", default_value = "c_attn,c_proj,c_fc", requires = "lora_rank")]
    lora_targets: String,
    /// Dropout probability on the adapters' input while training.
    #[arg(long, value_name = "P", default_value_t = 0.0, requires = "lora_rank")]
    lora_dropout: f32,
    /// QLoRA: store the frozen linear weights of the blocks as nf4 (4-bit NormalFloat, blocks of
    /// 64 with one f32 scale each) and dequantise them inside the matmul kernels. nf4-dq also
    /// quantises the scales to 8 bits (double quantisation).
    #[arg(long, value_name = "FORMAT", value_parser = ["nf4", "nf4-dq"], requires = "lora_rank")]
    quantize: Option<String>,
}

impl LoraArgs {
    /// Returns the validated settings, or `None` without --lora-rank.
    pub(crate) fn spec(&self) -> anyhow::Result<Option<LoraSpec>> {
        let Some(rank) = self.lora_rank else { return Ok(None) };
        let alpha = self.lora_alpha.unwrap_or(2.0 * rank as f32);
        let mut spec = LoraSpec::new(rank, alpha, self.lora_dropout, parse_targets(&self.lora_targets))?;
        spec.quantize_base = self.quantize.is_some();
        spec.double_quant = self.quantize.as_deref() == Some("nf4-dq");
        Ok(Some(spec))
    }
}

/// Column and format selection, shared by `train` and `eval`.
#[derive(Args, Debug, Clone)]
pub(crate) struct DataArgs {
    /// Text column: a header name, or a 0-based index in a file without a header.
    #[arg(long)]
    text_column: Option<String>,
    /// Label column: a header name, or a 0-based index in a file without a header.
    #[arg(long)]
    label_column: Option<String>,
    /// Data format when the extension does not tell: tsv, csv or jsonl.
    #[arg(long)]
    format: Option<String>,
}

impl DataArgs {
    pub fn read_options(&self) -> anyhow::Result<ReadOptions> {
        let column = |s: &Option<String>| {
            s.as_ref().map(|v| match v.parse::<usize>() {
                Ok(i) => ColumnSpec::Index(i),
                Err(_) => ColumnSpec::Name(v.clone()),
            })
        };
        let format = match self.format.as_deref() {
            None => None,
            Some("tsv") => Some(DataFormat::Tsv),
            Some("csv") => Some(DataFormat::Csv),
            Some("jsonl") | Some("json") => Some(DataFormat::Jsonl),
            Some(other) => anyhow::bail!("invalid --format `{other}`, expected tsv, csv or jsonl"),
        };
        Ok(ReadOptions { format, text_column: column(&self.text_column), label_column: column(&self.label_column), tsv_header: None })
    }
}

fn parse_balance(s: &str) -> Result<Balance, String> {
    match s {
        "undersample" => Ok(Balance::Undersample),
        "none" => Ok(Balance::None),
        other => Err(format!("invalid balance `{other}`, expected undersample or none")),
    }
}

fn parse_split(s: &str) -> Result<[f64; 3], String> {
    let parts: Vec<&str> = s.split(',').collect();
    if parts.len() != 3 {
        return Err(format!("invalid split `{s}`, expected three fractions such as 0.7,0.1,0.2"));
    }
    let mut out = [0.0; 3];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p.trim().parse().map_err(|_| format!("invalid fraction `{p}` in --split {s}"))?;
    }
    Ok(out)
}

/// Training settings recommended by a bundled model, read from `shadertune.json` beside it.
#[derive(serde::Deserialize, Default)]
struct Recommendation {
    train: Option<String>,
    lr: Option<f32>,
    epochs: Option<usize>,
}

pub(crate) fn resolve_model(spec: Option<&str>) -> anyhow::Result<PathBuf> {
    match spec {
        None => Ok(default_model_dir()),
        // A directory with a config but no weights is a model to train from random weights.
        Some(s) if Path::new(s).join("config.json").is_file() && !Path::new(s).join("model.safetensors").exists() => {
            Ok(PathBuf::from(s))
        }
        Some(s) => Ok(shadertune::model::hub::resolve_model(s)?),
    }
}

/// Learning rate of LoRA runs without --lr.
const LORA_LR: f32 = 1e-3;

fn timestamp_dir() -> PathBuf {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    PathBuf::from("runs").join(format!("{secs}"))
}

pub(crate) fn run(args: &TrainArgs) -> anyhow::Result<()> {
    if let Some(run_dir) = &args.resume {
        return resume(run_dir);
    }
    run_with(args, std::env::args().collect(), false)
}

/// Repeats the stored command line of the run in `run_dir`, continuing from its checkpoint.
fn resume(run_dir: &Path) -> anyhow::Result<()> {
    let dir = checkpoint::find(run_dir)?;
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path)?;
    let state: checkpoint::TrainState =
        serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: not a train state: {e}", state_path.display()))?;
    if state.kind != "train" {
        anyhow::bail!("{}: written by `shadertune {}`; resume it with that command", state_path.display(), state.kind);
    }
    let command: Vec<String> = serde_json::from_value(state.settings["command"].clone())
        .map_err(|e| anyhow::anyhow!("{}: the stored command line is unreadable: {e}", state_path.display()))?;
    let cli = <super::Cli as clap::Parser>::try_parse_from(&command)
        .map_err(|e| anyhow::anyhow!("{}: the stored command line no longer parses: {e}", state_path.display()))?;
    let super::Command::Train(mut args) = cli.command else {
        anyhow::bail!("{}: the stored command line is not a train command", state_path.display());
    };
    // Relative paths in the stored command line are relative to the directory it ran in.
    let run_dir = std::path::absolute(run_dir)?;
    if let Some(dir) = state.settings["working_dir"].as_str() {
        std::env::set_current_dir(dir)
            .map_err(|e| anyhow::anyhow!("cannot enter {dir}, the directory the run started in: {e}"))?;
    }
    args.out = Some(run_dir.clone());
    eprintln!("resuming {} at step {}: {}", run_dir.display(), state.step, command.join(" "));
    run_with(&args, command, true)
}

fn run_with(args: &TrainArgs, command: Vec<String>, resume: bool) -> anyhow::Result<()> {
    let model_dir = resolve_model(args.model.as_deref())?;
    let data = args.data.clone().unwrap_or_else(|| assets_dir().join("data").join("sms_spam").join("SMSSpamCollection"));
    let out = args.out.clone().unwrap_or_else(timestamp_dir);
    let mut config = TrainConfig::new(model_dir.clone(), data, out.clone());
    let recommendation: Recommendation = match std::fs::read_to_string(model_dir.join("shadertune.json")) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", model_dir.join("shadertune.json").display()))?,
        Err(_) => Recommendation::default(),
    };
    let has_weights = model_dir.join("model.safetensors").exists();
    config.read = args.columns.read_options()?;
    config.balance = args.balance;
    config.split = args.split;
    config.seed = args.seed;
    config.max_length = args.max_length;
    config.lora = args.lora.spec()?;
    config.trainable = match (&args.train, &recommendation.train) {
        (Some(t), _) => *t,
        // With LoRA the base model is frozen: only the adapters and the head train.
        (None, _) if config.lora.is_some() => Trainable::Head,
        (None, Some(t)) => t.parse().map_err(|e: String| anyhow::anyhow!(e))?,
        (None, None) if !has_weights => Trainable::All,
        (None, None) => Trainable::LastBlocks(1),
    };
    // Adapters start at zero and have few parameters, so LoRA takes a larger step than full
    // fine-tuning.
    let default_lr = if config.lora.is_some() { Some(LORA_LR) } else { recommendation.lr };
    if let Some(lr) = args.lr.or(default_lr) {
        config.lr = lr;
    }
    if let Some(epochs) = args.epochs.or(recommendation.epochs) {
        config.epochs = epochs;
    }
    config.weight_decay = args.weight_decay;
    config.batch_size = args.batch_size;
    config.grad_accum = args.grad_accum;
    config.warmup_steps = args.warmup_steps;
    config.schedule = args.schedule;
    config.clip_grad_norm = args.clip_grad_norm;
    config.eval_every = args.eval_every;
    config.eval_batches = args.eval_batches;
    config.save_every = args.save_every;
    config.on_nan = args.on_nan;
    config.precision = args.precision;
    config.resume = resume;
    // The stored command line names the output directory, so that a resume writes to the same place.
    let mut command = command;
    if args.out.is_none() {
        command.extend(["--out".to_string(), out.display().to_string()]);
    }
    config.command = command;
    config.working_dir = std::env::current_dir().ok();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stop = stop.clone();
        if let Err(e) = ctrlc::set_handler(move || stop.store(true, std::sync::atomic::Ordering::SeqCst)) {
            log::warn!("Ctrl-C will not stop at a step boundary: {e}");
        }
    }
    config.stop = Some(stop);

    // An output directory that cannot be written fails now, not after the training.
    shadertune::train::classifier::check_output_dir(&out)?;
    let gpu = args.device.open()?;
    log::info!(
        "training {} on {} (train {}, lr {}, {} epochs, batch {})",
        model_dir.display(),
        config.data.display(),
        config.lora.as_ref().map_or(config.trainable.to_string(), |s| format!("LoRA r {} alpha {} on {}", s.rank, s.alpha, s.targets)),
        config.lr,
        config.epochs,
        config.batch_size
    );
    let report = train_classifier(&gpu, &config)?;
    print_report(&report);
    println!("\nwrote {}", out.display());
    Ok(())
}

pub(crate) fn print_report(report: &Report) {
    println!();
    for (name, m) in [("train", &report.train), ("validation", &report.validation), ("test", &report.test)] {
        println!("{name:>10}: accuracy {:.4}, loss {:.4} ({} examples)", m.accuracy, m.loss, m.confusion_matrix.iter().flatten().sum::<u64>());
    }
    println!("\ntest confusion matrix (rows: true label, columns: predicted):");
    println!("{}", format_confusion_table(&report.test));
    println!("{}", format_per_label(&report.test));
}
