//! `shadertune devices`: the adapters wgpu finds, with the limits and features that matter here.

use clap::Args;
use shadertune::gpu::{list_adapters, BackendChoice};

#[derive(Args, Debug)]
pub(crate) struct DevicesArgs {
    /// Graphics API to search: auto, vulkan, metal, dx12 or gl.
    #[arg(long, default_value = "auto", value_parser = super::parse_backend)]
    backend: BackendChoice,
    /// Print a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Also open each adapter and compile every kernel on it.
    #[arg(long)]
    check: bool,
}

pub(crate) fn run(args: &DevicesArgs) -> anyhow::Result<()> {
    let adapters = list_adapters(args.backend);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&adapters)?);
        return Ok(());
    }
    if adapters.is_empty() {
        // The same message a run would fail with, naming what to install.
        let error = shadertune::gpu::Gpu::new(&shadertune::gpu::GpuOptions { backend: args.backend, adapter: None, ..Default::default() })
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no adapter found".to_string());
        anyhow::bail!(error);
    }
    const MIB: f64 = 1024.0 * 1024.0;
    for a in &adapters {
        println!("[{}] {}", a.index, a.name);
        println!("    backend:            {}", a.backend);
        println!("    type:               {}", a.device_type);
        println!("    driver:             {}", a.driver);
        println!("    max storage binding: {:.0} MiB ({} bytes)", a.max_storage_buffer_binding_size as f64 / MIB, a.max_storage_buffer_binding_size);
        println!("    max buffer:         {:.0} MiB ({} bytes)", a.max_buffer_size as f64 / MIB, a.max_buffer_size);
        println!("    workgroup storage:  {} KiB", a.max_compute_workgroup_storage_size / 1024);
        println!("    invocations:        {} per workgroup", a.max_compute_invocations_per_workgroup);
        println!("    workgroups:         {} per dimension", a.max_compute_workgroups_per_dimension);
        let features = if a.features.is_empty() { "none".to_string() } else { a.features.join(", ") };
        println!("    features:           {features}");
        if args.check {
            let options = shadertune::gpu::GpuOptions { backend: args.backend, adapter: Some(a.index), ..Default::default() };
            let result = shadertune::gpu::Gpu::new(&options).and_then(|gpu| gpu.compile_kernels());
            match result {
                Ok(count) => println!("    kernels:            all {count} compile"),
                Err(e) => println!("    kernels:            FAILED: {e}"),
            }
        }
    }
    Ok(())
}
