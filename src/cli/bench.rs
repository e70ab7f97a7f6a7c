//! `shadertune bench`: kernel timings on GPT-2 small shapes.

use clap::{Args, Subcommand};
use shadertune::bench::{bench_kernels, BenchShapes};

#[derive(Args, Debug)]
pub(crate) struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Time every kernel family on GPT-2 small shapes (batch 8 x 120 tokens).
    Kernels(KernelArgs),
    /// Time whole training steps of a model with random weights, with a per-kernel profile.
    Step(StepArgs),
}

#[derive(Args, Debug)]
struct StepArgs {
    /// A config.json, or a preset: `mini` or `small` (GPT-2 124M).
    #[arg(long, default_value = "small")]
    config: String,
    /// Parameters to train: head, last-blocks:N or all.
    #[arg(long, default_value = "last-blocks:1")]
    train: shadertune::model::gpt2::Trainable,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 120)]
    max_length: usize,
    /// Time the language-model head instead of a 2-class classifier.
    #[arg(long)]
    lm: bool,
    #[command(flatten)]
    lora: super::train::LoraArgs,
    /// Storage of the frozen linear weights: f32, or f16 (f32 arithmetic).
    #[arg(long, default_value = "f32")]
    precision: shadertune::model::gpt2::Precision,
    /// Untimed steps before timing.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: super::DeviceArgs,
}

#[derive(Args, Debug)]
struct KernelArgs {
    /// Untimed runs of each kernel before timing (the first run also compiles the pipeline).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Timed runs of each kernel; the median is reported.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Use tiny shapes instead of GPT-2 small, for a quick smoke run.
    #[arg(long)]
    tiny: bool,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: super::DeviceArgs,
}

pub(crate) fn run(args: &BenchArgs) -> anyhow::Result<()> {
    match &args.what {
        BenchCommand::Step(s) => run_step(s),
        BenchCommand::Kernels(k) => {
            let gpu = k.device.open()?;
            let shapes = if k.tiny { BenchShapes::tiny() } else { BenchShapes::gpt2_small() };
            let results = bench_kernels(&gpu, shapes, k.warmup, k.repeats.max(1))?;
            if k.json {
                println!("{}", serde_json::to_string_pretty(&results)?);
                return Ok(());
            }
            println!("adapter: {}", gpu.describe());
            println!("matmul:  {} (autotune {})", shadertune::bench::matmul_variants(&gpu)?, autotune_word(&gpu));
            let width = results.iter().map(|r| r.kernel.len()).max().unwrap_or(0).max(6);
            println!("{:<width$} {:<36} {:>10} {:>12}", "kernel", "shape", "median ms", "rate");
            for r in &results {
                let rate = match (r.gflops, r.gbps) {
                    (Some(g), _) => format!("{g:.2} GFLOP/s"),
                    (None, Some(b)) => format!("{b:.2} GB/s"),
                    _ => String::new(),
                };
                println!("{:<width$} {:<36} {:>10.3} {:>12}", r.kernel, r.shape, r.ms, rate);
            }
            Ok(())
        }
    }
}

fn run_step(args: &StepArgs) -> anyhow::Result<()> {
    use shadertune::model::gpt2::{BatchShape, Head};
    let config = super::plan::load_config(None, Some(&args.config))?;
    if args.max_length == 0 || args.max_length > config.n_positions {
        anyhow::bail!("--max-length {} is out of range: expected 1..={} (n_positions of the model)", args.max_length, config.n_positions);
    }
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let gpu = args.device.open()?;
    let head = if args.lm { Head::LanguageModelLoss } else { Head::Classifier { num_labels: 2 } };
    let shape = BatchShape { batch: args.batch_size, seq_len: args.max_length };
    let lora = args.lora.spec()?;
    let trainable = if lora.is_some() { shadertune::model::gpt2::Trainable::Head } else { args.train };
    let t = shadertune::bench::bench_step(&gpu, &config, head, shape, trainable, lora.as_ref(), args.precision, args.warmup, args.repeats.max(1))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&t)?);
        return Ok(());
    }
    println!("adapter: {}", gpu.describe());
    println!("matmul:  {} (autotune {})", shadertune::bench::matmul_variants(&gpu)?, autotune_word(&gpu));
    println!(
        "model: {} layers, n_embd {}, vocab {}; batch {} x {} tokens; train {}; frozen weights in {}",
        config.n_layer,
        config.n_embd,
        config.vocab_size,
        args.batch_size,
        args.max_length,
        lora.as_ref().map_or(trainable.to_string(), |l| format!("LoRA r {} on {}", l.rank, l.targets)),
        args.precision
    );
    println!("parameters:  {} trainable; {:.1} MiB peak", t.trainable_params, t.peak_bytes as f64 / (1 << 20) as f64);
    println!("step:        {:.1} ms ({:.0} tokens/s)", t.ms_per_step, t.tokens_per_s);
    println!("throughput:  {:.2} GFLOP/s of {:.1} GFLOP per step", t.gflops, t.flops_per_step as f64 / 1e9);
    println!("matmul peak: {:.2} GFLOP/s in this run; step/peak ratio {:.2}", t.matmul_peak_gflops, t.ratio_to_matmul_peak);
    if !t.profile.is_empty() {
        let total: f64 = t.profile.iter().map(|(_, ms)| ms).sum();
        println!("\nGPU time per kernel kind in one step (each dispatch timed in its own pass):");
        for (kind, ms) in &t.profile {
            println!("  {kind:<32} {ms:>10.2} ms {:>6.1}%", 100.0 * ms / total);
        }
    }
    Ok(())
}

fn autotune_word(gpu: &shadertune::gpu::Gpu) -> &'static str {
    match gpu.autotune() {
        shadertune::gpu::Autotune::On => "on",
        shadertune::gpu::Autotune::Off => "off",
    }
}
