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
        BenchCommand::Kernels(k) => {
            let gpu = k.device.open()?;
            let shapes = if k.tiny { BenchShapes::tiny() } else { BenchShapes::gpt2_small() };
            let results = bench_kernels(&gpu, shapes, k.warmup, k.repeats.max(1))?;
            if k.json {
                println!("{}", serde_json::to_string_pretty(&results)?);
                return Ok(());
            }
            println!("adapter: {}", gpu.describe());
            println!("{:<42} {:<36} {:>10} {:>12}", "kernel", "shape", "median ms", "rate");
            for r in &results {
                let rate = match (r.gflops, r.gbps) {
                    (Some(g), _) => format!("{g:.2} GFLOP/s"),
                    (None, Some(b)) => format!("{b:.2} GB/s"),
                    _ => String::new(),
                };
                println!("{:<42} {:<36} {:>10.3} {:>12}", r.kernel, r.shape, r.ms, rate);
            }
            Ok(())
        }
    }
}
