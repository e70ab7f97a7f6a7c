//! Subcommands: parse arguments, turn them into library settings, run.

mod bench;
mod devices;
mod generate;
mod merge;
mod plan;
mod predict;
mod pretrain;
mod train;

use clap::{Args, Parser, Subcommand};
use shadertune::gpu::{BackendChoice, Gpu, GpuOptions};
use std::process::ExitCode;

/// Fine-tune, train and run GPT-2-family models with WGSL compute shaders on any GPU that wgpu
/// reaches (Vulkan, Metal, DX12, OpenGL).
#[derive(Parser, Debug)]
#[command(name = "shadertune", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// List every GPU adapter with its backend, driver, limits and features.
    Devices(devices::DevicesArgs),
    /// Print the execution plan of a model: dispatches, FLOPs, parameters and peak memory.
    Plan(plan::PlanArgs),
    /// Fine-tune a GPT into a text classifier and write the model and its report card.
    Train(train::TrainArgs),
    /// Evaluate a trained classifier on a labelled file and write its report card.
    Eval(predict::EvalArgs),
    /// Classify texts with a trained classifier.
    Predict(predict::PredictArgs),
    /// Fold a LoRA adapter into its base model and write a plain Hugging Face checkpoint.
    Merge(merge::MergeArgs),
    /// Pretrain a GPT on plain text (next-token prediction) and write a Hugging Face model.
    Pretrain(pretrain::PretrainArgs),
    /// Continue a prompt with a language model, streaming the generated text.
    Generate(generate::GenerateArgs),
    /// Benchmark kernels.
    Bench(bench::BenchArgs),
}

/// Adapter selection, shared by every command that runs kernels.
#[derive(Args, Debug, Clone)]
pub(crate) struct DeviceArgs {
    /// Graphics API to use: auto, vulkan, metal, dx12 or gl.
    #[arg(long, default_value = "auto", value_parser = parse_backend)]
    pub backend: BackendChoice,
    /// GPU adapter index as listed by `shadertune devices` (default: the first hardware
    /// adapter). `--adapter` is a LoRA adapter directory wherever it appears.
    #[arg(long = "gpu", value_name = "INDEX")]
    pub adapter: Option<usize>,
    /// Kernel variants: `on` times the candidates once per adapter and driver and caches the
    /// choice (in SHADERTUNE_CACHE_DIR, else the user's cache directory under shadertune/);
    /// `off` uses the fixed defaults documented in the README.
    #[arg(long, default_value = "on", value_name = "on|off", value_parser = parse_autotune)]
    pub autotune: shadertune::gpu::Autotune,
}

fn parse_autotune(s: &str) -> Result<shadertune::gpu::Autotune, String> {
    s.parse()
}

fn parse_backend(s: &str) -> Result<BackendChoice, String> {
    s.parse()
}

impl DeviceArgs {
    pub fn options(&self) -> GpuOptions {
        GpuOptions { backend: self.backend, adapter: self.adapter, autotune: self.autotune }
    }

    pub fn open(&self) -> anyhow::Result<Gpu> {
        Ok(Gpu::new(&self.options())?)
    }
}

/// Parses arguments, runs the command, prints the error chain once on failure.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_secs()
        .init();
    let result = match cli.command {
        Command::Devices(args) => devices::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Train(args) => train::run(&args),
        Command::Eval(args) => predict::run_eval(&args),
        Command::Predict(args) => predict::run_predict(&args),
        Command::Merge(args) => merge::run(&args),
        Command::Pretrain(args) => pretrain::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            if is_broken_pipe(&error) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {error:#}");
            ExitCode::from(1)
        }
    }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .filter_map(|e| e.downcast_ref::<std::io::Error>())
        .any(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}
