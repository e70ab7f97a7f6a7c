//! Text generation with a key/value cache.
//!
//! [`Generator`] uploads a language model once and runs it one position per step. The host
//! computes the token's embedding `wte[id] + wpe[pos]`. Every block reads the keys and values of
//! the earlier positions from its cache (`shaders/decode.wgsl`) and appends its own, and the LM
//! head produces the logits of the next token. The prefix is never recomputed, so only the
//! attention over the cache grows with the position.
//! [`Sampler`] picks the next token from the logits on the host: greedy, or temperature with
//! top-k from a seeded ChaCha8 generator, so the same seed gives the same text.

use crate::gpu::{Dispatch, Gpu, GpuError, TensorBinding};
use crate::kernels::decode::{self, DecodeShape};
use crate::kernels::matmul::{self, MatmulShape, WeightLayout};
use crate::kernels::{gelu, layernorm, residual};
use crate::model::config::Gpt2Config;
use crate::model::weights::{expected_shapes, fmt_shape, HeadKind, HostTensor, Weights};
use rand::{Rng, SeedableRng};
use std::time::Instant;

/// Errors of text generation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GenerateError {
    /// The device failed to create a buffer or kernel, or to run a step.
    #[error(transparent)]
    Gpu(#[from] GpuError),
    /// A parameter of the language model is missing.
    #[error("weight `{name}` is missing; generation needs every parameter of a GPT-2 language model")]
    MissingWeight {
        /// Canonical name of the parameter.
        name: String,
    },
    /// A parameter does not have the shape that the config implies.
    #[error("weight `{name}` has shape {found}, but the config implies {expected}")]
    WeightShape {
        /// Canonical name of the parameter.
        name: String,
        /// Shape found.
        found: String,
        /// Shape from the config.
        expected: String,
    },
    /// Generation needs at least one token to start from.
    #[error("the prompt has no tokens; give at least one (GPT-2 models start unconditional text from <|endoftext|>, id 50256)")]
    EmptyPrompt,
    /// The prompt does not fit in the model's context.
    #[error("the prompt has {tokens} tokens, more than the model's context of {n_positions} positions (n_positions); shorten it")]
    PromptTooLong {
        /// Tokens in the prompt.
        tokens: usize,
        /// The model's n_positions.
        n_positions: usize,
    },
    /// A token id has no embedding.
    #[error("token id {id} is outside the model's vocabulary of {vocab_size} tokens")]
    TokenOutOfRange {
        /// The token id.
        id: u32,
        /// The model's vocab_size.
        vocab_size: usize,
    },
    /// Every position of the cache contains a token already.
    #[error("the context is full: all {n_positions} positions (n_positions) hold a token; call reset to start a new text")]
    ContextFull {
        /// The model's n_positions.
        n_positions: usize,
    },
    /// The temperature is negative or not a number.
    #[error("invalid temperature {value}: it must be a finite number >= 0 (0 picks the most likely token)")]
    InvalidTemperature {
        /// The temperature given.
        value: f32,
    },
    /// The model produced a NaN or infinite logit.
    #[error("the model produced a non-finite logit ({value}) for token {token} at position {position}; the weights may contain NaN or overflow in f32")]
    NonFiniteLogits {
        /// Position of the token whose logits were computed.
        position: usize,
        /// The first token with a non-finite logit.
        token: usize,
        /// Its logit.
        value: f32,
    },
    /// The callback that receives each new token failed.
    #[error("failed to write the generated text")]
    Output(#[source] std::io::Error),
}

/// Sampling settings: temperature, top-k and seed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingSettings {
    /// Softmax temperature that divides the logits; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Draw only among the `top_k` most likely tokens; 0 means the whole vocabulary.
    pub top_k: usize,
    /// Seed of the ChaCha8 generator, so that the same seed gives the same tokens.
    pub seed: u64,
}

impl Default for SamplingSettings {
    fn default() -> Self {
        // The sampling defaults of GenerationConfig in transformers 5.25: temperature 1, top-k 50.
        SamplingSettings { temperature: 1.0, top_k: 50, seed: 0 }
    }
}

/// Returns the index of the largest logit, the lowest index among equal maxima. NaN entries
/// are skipped; an empty slice or one of NaN only gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| x > b) {
            best = Some((i, x));
        }
    }
    best.map_or(0, |(i, _)| i as u32)
}

/// Orders token indices by logit, largest first, and equal logits by lower index first.
fn by_logit_descending(logits: &[f32]) -> impl Fn(&usize, &usize) -> std::cmp::Ordering + '_ {
    |&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b))
}

/// Draws tokens from logits with temperature and top-k, reproducibly for a seed.
#[derive(Clone, Debug)]
pub struct Sampler {
    settings: SamplingSettings,
    rng: rand_chacha::ChaCha8Rng,
}

