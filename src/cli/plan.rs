//! `shadertune plan`: what one training step costs, before anything runs.

use clap::Args;
use shadertune::model::config::Gpt2Config;
use shadertune::model::gpt2::{check_f16, lora_layer_kernels, plan_summary, BatchShape, Head, Precision, Trainable};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub(crate) struct PlanArgs {
    /// Hugging Face model directory whose config.json gives the shapes.
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A config.json, or a preset: `mini` or `small` (GPT-2 124M). Weights are not needed.
    #[arg(long)]
    config: Option<String>,
    /// Parameters to train: head, last-blocks:N (last N blocks, final layer norm and head) or all.
    #[arg(long, default_value = "last-blocks:1")]
    train: Trainable,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 120)]
    max_length: usize,
    /// Number of classes of the classification head.
    #[arg(long, default_value_t = 2)]
    num_labels: usize,
    /// Plan the language-model head (tied to wte) instead of a classification head.
    #[arg(long)]
    lm: bool,
    /// Include gradient clipping by global norm in the optimizer.
    #[arg(long)]
    clip: bool,
    /// Storage of the frozen linear weights: f32, or f16 (half the memory, f32 arithmetic).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    lora: super::train::LoraArgs,
    #[command(flatten)]
    device: super::DeviceArgs,
}

/// Storage binding limit assumed when no adapter can be opened: the WebGPU default, 128 MiB.
const DEFAULT_MAX_BINDING: u64 = 128 << 20;

pub(crate) fn load_config(model: Option<&PathBuf>, config: Option<&str>) -> anyhow::Result<Gpt2Config> {
    let config = match (model, config) {
        (Some(dir), _) => Gpt2Config::from_file(&dir.join("config.json"))?,
        (None, Some("mini")) => Gpt2Config::mini(),
        (None, Some("small")) => Gpt2Config::small(),
        (None, Some(path)) => Gpt2Config::from_file(std::path::Path::new(path))?,
        (None, None) => anyhow::bail!("no model given: pass --model DIR or --config PATH|mini|small"),
    };
    Ok(config)
}

pub(crate) fn run(args: &PlanArgs) -> anyhow::Result<()> {
    let config = load_config(args.model.as_ref(), args.config.as_deref())?;
    if args.max_length == 0 || args.max_length > config.n_positions {
        anyhow::bail!("--max-length {} is out of range: expected 1..={} (n_positions of the model)", args.max_length, config.n_positions);
    }
    if args.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if let Trainable::LastBlocks(n) = args.train {
        if n > config.n_layer {
            anyhow::bail!("--train last-blocks:{n} asks for more blocks than the model has ({})", config.n_layer);
        }
    }
    let max_binding = match args.device.open() {
        Ok(gpu) => gpu.limits().max_storage_buffer_binding_size,
        Err(e) => {
            log::warn!("no adapter ({e:#}); planning with a {DEFAULT_MAX_BINDING}-byte storage binding limit");
            DEFAULT_MAX_BINDING
        }
    };
    let head = if args.lm { Head::LanguageModelLoss } else { Head::Classifier { num_labels: args.num_labels } };
    let shape = BatchShape { batch: args.batch_size, seq_len: args.max_length };
    let lora = args.lora.spec()?;
    let trainable = if lora.is_some() { Trainable::Head } else { args.train };
    if let Some(spec) = &lora {
        spec.modules(&config)?;
        if spec.quantize_base && args.precision == Precision::F16 {
            anyhow::bail!(shadertune::model::gpt2::F16_WITH_QUANTIZE);
        }
        if spec.quantize_base {
            shadertune::model::lora::check_quantizable(&config)?;
        }
    }
    if args.precision == Precision::F16 {
        check_f16(&config).map_err(anyhow::Error::msg)?;
    }
    let s = plan_summary(&config, head, shape, trainable, lora.as_ref(), args.precision, args.clip, max_binding);
    // LoRA is reported next to full fine-tuning of the same model and batch.
    let full = lora.as_ref().map(|_| plan_summary(&config, head, shape, Trainable::All, None, Precision::F32, args.clip, max_binding));
    if args.json {
        let value = match &full {
            Some(full) => serde_json::json!({ "lora": s, "full": full }),
            None => serde_json::to_value(&s)?,
        };
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    const MIB: f64 = 1024.0 * 1024.0;
    let gflop = |f: u64| f as f64 / 1e9;
    println!(
        "model: {} layers, {} heads, n_embd {}, vocab {}; batch {} x {} tokens; train {}",
        config.n_layer,
        config.n_head,
        config.n_embd,
        config.vocab_size,
        args.batch_size,
        args.max_length,
        lora.as_ref().map_or(args.train.to_string(), |l| format!("LoRA r {} alpha {} on {} (and the head)", l.rank, l.alpha, l.targets))
    );
    println!("dispatches:        {} forward, {} backward, {} optimizer", s.forward_dispatches, s.backward_dispatches, s.optimizer_dispatches);
    println!("FLOPs per step:    {:.2} GFLOP forward, {:.2} GFLOP backward", gflop(s.forward_flops), gflop(s.backward_flops));
    println!("parameters:        {} trainable, {} frozen", s.trainable_params, s.frozen_params);
    println!("gradient buffers:  {}", s.gradient_buffers);
    println!(
        "memory:            {:.1} MiB peak = {:.1} MiB parameters + {:.1} MiB gradients and AdamW moments + {:.1} MiB activations (without reuse {:.1} MiB) + inputs",
        s.peak_bytes as f64 / MIB,
        s.param_bytes as f64 / MIB,
        s.optimizer_bytes as f64 / MIB,
        s.activation_bytes as f64 / MIB,
        s.activation_bytes_without_reuse as f64 / MIB
    );
    if args.precision == Precision::F16 {
        let f32_plan = plan_summary(&config, head, shape, trainable, lora.as_ref(), Precision::F32, args.clip, max_binding);
        println!(
            "f16 frozen weights: {:.1} MiB of parameters instead of {:.1} MiB in f32",
            s.param_bytes as f64 / MIB,
            f32_plan.param_bytes as f64 / MIB
        );
    }
    if let (Some(spec), Some(full)) = (&lora, &full) {
        println!(
            "against --train all: {} trainable parameters instead of {} ({:.2}%), {:.1} MiB peak instead of {:.1} MiB",
            s.trainable_params,
            full.trainable_params,
            100.0 * s.trainable_params as f64 / full.trainable_params.max(1) as f64,
            s.peak_bytes as f64 / MIB,
            full.peak_bytes as f64 / MIB
        );
        if spec.quantize_base {
            let unquantized = shadertune::model::lora::LoraSpec { quantize_base: false, double_quant: false, ..spec.clone() };
            let plain = plan_summary(&config, head, shape, Trainable::Head, Some(&unquantized), Precision::F32, args.clip, max_binding);
            println!(
                "nf4 base weights: {:.1} MiB of parameters instead of {:.1} MiB with f32 LoRA",
                s.param_bytes as f64 / MIB,
                plain.param_bytes as f64 / MIB
            );
        }
        let kernels = lora_layer_kernels(&config, head, shape, spec, max_binding);
        if let Some(first) = spec.modules(&config)?.first() {
            println!("kernels of one adapted layer ({}) per step; the base product runs once:", first.prefix);
            for line in kernels {
                println!("  {line}");
            }
        }
    }
    Ok(())
}
