//! `shadertune predict` and `shadertune eval`: use a trained classifier.

use clap::Args;
use shadertune::model::gpt2::Precision;
use shadertune::train::classifier::{write_report, DatasetSummary, Report, RunSummary};
use shadertune::train::classify::Classifier;
use shadertune::train::metrics::SplitMetrics;
use std::io::BufRead;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct PredictArgs {
    /// Classifier directory written by `shadertune train` (its `model/` folder), or with
    /// --adapter the base model the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// LoRA adapter directory (PEFT format, from `shadertune train --lora-rank` or PEFT) to
    /// merge into --model before use.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Texts to classify.
    texts: Vec<String>,
    /// Read texts from a file, one per line (in addition to any given as arguments).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Print a JSON array instead of text.
    #[arg(long)]
    json: bool,
    /// Storage of the linear weights of the blocks on the device: f32, or f16, which halves
    /// their memory. The kernels multiply and sum in f32 either way.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    #[command(flatten)]
    device: super::DeviceArgs,
}

pub(crate) fn run_predict(args: &PredictArgs) -> anyhow::Result<()> {
    let mut texts = args.texts.clone();
    if let Some(path) = &args.file {
        let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("failed to open {}: {e}", path.display()))?;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1))?;
            if !line.trim().is_empty() {
                texts.push(line);
            }
        }
    }
    if texts.is_empty() {
        anyhow::bail!("no text to classify: give texts as arguments or --file PATH");
    }
    let classifier = Classifier::open_with(&args.model, args.adapter.as_deref())?.with_precision(args.precision)?;
    let gpu = args.device.open()?;
    let predictions = classifier.predict(&gpu, &texts, args.batch_size)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&predictions)?);
    } else {
        for p in &predictions {
            let prob = p.probabilities[&p.label];
            println!("{}\t{:.4}\t{}", p.label, prob, p.text);
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub(crate) struct EvalArgs {
    /// Classifier directory written by `shadertune train` (its `model/` folder), or with
    /// --adapter the base model the adapter was trained on.
    #[arg(long)]
    model: PathBuf,
    /// LoRA adapter directory (PEFT format, from `shadertune train --lora-rank` or PEFT) to
    /// merge into --model before use.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Labelled data file or directory.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    columns: super::train::DataArgs,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per example; longer texts are truncated. Default: the longest example, capped at
    /// n_positions.
    #[arg(long)]
    max_length: Option<usize>,
    /// Output directory for metrics.json and confusion_matrix.png. Default: runs/eval-<timestamp>.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Storage of the linear weights of the blocks on the device: f32, or f16, which halves
    /// their memory. The kernels multiply and sum in f32 either way.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    #[command(flatten)]
    device: super::DeviceArgs,
}

pub(crate) fn run_eval(args: &EvalArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let out = args.out.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        PathBuf::from("runs").join(format!("eval-{secs}"))
    });
    shadertune::train::classifier::check_output_dir(&out)?;
    let classifier = Classifier::open_with(&args.model, args.adapter.as_deref())?.with_precision(args.precision)?;
    let gpu = args.device.open()?;
    let read = args.columns.read_options()?;
    let (eval, dataset, seq_len, truncated) = classifier.evaluate_file(&gpu, &args.data, &read, args.batch_size, args.max_length)?;
    let labels = classifier.labels().to_vec();
    let metrics = SplitMetrics::from_predictions(&labels, &eval.truths, &eval.predictions, eval.loss);
    let empty = SplitMetrics::from_predictions(&labels, &[], &[], f64::NAN);
    let report = Report {
        train: empty.clone(),
        validation: empty,
        test: metrics,
        dataset: DatasetSummary {
            path: args.data.display().to_string(),
            rows: dataset.rows_read,
            rows_per_label: dataset.rows_per_label.clone(),
            rows_after_balancing: dataset.rows_read,
            split_sizes: [("test".to_string(), dataset.rows_read)].into_iter().collect(),
            max_length: seq_len,
            truncated,
        },
        run: RunSummary {
            model: args.model.display().to_string(),
            adapter: args.adapter.as_ref().map(|a| a.display().to_string()),
            backend: gpu.describe(),
            seconds: started.elapsed().as_secs_f64(),
            trainable_parameters: 0,
            frozen_parameters: 0,
            train: "none".into(),
            precision: classifier.precision(),
            steps: 0,
            lr: 0.0,
            epochs: 0,
            batch_size: args.batch_size,
            seed: 0,
            random_init: false,
        },
    };
    write_report(&out, &report, &[])?;
    super::train::print_report(&report);
    println!("\nwrote {}", out.display());
    Ok(())
}