impl Sampler {
    /// Creates a sampler whose generator starts from `settings.seed`.
    ///
    /// # Errors
    /// [`GenerateError::InvalidTemperature`] for a negative, infinite or NaN temperature.
    pub fn new(settings: SamplingSettings) -> Result<Sampler, GenerateError> {
        let t = settings.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(GenerateError::InvalidTemperature { value: t });
        }
        Ok(Sampler { settings, rng: rand_chacha::ChaCha8Rng::seed_from_u64(settings.seed) })
    }

    /// Returns the settings the sampler was created with.
    pub fn settings(&self) -> SamplingSettings {
        self.settings
    }

    /// Picks the next token. With temperature 0 or top-k 1 it is [`argmax`] and draws no random
    /// number. Otherwise it keeps the `top_k` largest logits (ties to the lower index), takes
    /// the softmax of `logit / temperature` over them in f64 and draws one token from it.
    /// The logits must not contain NaN; [`Generator::step`] returns an error instead of such
    /// logits.
    ///
    /// # Panics
    /// If `logits` is empty.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        assert!(!logits.is_empty(), "sampling needs at least one logit");
        let SamplingSettings { temperature, top_k, .. } = self.settings;
        if temperature == 0.0 || top_k == 1 {
            return argmax(logits);
        }

        let candidates: Vec<usize> = if top_k == 0 || top_k >= logits.len() {
            (0..logits.len()).collect()
        } else {
            let mut order: Vec<usize> = (0..logits.len()).collect();
            let compare = by_logit_descending(logits);
            order.select_nth_unstable_by(top_k - 1, &compare);
            order.truncate(top_k);
            order.sort_unstable_by(&compare);
            order
        };

        let max = f64::from(logits[argmax(logits) as usize]);
        let inverse_temperature = 1.0 / f64::from(temperature);
        // Subtracting the maximum keeps exp in range; the largest weight is exactly 1.
        let weights: Vec<f64> =
            candidates.iter().map(|&i| ((f64::from(logits[i]) - max) * inverse_temperature).exp()).collect();
        let total: f64 = weights.iter().sum();

        let threshold = self.rng.random::<f64>() * total;
        let mut cumulative = 0.0;
        for (&token, &weight) in candidates.iter().zip(&weights) {
            cumulative += weight;
            if cumulative > threshold {
                return token as u32;
            }
        }
        // Rounding in the running sum can leave `threshold` just above the last sum.
        *candidates.last().expect("candidates is non-empty") as u32
    }
}

/// Length limit, sampling and stop token of [`Generator::generate`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Sampling of each token.
    pub sampling: SamplingSettings,
    /// A token that ends the text when it is drawn (`<|endoftext|>`, id 50256, for GPT-2). It is
    /// returned as the last token. `None` generates until another limit is reached.
    pub stop_token: Option<u32>,
}

/// Reason that generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// `max_new_tokens` tokens were generated.
    MaxNewTokens,
    /// The stop token was drawn.
    StopToken,
    /// Prompt and generated tokens fill the model's context of n_positions tokens.
    ContextLimit,
}

/// The result of [`Generator::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// The generated tokens, without the prompt.
    pub tokens: Vec<u32>,
    /// Reason that generation ended.
    pub stop: StopReason,
    /// Seconds spent running the prompt through the model.
    pub prompt_seconds: f64,
    /// Seconds spent drawing the tokens, each step and the callback included.
    pub generate_seconds: f64,
}

/// Buffers of one decode step, reused by every layer.
struct Activations {
    /// (C): the residual stream entering each block and leaving the last one. The host writes the
    /// token's embedding here before each step.
    hidden: wgpu::Buffer,
    /// (C): the residual stream between the attention and the MLP of a block.
    hidden_mid: wgpu::Buffer,
    /// (C): output of each layer norm.
    normed: wgpu::Buffer,
    /// (1) each: statistics that the layer norm kernel writes.
    mean: wgpu::Buffer,
    rstd: wgpu::Buffer,
    /// (3C): c_attn output.
    qkv: wgpu::Buffer,
    /// (C): attention output, heads concatenated.
    attention: wgpu::Buffer,
    /// (C): output of c_proj, of the attention and then of the MLP.
    projected: wgpu::Buffer,
    /// (inner) each: c_fc output and its GELU.
    fc: wgpu::Buffer,
    fc_gelu: wgpu::Buffer,
    /// (NH, n_positions): attention scores, scratch of the decode kernel.
    scores: wgpu::Buffer,
    /// (1) u32: the position of the token in this step.
    position: wgpu::Buffer,
    /// (V): next-token logits.
    logits: wgpu::Buffer,
}

/// The parameters of one block on the device.
struct BlockWeights {
    tensors: std::collections::HashMap<&'static str, wgpu::Buffer>,
}

impl BlockWeights {
    fn get(&self, suffix: &str) -> TensorBinding<'_> {
        TensorBinding::whole(&self.tensors[suffix])
    }
}

