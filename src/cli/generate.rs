//! `shadertune generate`: continue a prompt with a language model, token by token.

use clap::Args;
use shadertune::data::Gpt2Tokenizer;
use shadertune::generate::{GenerateOptions, Generator, SamplingSettings, StopReason};
use shadertune::model::load::open_language_model;
use std::io::Write;

#[derive(Args, Debug)]
pub(crate) struct GenerateArgs {
    /// Language model: a Hugging Face directory (config.json, model.safetensors, tokenizer) or a
    /// name in the local Hugging Face cache (gpt2, gpt2-medium, gpt2-large, gpt2-xl). Default:
    /// the bundled model (tiny and briefly trained, so expect Shakespeare-flavoured noise).
    #[arg(long)]
    model: Option<String>,
    /// Text to continue. An empty prompt starts from <|endoftext|>, as GPT-2 begins a new
    /// document.
    #[arg(long)]
    prompt: String,
    /// Tokens to generate at most after the prompt.
    #[arg(long, default_value_t = 50)]
    max_new_tokens: usize,
    /// Softmax temperature (>= 0) that divides the logits; 0 always picks the most likely token
    /// (greedy decoding).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true, value_parser = parse_temperature)]
    temperature: f32,
    /// Sample only among the K most likely tokens; 0 samples from the whole vocabulary.
    #[arg(long, default_value_t = 50, value_name = "K")]
    top_k: usize,
    /// Seed of the token sampler (and of the weights of a model directory without them); the
    /// same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating after <|endoftext|> instead of stopping there.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    device: super::DeviceArgs,
}

fn parse_temperature(s: &str) -> Result<f32, String> {
    let value: f32 = s.trim().parse().map_err(|_| format!("temperature `{s}` is not a number"))?;
    if !(value.is_finite() && value >= 0.0) {
        return Err(format!("temperature {s} is invalid: it must be a finite number >= 0 (0 picks the most likely token)"));
    }
    Ok(value)
}

/// Writes generated tokens to stdout as soon as they form whole characters.
struct TextStream<'t> {
    tokenizer: &'t Gpt2Tokenizer,
    out: std::io::StdoutLock<'static>,
    /// Tokens not yet written, because they end inside a multi-byte UTF-8 character.
    pending: Vec<u32>,
}

/// Tokens of one character at most: GPT-2's byte-level tokens cover at least one byte each, and
/// a UTF-8 character has at most four bytes.
const MAX_TOKENS_PER_CHARACTER: usize = 4;

impl TextStream<'_> {
    fn push(&mut self, token: u32) -> std::io::Result<()> {
        self.pending.push(token);
        let text = self.tokenizer.decode(&self.pending);
        // Decoding replaces an incomplete character with U+FFFD; wait for its other bytes.
        if text.ends_with('\u{FFFD}') && self.pending.len() < MAX_TOKENS_PER_CHARACTER {
            return Ok(());
        }
        self.pending.clear();
        self.out.write_all(text.as_bytes())?;
        self.out.flush()
    }

    fn finish(&mut self) -> std::io::Result<()> {
        let text = self.tokenizer.decode(&self.pending);
        self.pending.clear();
        writeln!(self.out, "{text}")?;
        self.out.flush()
    }
}

pub(crate) fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let dir = super::train::resolve_model(args.model.as_deref())?;
    let model = open_language_model(&dir, args.seed)?;
    let config = &model.config;
    log::info!(
        "model {}: {} layers, {} heads, {} channels, context {} tokens",
        dir.display(),
        config.n_layer,
        config.n_head,
        config.n_embd,
        config.n_positions
    );
    if model.random_init {
        log::warn!("{} has no model.safetensors; its weights are random (seed {}), so the text will be random too", dir.display(), args.seed);
    }
    let sampling = SamplingSettings { temperature: args.temperature, top_k: args.top_k, seed: args.seed };
    let eos = model.tokenizer.eos_id();
    let options = GenerateOptions { max_new_tokens: args.max_new_tokens, sampling, stop_token: (!args.ignore_eos).then_some(eos) };
    let mut prompt_ids = model.tokenizer.encode(&args.prompt);
    if prompt_ids.is_empty() {
        prompt_ids.push(eos);
    }

    let gpu = args.device.open()?;
    let mut generator = Generator::new(&gpu, config, &model.weights)?;
    drop(model.weights);

    let mut stream = TextStream { tokenizer: &model.tokenizer, out: std::io::stdout().lock(), pending: Vec::new() };
    stream.out.write_all(args.prompt.as_bytes())?;
    stream.out.flush()?;
    let generation = generator.generate(&prompt_ids, &options, |token| {
        // The stop token ends the text; it is not part of it.
        if options.stop_token == Some(token) {
            return Ok(());
        }
        stream.push(token)
    })?;
    stream.finish()?;

    let count = generation.tokens.len();
    let rate = if generation.generate_seconds > 0.0 { count as f64 / generation.generate_seconds } else { 0.0 };
    let stop = match generation.stop {
        StopReason::MaxNewTokens => format!("reached --max-new-tokens {}", args.max_new_tokens),
        StopReason::StopToken => "stopped at <|endoftext|>".to_string(),
        StopReason::ContextLimit => {
            format!("stopped at the model's context limit of {} tokens (n_positions)", config.n_positions)
        }
    };
    eprintln!(
        "{count} tokens in {:.2} s ({rate:.1} tokens/s) after a {}-token prompt in {:.2} s; {stop}",
        generation.generate_seconds,
        prompt_ids.len(),
        generation.prompt_seconds
    );
    Ok(())
}
