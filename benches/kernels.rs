//! `cargo bench --bench kernels`: the kernel timings of `shadertune bench kernels`.
//! Set `SHADERTUNE_BENCH_TINY=1` to use tiny shapes (for CI smoke runs).

use shadertune::bench::{bench_kernels, BenchShapes};
use shadertune::gpu::{Gpu, GpuOptions};

fn main() {
    let gpu = match Gpu::new(&GpuOptions::default()) {
        Ok(gpu) => gpu,
        Err(e) => {
            eprintln!("skipping kernel benchmarks: {e}");
            return;
        }
    };
    let tiny = std::env::var("SHADERTUNE_BENCH_TINY").as_deref() == Ok("1");
    let shapes = if tiny { BenchShapes::tiny() } else { BenchShapes::gpt2_small() };
    let results = bench_kernels(&gpu, shapes, 3, 10).expect("kernel benchmark failed");
    println!("adapter: {}", gpu.describe());
    for r in results {
        let rate = match (r.gflops, r.gbps) {
            (Some(g), _) => format!("{g:.2} GFLOP/s"),
            (None, Some(b)) => format!("{b:.2} GB/s"),
            _ => String::new(),
        };
        println!("{:<42} {:<36} {:>10.3} ms {:>14}", r.kernel, r.shape, r.ms, rate);
    }
}