/// Parameter names of a block after `h.{i}.`.
const BLOCK_PARAMS: [&str; 12] = [
    "ln_1.weight",
    "ln_1.bias",
    "attn.c_attn.weight",
    "attn.c_attn.bias",
    "attn.c_proj.weight",
    "attn.c_proj.bias",
    "ln_2.weight",
    "ln_2.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
];

/// A language model on the device with a key/value cache, run one position per step.
///
/// Every buffer, pipeline and bind group is created once by [`Generator::new`]. A step writes the
/// token's embedding and its position, submits the recorded dispatches and, when asked, reads
/// the V logits back.
pub struct Generator<'g> {
    gpu: &'g Gpu,
    config: Gpt2Config,
    /// Host copies of wte (V, C) and wpe (n_positions, C), for the embedding of each step.
    wte: HostTensor,
    wpe: HostTensor,
    activations: Activations,
    /// Kept with the dispatches that bind them.
    _blocks: Vec<BlockWeights>,
    _caches: Vec<(wgpu::Buffer, wgpu::Buffer)>,
    _head: Vec<wgpu::Buffer>,
    /// The blocks' dispatches, then the final layer norm and the LM head.
    dispatches: Vec<Dispatch>,
    /// Dispatches of the blocks alone, run for prompt tokens whose logits are not needed.
    block_dispatches: usize,
    /// Tokens in the cache, which is also the position of the next token.
    length: usize,
}

/// Returns the tensor `name` of `weights`, checked against the shape the config implies.
fn checked<'w>(weights: &'w Weights, name: &str, expected: &[usize]) -> Result<&'w HostTensor, GenerateError> {
    let tensor = weights.get(name).ok_or_else(|| GenerateError::MissingWeight { name: name.to_string() })?;
    if tensor.shape != expected || tensor.data.len() != expected.iter().product::<usize>() {
        return Err(GenerateError::WeightShape {
            name: name.to_string(),
            found: fmt_shape(&tensor.shape),
            expected: fmt_shape(expected),
        });
    }
    Ok(tensor)
}

impl<'g> Generator<'g> {
    /// Uploads the language model `weights` (canonical names, LM head tied to `wte.weight`) to
    /// `gpu`, allocates a key and a value cache of n_positions x C per layer, and records the
    /// dispatches of one step. `wte` is split into row chunks that each fit in one storage
    /// binding of the adapter, and the LM head runs one product per chunk.
    ///
    /// # Errors
    /// A missing or mis-shaped weight, or a device error (a buffer above the adapter's limits, a
    /// kernel that fails to compile).
    pub fn new(gpu: &'g Gpu, config: &Gpt2Config, weights: &Weights) -> Result<Generator<'g>, GenerateError> {
        for (name, shape) in expected_shapes(config, HeadKind::LanguageModel) {
            checked(weights, &name, &shape)?;
        }
        let (c, v, positions) = (config.n_embd, config.vocab_size, config.n_positions);
        let inner = config.inner_dim();
        let wte = weights.get("wte.weight").expect("checked above").clone();
        let wpe = weights.get("wpe.weight").expect("checked above").clone();

        let activations = Activations {
            hidden: gpu.storage_buffer("decode hidden", (c * 4) as u64)?,
            hidden_mid: gpu.storage_buffer("decode hidden after attention", (c * 4) as u64)?,
            normed: gpu.storage_buffer("decode layernorm out", (c * 4) as u64)?,
            mean: gpu.storage_buffer("decode layernorm mean", 4)?,
            rstd: gpu.storage_buffer("decode layernorm rstd", 4)?,
            qkv: gpu.storage_buffer("decode qkv", (3 * c * 4) as u64)?,
            attention: gpu.storage_buffer("decode attention out", (c * 4) as u64)?,
            projected: gpu.storage_buffer("decode projection", (c * 4) as u64)?,
            fc: gpu.storage_buffer("decode mlp fc", (inner * 4) as u64)?,
            fc_gelu: gpu.storage_buffer("decode mlp gelu", (inner * 4) as u64)?,
            scores: gpu.storage_buffer("decode attention scores", (config.n_head * positions * 4) as u64)?,
            position: gpu.storage_buffer("decode position", 4)?,
            logits: gpu.storage_buffer("decode logits", (v * 4) as u64)?,
        };

        let mut blocks = Vec::with_capacity(config.n_layer);
        let mut caches = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut tensors = std::collections::HashMap::new();
            for suffix in BLOCK_PARAMS {
                let name = format!("h.{i}.{suffix}");
                let tensor = weights.get(&name).expect("checked above");
                tensors.insert(suffix, gpu.upload(&name, &tensor.data)?);
            }
            blocks.push(BlockWeights { tensors });
            let cache_bytes = (positions * c * 4) as u64;
            caches.push((
                gpu.storage_buffer(&format!("h.{i} key cache"), cache_bytes)?,
                gpu.storage_buffer(&format!("h.{i} value cache"), cache_bytes)?,
            ));
        }
        let ln_f_weight = gpu.upload("ln_f.weight", &weights.get("ln_f.weight").expect("checked above").data)?;
        let ln_f_bias = gpu.upload("ln_f.bias", &weights.get("ln_f.bias").expect("checked above").data)?;

        // Rows of wte per chunk: as many as fit in one storage binding.
        let row_bytes = (c * 4) as u64;
        let rows_per_chunk = ((gpu.limits().max_storage_buffer_binding_size / row_bytes) as usize).clamp(1, v);
        let mut wte_chunks = Vec::new();
        for first in (0..v).step_by(rows_per_chunk) {
            let rows = rows_per_chunk.min(v - first);
            let data = &wte.data[first * c..(first + rows) * c];
            let buffer = gpu.upload(&format!("wte.weight[{first}..{}]", first + rows), data)?;
            wte_chunks.push((first, rows, buffer));
        }

        let mut dispatches = Vec::new();
        for (i, (block, (k_cache, v_cache))) in blocks.iter().zip(&caches).enumerate() {
            dispatches.extend(block_dispatches(gpu, config, i, block, k_cache, v_cache, &activations)?);
        }
        let block_count = dispatches.len();
        let a = &activations;
        dispatches.push(layernorm::forward(
            gpu,
            "ln_f",
            1,
            c,
            config.layer_norm_epsilon as f32,
            (&a.hidden).into(),
            (&ln_f_weight).into(),
            (&ln_f_bias).into(),
            (&a.normed).into(),
            (&a.mean).into(),
            (&a.rstd).into(),
        )?);
        for (first, rows, buffer) in &wte_chunks {
            // The head is tied to wte (V, C): logits[first..first + rows] = wte[first..] @ normed.
            let shape = MatmulShape {
                rows: 1,
                inner: c,
                cols: *rows,
                layout: WeightLayout::OutIn,
                out_offset: *first,
                out_stride: v,
            };
            let label = format!("lm_head wte[{first}..{}]", first + rows);
            dispatches.push(linear(gpu, &label, shape, (&a.normed).into(), buffer.into(), None, (&a.logits).into())?);
        }

        let cache_mib = (2 * config.n_layer * positions * c * 4) as f64 / (1 << 20) as f64;
        log::info!(
            "generator: {} layers, {} dispatches per token, wte in {} chunk(s), key/value caches {cache_mib:.2} MiB",
            config.n_layer,
            dispatches.len(),
            wte_chunks.len()
        );
        let mut head = vec![ln_f_weight, ln_f_bias];
        head.extend(wte_chunks.into_iter().map(|(_, _, buffer)| buffer));
        Ok(Generator {
            gpu,
            config: config.clone(),
            wte,
            wpe,
            activations,
            _blocks: blocks,
            _caches: caches,
            _head: head,
            dispatches,
            block_dispatches: block_count,
            length: 0,
        })
    }

