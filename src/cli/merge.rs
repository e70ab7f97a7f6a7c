//! `shadertune merge`: fold a LoRA adapter into its base model and write a plain checkpoint.

use clap::Args;
use shadertune::model::lora::open_with_adapter;
use shadertune::model::weights::{self, SaveDtype};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct MergeArgs {
    /// Base model directory the adapter was trained on (config.json, model.safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Adapter directory (adapter_config.json, adapter_model.safetensors), written by
    /// `shadertune train --lora-rank` or by PEFT.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory for the merged Hugging Face model.
    #[arg(long)]
    out: PathBuf,
    /// Storage type of the merged weights: f32 or f16.
    #[arg(long, default_value = "f32")]
    save_dtype: SaveDtype,
}

pub(crate) fn run(args: &MergeArgs) -> anyhow::Result<()> {
    shadertune::train::classifier::check_output_dir(&args.out)?;
    let merged = open_with_adapter(&args.model, &args.adapter)?;
    let model = &merged.model;
    let write = |what: &str, e: &dyn std::fmt::Display| anyhow::anyhow!("failed to write {what} in {}: {e}", args.out.display());
    model.config.save(&args.out).map_err(|e| write("config.json", &e))?;
    weights::save_as(&args.out.join(weights::WEIGHTS_FILE_NAME), &model.weights, &model.config, true, args.save_dtype)
        .map_err(|e| write(weights::WEIGHTS_FILE_NAME, &e))?;
    model.tokenizer.save(&args.out).map_err(|e| write("the tokenizer", &e))?;
    let spec = &merged.adapter.spec;
    let kind = match &merged.labels {
        Some(labels) => format!("classifier ({})", labels.join(", ")),
        None => "language model".to_string(),
    };
    println!(
        "merged LoRA r {} alpha {} on {} layers into {}; wrote a {kind} to {}",
        spec.rank,
        spec.alpha,
        merged.adapter.modules.len(),
        args.model.display(),
        args.out.display()
    );
    Ok(())
}