    /// Returns the model's context: the most tokens the cache holds (n_positions).
    pub fn context_len(&self) -> usize {
        self.config.n_positions
    }

    /// Returns the number of tokens in the cache, which is the position of the next token.
    pub fn len(&self) -> usize {
        self.length
    }

    /// Returns true when the cache holds no token.
    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// Empties the cache so that the next token starts a new text at position 0.
    pub fn reset(&mut self) {
        // Rows after the current position are never read, so the old contents can stay.
        self.length = 0;
    }

    /// Runs `token` through the model at the next position and adds its keys and values to the
    /// cache. Returns the V logits of the token after it when `logits` is true; otherwise the
    /// LM head is skipped.
    ///
    /// # Errors
    /// [`GenerateError::TokenOutOfRange`], [`GenerateError::ContextFull`] when n_positions tokens
    /// are cached, [`GenerateError::NonFiniteLogits`], or a device error.
    pub fn step(&mut self, token: u32, logits: bool) -> Result<Option<Vec<f32>>, GenerateError> {
        let (c, v) = (self.config.n_embd, self.config.vocab_size);
        if token as usize >= v {
            return Err(GenerateError::TokenOutOfRange { id: token, vocab_size: v });
        }
        let position = self.length;
        if position >= self.config.n_positions {
            return Err(GenerateError::ContextFull { n_positions: self.config.n_positions });
        }
        let token_row = &self.wte.data[token as usize * c..(token as usize + 1) * c];
        let position_row = &self.wpe.data[position * c..(position + 1) * c];
        let embedding: Vec<f32> = token_row.iter().zip(position_row).map(|(t, p)| t + p).collect();
        self.gpu.write(&self.activations.hidden, 0, &embedding);
        self.gpu.write(&self.activations.position, 0, &[position as u32]);
        let count = if logits { self.dispatches.len() } else { self.block_dispatches };
        self.gpu.run("decode step", &self.dispatches[..count])?;
        self.length += 1;
        if !logits {
            return Ok(None);
        }
        let values: Vec<f32> = self.gpu.read(&self.activations.logits, 0, v)?;
        if let Some((token, &value)) = values.iter().enumerate().find(|(_, x)| !x.is_finite()) {
            return Err(GenerateError::NonFiniteLogits { position, token, value });
        }
        Ok(Some(values))
    }

    /// Runs `tokens` through the model after the cached ones and returns the logits after the
    /// last of them. Only the last token runs the LM head.
    ///
    /// # Errors
    /// [`GenerateError::EmptyPrompt`] for no tokens, and those of [`Generator::step`].
    pub fn feed(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        let Some((&last, rest)) = tokens.split_last() else {
            return Err(GenerateError::EmptyPrompt);
        };
        for &token in rest {
            self.step(token, false)?;
        }
        Ok(self.step(last, true)?.expect("a step with logits returns them"))
    }

    /// Starts a new text from `prompt` and generates up to `options.max_new_tokens` tokens,
    /// calling `on_token` with each one as soon as it is drawn. Generation also stops after the
    /// stop token, and when prompt and new tokens fill the context of n_positions tokens.
    ///
    /// # Errors
    /// [`GenerateError::EmptyPrompt`], [`GenerateError::PromptTooLong`],
    /// [`GenerateError::InvalidTemperature`], [`GenerateError::Output`] when `on_token` fails,
    /// and those of [`Generator::step`].
    pub fn generate(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        mut on_token: impl FnMut(u32) -> std::io::Result<()>,
    ) -> Result<Generation, GenerateError> {
        let mut sampler = Sampler::new(options.sampling)?;
        let context = self.config.n_positions;
        if prompt.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if prompt.len() > context {
            return Err(GenerateError::PromptTooLong { tokens: prompt.len(), n_positions: context });
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= self.config.vocab_size) {
            return Err(GenerateError::TokenOutOfRange { id, vocab_size: self.config.vocab_size });
        }
        let mut tokens = Vec::new();
        if options.max_new_tokens == 0 {
            return Ok(Generation { tokens, stop: StopReason::MaxNewTokens, prompt_seconds: 0.0, generate_seconds: 0.0 });
        }

        self.reset();
        let started = Instant::now();
        let mut logits = self.feed(prompt)?;
        let prompt_seconds = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let stop = loop {
            if tokens.len() >= options.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            if prompt.len() + tokens.len() >= context {
                break StopReason::ContextLimit;
            }
            let next = sampler.sample(&logits);
            tokens.push(next);
            on_token(next).map_err(GenerateError::Output)?;
            if options.stop_token == Some(next) {
                break StopReason::StopToken;
            }
            // The last token needs no step: nothing reads its logits.
            let more = tokens.len() < options.max_new_tokens && prompt.len() + tokens.len() < context;
            if more {
                logits = self.step(next, true)?.expect("a step with logits returns them");
            }
        };
        Ok(Generation { tokens, stop, prompt_seconds, generate_seconds: started.elapsed().as_secs_f64() })
    }
}

/// Creates the dispatch of a linear layer for one token: the matrix-vector kernel where its vec4
/// loads fit the shape, else the general matmul, which computes a tile of rows of which one is
/// used.
fn linear(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    inp: TensorBinding<'_>,
    weight: TensorBinding<'_>,
    bias: Option<TensorBinding<'_>>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    if decode::matvec_fits(&shape) {
        decode::matvec(gpu, label, shape, inp, weight, bias, out)
    } else {
        matmul::forward(gpu, label, shape, inp, weight, bias, out)
    }
}

/// Records the ten dispatches of block `i` for one position, reading and writing
/// `activations.hidden`:
/// ```text
/// mid    = hidden + c_proj(attention(c_attn(ln_1(hidden)), cache))
/// hidden = mid + mlp.c_proj(gelu(c_fc(ln_2(mid))))
/// ```
fn block_dispatches(
    gpu: &Gpu,
    config: &Gpt2Config,
    i: usize,
    block: &BlockWeights,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    a: &Activations,
) -> Result<Vec<Dispatch>, GpuError> {
    let (c, inner) = (config.n_embd, config.inner_dim());
    let eps = config.layer_norm_epsilon as f32;
    let conv1d = |n_in: usize, n_out: usize| MatmulShape::new(1, n_in, n_out, WeightLayout::InOut);
    let decode_shape = DecodeShape { channels: c, num_heads: config.n_head, max_positions: config.n_positions };
    let p = format!("h.{i}");
    Ok(vec![
        layernorm::forward(
            gpu,
            &format!("{p}.ln_1"),
            1,
            c,
            eps,
            (&a.hidden).into(),
            block.get("ln_1.weight"),
            block.get("ln_1.bias"),
            (&a.normed).into(),
            (&a.mean).into(),
            (&a.rstd).into(),
        )?,
        linear(
            gpu,
            &format!("{p}.attn.c_attn"),
            conv1d(c, 3 * c),
            (&a.normed).into(),
            block.get("attn.c_attn.weight"),
            Some(block.get("attn.c_attn.bias")),
            (&a.qkv).into(),
        )?,
        decode::attention(
            gpu,
            &format!("{p}.attn decode"),
            decode_shape,
            (&a.qkv).into(),
            (&a.position).into(),
            k_cache.into(),
            v_cache.into(),
            (&a.scores).into(),
            (&a.attention).into(),
        )?,
        linear(
            gpu,
            &format!("{p}.attn.c_proj"),
            conv1d(c, c),
            (&a.attention).into(),
            block.get("attn.c_proj.weight"),
            Some(block.get("attn.c_proj.bias")),
            (&a.projected).into(),
        )?,
        residual::forward(gpu, &format!("{p}.residual_1"), c, 1.0, (&a.hidden).into(), (&a.projected).into(), (&a.hidden_mid).into())?,
        layernorm::forward(
            gpu,
            &format!("{p}.ln_2"),
            1,
            c,
            eps,
            (&a.hidden_mid).into(),
            block.get("ln_2.weight"),
            block.get("ln_2.bias"),
            (&a.normed).into(),
            (&a.mean).into(),
            (&a.rstd).into(),
        )?,
        linear(
            gpu,
            &format!("{p}.mlp.c_fc"),
            conv1d(c, inner),
            (&a.normed).into(),
            block.get("mlp.c_fc.weight"),
            Some(block.get("mlp.c_fc.bias")),
            (&a.fc).into(),
        )?,
        gelu::forward(gpu, &format!("{p}.mlp.gelu"), inner, (&a.fc).into(), (&a.fc_gelu).into())?,
        linear(
            gpu,
            &format!("{p}.mlp.c_proj"),
            conv1d(inner, c),
            (&a.fc_gelu).into(),
            block.get("mlp.c_proj.weight"),
            Some(block.get("mlp.c_proj.bias")),
            (&a.projected).into(),
        )?,
        residual::forward(gpu, &format!("{p}.residual_2"), c, 1.0, (&a.hidden_mid).into(), (&a.projected).into(), (&a.hidden).into())?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::executor::{OptimizerSettings, StepInputs};
    use crate::graph::Session;
    use crate::model::gpt2::{build_graph, BatchShape, Head, Trainable};
    use crate::model::weights::{self, LoadOptions};
    use crate::testing::{assert_close, test_gpu, to_f64};
    use std::path::PathBuf;

    /// Decode and the full forward run the same f32 kernels except attention, which sums the
    /// exponentials before normalising in decode and after it in the full forward. Both differ
    /// from transformers by f32 rounding alone, so the parity tolerances of the model tests apply:
    /// 1e-4 relative, with an absolute floor of 1e-5 for logits near zero. On lavapipe the largest
    /// absolute errors at the first positions were 6e-7 (full forward) and 7e-7 (transformers).
    const LOGIT_ATOL: f64 = 1e-5;
    const LOGIT_RTOL: f64 = 1e-4;

    fn fixtures() -> PathBuf {
        PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
    }

    fn tiny_lm() -> (Gpt2Config, Weights) {
        let dir = fixtures().join("tiny_lm");
        let config = Gpt2Config::from_file(&dir.join("config.json")).expect("fixture config loads");
        let weights = weights::load(&dir.join("model.safetensors"), &config, HeadKind::LanguageModel, LoadOptions::default())
            .expect("fixture weights load");
        (config, weights)
    }

    /// Reads a golden tensor of `tiny_lm_golden.safetensors` as f64, from F32 or I64.
    fn golden(key: &str) -> (Vec<usize>, Vec<f64>) {
        let path = fixtures().join("tiny_lm_golden.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
        let file = safetensors::SafeTensors::deserialize(&bytes).expect("golden file parses");
        let view = file.tensor(key).unwrap_or_else(|e| panic!("golden tensor `{key}`: {e}"));
        let values = match view.dtype() {
            safetensors::Dtype::F32 => {
                view.data().chunks_exact(4).map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap()))).collect()
            }
            safetensors::Dtype::I64 => {
                view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64).collect()
            }
            other => panic!("golden tensor `{key}` has unexpected dtype {other:?}"),
        };
        (view.shape().to_vec(), values)
    }

    /// Logits of every position of `ids` from the graph executor's full forward.
    fn full_forward_logits(gpu: &Gpu, config: &Gpt2Config, weights: &Weights, ids: &[u32]) -> Vec<f32> {
        let shape = BatchShape { batch: 1, seq_len: ids.len() };
        let max_binding = gpu.limits().max_storage_buffer_binding_size;
        let graph = build_graph(config, Head::LanguageModel, shape, Trainable::Nothing, max_binding);
        let mut session =
            Session::new(gpu, graph, weights, false, OptimizerSettings::default()).expect("forward session builds");
        let targets = vec![-1i32; ids.len()];
        session.set_inputs(&StepInputs { ids, lengths: &[ids.len() as u32], targets: &targets });
        session.submit(false, None, 1.0).expect("forward runs");
        session.read_logits().expect("logits read")
    }

    #[test]
    fn argmax_takes_lowest_index_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, -2.0, 3.0]), 1);
        assert_eq!(argmax(&[5.0, 5.0]), 0);
        assert_eq!(argmax(&[-1.0]), 0);
    }

    #[test]
    fn argmax_skips_nan() {
        assert_eq!(argmax(&[f32::NAN, 0.5, 2.0, f32::NAN]), 2);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
    }

    #[test]
    fn sampler_rejects_invalid_temperature() {
        for value in [-1.0, -1e-9, f32::NAN, f32::INFINITY] {
            let settings = SamplingSettings { temperature: value, ..SamplingSettings::default() };
            let result = Sampler::new(settings);
            assert!(
                matches!(result, Err(GenerateError::InvalidTemperature { .. })),
                "temperature {value} was accepted: {result:?}"
            );
        }
    }

    #[test]
    fn sampler_greedy_and_top_k_one_are_argmax() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for trial in 0..20 {
            let mut logits: Vec<f32> = (0..500).map(|_| rng.random_range(-4.0f32..4.0)).collect();
            // A tie for the maximum at two indices, so the lower must win.
            logits[400] = 10.0;
            logits[37 + trial] = 10.0;
            let want = argmax(&logits);
            assert_eq!(want, 37 + trial as u32, "argmax of trial {trial}");
            let greedy = SamplingSettings { temperature: 0.0, top_k: 0, seed: trial as u64 };
            let top1 = SamplingSettings { temperature: 1.5, top_k: 1, seed: trial as u64 };
            assert_eq!(Sampler::new(greedy).unwrap().sample(&logits), want, "temperature 0, trial {trial}");
            assert_eq!(Sampler::new(top1).unwrap().sample(&logits), want, "top-k 1, trial {trial}");
        }
    }

    #[test]
    fn sampler_draws_only_from_top_k() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        let logits: Vec<f32> = (0..1000).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let top: std::collections::BTreeSet<u32> = order[..5].iter().map(|&i| i as u32).collect();
        let mut sampler = Sampler::new(SamplingSettings { temperature: 1.0, top_k: 5, seed: 9 }).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for draw in 0..500 {
            let token = sampler.sample(&logits);
            assert!(top.contains(&token), "draw {draw}: token {token} is not among the top 5 {top:?}");
            seen.insert(token);
        }
        assert_eq!(seen, top, "500 draws from 5 tokens of similar probability should reach all of them");
    }

    /// Frequencies of 60,000 draws match softmax(logits / T) within 0.01; the standard error of
    /// each frequency is at most 0.002.
    #[test]
    fn sampler_frequencies_follow_softmax() {
        let logits = [0.0f32, 2f32.ln(), 3f32.ln(), -1e4];
        for temperature in [1.0f32, 2.0, 0.5] {
            let mut sampler = Sampler::new(SamplingSettings { temperature, top_k: 0, seed: 5 }).unwrap();
            let draws = 60_000;
            let mut counts = [0usize; 4];
            for _ in 0..draws {
                counts[sampler.sample(&logits) as usize] += 1;
            }
            let weights: Vec<f64> = logits.iter().map(|&l| (f64::from(l) / f64::from(temperature)).exp()).collect();
            let total: f64 = weights.iter().sum();
            for (token, (&count, weight)) in counts.iter().zip(&weights).enumerate() {
                let frequency = count as f64 / draws as f64;
                let probability = weight / total;
                assert!(
                    (frequency - probability).abs() < 0.01,
                    "temperature {temperature}, token {token}: frequency {frequency:.4}, softmax probability {probability:.4}"
                );
            }
        }
    }

    #[test]
    fn sampler_repeats_with_same_seed() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(6);
        let logits: Vec<f32> = (0..300).map(|_| rng.random_range(-2.0f32..2.0)).collect();
        let draw = |seed: u64| {
            let mut sampler = Sampler::new(SamplingSettings { temperature: 1.0, top_k: 0, seed }).unwrap();
            (0..30).map(|_| sampler.sample(&logits)).collect::<Vec<u32>>()
        };
        assert_eq!(draw(1), draw(1), "seed 1 twice");
        assert_ne!(draw(1), draw(2), "seeds 1 and 2 drew the same 30 tokens");
    }

    /// Decoding a 64-token sequence one position at a time gives, at every position, the logits
    /// of the full forward over the whole sequence: the cache holds what the full forward
    /// recomputes. 64 is the fixture's n_positions, so the last cache row is used too.
    #[test]
    fn decode_logits_match_full_forward() {
        let Some(gpu) = test_gpu() else { return };
        let (config, weights) = tiny_lm();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let ids: Vec<u32> = (0..config.n_positions).map(|_| rng.random_range(0..config.vocab_size as u32)).collect();
        let want = full_forward_logits(gpu, &config, &weights, &ids);
        let v = config.vocab_size;
        let mut generator = Generator::new(gpu, &config, &weights).expect("generator builds");
        for (t, &id) in ids.iter().enumerate() {
            let got = generator.step(id, true).expect("step runs").expect("logits requested");
            let row = to_f64(&want[t * v..(t + 1) * v]);
            assert_close(&format!("decode logits at position {t} (token {id})"), &got, &row, LOGIT_ATOL, LOGIT_RTOL);
        }
        assert_eq!(generator.len(), config.n_positions);
        let full = generator.step(ids[0], true);
        assert!(
            matches!(full, Err(GenerateError::ContextFull { n_positions: 64 })),
            "a step past n_positions = 64 returned {:?}",
            full.map(|l| l.map(|l| l.len()))
        );
    }

    /// The first golden text (9 tokens, no padding) fed one position at a time gives the logits
    /// transformers computed for it.
    #[test]
    fn decode_logits_match_transformers() {
        let Some(gpu) = test_gpu() else { return };
        let (config, weights) = tiny_lm();
        let (id_shape, ids) = golden("input_ids");
        let (_, lengths) = golden("lengths");
        let (_, logits) = golden("logits");
        let (seq_len, length) = (id_shape[1], lengths[0] as usize);
        assert_eq!(length, seq_len, "the first golden text fills its row");
        let v = config.vocab_size;
        let mut generator = Generator::new(gpu, &config, &weights).expect("generator builds");
        for t in 0..length {
            let got = generator.step(ids[t] as u32, true).expect("step runs").expect("logits requested");
            let want = &logits[t * v..(t + 1) * v];
            assert_close(&format!("decode logits of golden text 0 at position {t}"), &got, want, LOGIT_ATOL, LOGIT_RTOL);
        }
    }

    /// Prompt tokens skip the LM head, yet the cache they leave gives the same logits as steps
    /// that ran it; reset starts over at position 0.
    #[test]
    fn feed_and_reset_match_single_steps() {
        let Some(gpu) = test_gpu() else { return };
        let (config, weights) = tiny_lm();
        let ids = [464u32, 2068, 7586, 21831, 18045, 625, 262];
        let mut generator = Generator::new(gpu, &config, &weights).expect("generator builds");
        let mut stepped = Vec::new();
        for &id in &ids {
            stepped = generator.step(id, true).unwrap().unwrap();
        }
        generator.reset();
        assert!(generator.is_empty(), "reset leaves {} tokens", generator.len());
        let fed = generator.feed(&ids).unwrap();
        assert_eq!(generator.len(), ids.len());
        assert_close("logits after feed vs single steps", &fed, &to_f64(&stepped), 0.0, 0.0);
    }

    /// With n_embd = 18, no linear layer fits the matrix-vector kernel, so every product runs
    /// through the general matmul; decoding still matches the full forward at every position.
    #[test]
    fn unaligned_model_matches_full_forward() {
        let Some(gpu) = test_gpu() else { return };
        let config = Gpt2Config::from_json_str(
            r#"{"model_type": "gpt2", "n_layer": 2, "n_head": 3, "n_embd": 18, "n_positions": 16,
                "vocab_size": 101, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}"#,
        )
        .expect("test config is valid");
        let weights = weights::init_random(&config, HeadKind::LanguageModel, 5).expect("random weights");
        let ids: Vec<u32> = (0..16).map(|t| (t * 37 + 11) % 101).collect();
        let want = full_forward_logits(gpu, &config, &weights, &ids);
        let mut generator = Generator::new(gpu, &config, &weights).expect("generator builds");
        for (t, &id) in ids.iter().enumerate() {
            let got = generator.step(id, true).expect("step runs").expect("logits requested");
            let row = to_f64(&want[t * 101..(t + 1) * 101]);
            assert_close(&format!("n_embd 18 decode logits at position {t}"), &got, &row, LOGIT_ATOL, LOGIT_RTOL);
        }
    }

    #[test]
    fn generator_rejects_missing_and_misshaped_weights() {
        let Some(gpu) = test_gpu() else { return };
        let (config, weights) = tiny_lm();
        let mut missing = weights.clone();
        missing.tensors.remove("h.1.mlp.c_fc.bias");
        let error = Generator::new(gpu, &config, &missing).err().expect("a missing weight is rejected");
        assert!(
            matches!(&error, GenerateError::MissingWeight { name } if name == "h.1.mlp.c_fc.bias"),
            "missing h.1.mlp.c_fc.bias gave {error:?}"
        );
        let mut reshaped = weights;
        reshaped.insert("ln_f.weight", HostTensor::filled(vec![47], 1.0));
        let error = Generator::new(gpu, &config, &reshaped).err().expect("a mis-shaped weight is rejected");
        assert_eq!(error.to_string(), "weight `ln_f.weight` has shape (47), but the config implies (48)");
    }
}
