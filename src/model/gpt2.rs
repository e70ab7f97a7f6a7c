//! The GPT-2 forward graph for the language-model head and the classification head.

use crate::graph::ir::{DType, Graph, Op, ParamEncoding, ParamSource, RowChunk, TensorId, TensorKind};
use crate::kernels::attention::AttentionShape;
use crate::kernels::matmul::WeightLayout;
use crate::model::config::Gpt2Config;
use crate::model::lora::LoraSpec;

/// Set of parameters a run trains. Everything else is frozen and gets no gradient kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trainable {
    /// Nothing: forward passes only (evaluation, prediction, generation).
    Nothing,
    /// The new head only (`score` for a classifier; the tied wte for a language model).
    Head,
    /// The last N transformer blocks, the final layer norm and the head.
    LastBlocks(usize),
    /// Every parameter, embeddings included.
    All,
}

impl std::str::FromStr for Trainable {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "head" => Ok(Trainable::Head),
            "all" => Ok(Trainable::All),
            "none" => Ok(Trainable::Nothing),
            other => match other.strip_prefix("last-blocks:").map(str::parse::<usize>) {
                Some(Ok(n)) if n >= 1 => Ok(Trainable::LastBlocks(n)),
                _ => Err(format!("invalid trainable set `{other}`, expected head, last-blocks:N (N >= 1) or all")),
            },
        }
    }
}

impl std::fmt::Display for Trainable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trainable::Nothing => write!(f, "none"),
            Trainable::Head => write!(f, "head"),
            Trainable::LastBlocks(n) => write!(f, "last-blocks:{n}"),
            Trainable::All => write!(f, "all"),
        }
    }
}

/// Storage precision of the frozen linear weights of the blocks. Arithmetic is f32 either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Every weight in f32.
    #[default]
    F32,
    /// The weight matrices of frozen linear layers (c_attn, c_proj, c_fc) rounded to f16 and
    /// stored two per u32, in half the memory. The kernels widen them to f32 as they multiply.
    /// Trainable weights, biases, layer norms and embeddings stay f32.
    F16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "f16" => Ok(Precision::F16),
            other => Err(format!("invalid precision `{other}`, expected f32 or f16")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
        })
    }
}

/// Checks that `gpu` can run the f16 weight kernels, whose `unpack2x16float` needs wgpu's
/// `SHADER_F16_IN_F32` (which wgpu 30 withholds from llvmpipe's Vulkan driver without
/// `SHADER_F16`).
///
/// # Errors
/// A message naming the adapter and what to do instead.
pub fn check_f16_adapter(gpu: &crate::gpu::Gpu) -> Result<(), String> {
    if gpu.half_floats() {
        Ok(())
    } else {
        Err(format!(
            "--precision f16 needs an adapter whose shaders convert f16 values (wgpu's SHADER_F16_IN_F32), and {} does not; use --precision f32",
            gpu.info().name
        ))
    }
}

/// Error message for `--precision f16` together with `--quantize`, which stores the same weights
/// in NF4.
pub const F16_WITH_QUANTIZE: &str = "--precision f16 cannot be combined with --quantize: the quantised base weights are already 4-bit; drop one of them";

/// Checks that the linear layers of `config` can be stored in f16: their output widths (3C, C
/// and the MLP's inner width) must be multiples of 8.
///
/// # Errors
/// A message naming the width and what to do instead.
pub fn check_f16(config: &Gpt2Config) -> Result<(), String> {
    let word = crate::kernels::f16_weights::WORD_VALUES;
    for (name, width) in [("n_embd", config.n_embd), ("n_inner", config.inner_dim())] {
        if !width.is_multiple_of(word) {
            return Err(format!(
                "--precision f16 stores each weight row in words of {word} values, but this model's {name} is {width}; use --precision f32"
            ));
        }
    }
    Ok(())
}

/// Output head of the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// Next-token logits over the vocabulary, tied to wte; loss over every position. The graph
    /// outputs the whole (B*T, V) logits, for evaluation and parity checks on small batches.
    LanguageModel,
    /// The language-model loss alone, computed over vocabulary chunks so that (B*T, V) logits
    /// never exist whole; for pretraining.
    LanguageModelLoss,
    /// `score` (K, C) applied at the last real token of each sequence; loss over sequences.
    Classifier {
        /// K, the number of classes.
        num_labels: usize,
    },
}

/// Shapes of one graph: batch size and (static) sequence length.
#[derive(Clone, Copy, Debug)]
pub struct BatchShape {
    /// B.
    pub batch: usize,
    /// T.
    pub seq_len: usize,
}

fn is_trainable(trainable: Trainable, n_layer: usize, part: Part) -> bool {
    match (trainable, part) {
        (Trainable::Nothing, _) => false,
        (Trainable::All, _) => true,
        (Trainable::Head, Part::Head) => true,
        (Trainable::Head, _) => false,
        (Trainable::LastBlocks(_), Part::Head | Part::FinalNorm) => true,
        (Trainable::LastBlocks(n), Part::Block(i)) => i + n >= n_layer,
        (Trainable::LastBlocks(_), Part::Embeddings) => false,
    }
}

#[derive(Clone, Copy)]
enum Part {
    Embeddings,
    Block(usize),
    FinalNorm,
    Head,
}

struct Builder<'c> {
    g: Graph,
    config: &'c Gpt2Config,
    trainable: Trainable,
    lora: Option<&'c LoraSpec>,
    precision: Precision,
}

impl Builder<'_> {
    fn param(&mut self, name: &str, shape: &[usize], part: Part) -> TensorId {
        let trainable = is_trainable(self.trainable, self.config.n_layer, part);
        let id = self.g.tensor(name, shape, DType::F32, TensorKind::Param { trainable });
        self.g.params.push(ParamSource { tensor: id, name: name.to_string(), row_offset: 0, rows: shape[0], encoding: ParamEncoding::Plain });
        id
    }

    /// Adds a (rows, cols) parameter stored as row chunks that each fit in `max_binding` bytes.
    fn chunked_param(&mut self, name: &str, rows: usize, cols: usize, part: Part, max_binding: u64) -> Vec<RowChunk> {
        let row_bytes = (cols * 4) as u64;
        let rows_per_chunk = ((max_binding / row_bytes) as usize).clamp(1, rows);
        let trainable = is_trainable(self.trainable, self.config.n_layer, part);
        let mut chunks = Vec::new();
        let mut offset = 0;
        while offset < rows {
            let n = rows_per_chunk.min(rows - offset);
            let chunk_name = if n == rows { name.to_string() } else { format!("{name}[{offset}..{}]", offset + n) };
            let id = self.g.tensor(chunk_name, &[n, cols], DType::F32, TensorKind::Param { trainable });
            self.g.params.push(ParamSource { tensor: id, name: name.to_string(), row_offset: offset, rows: n, encoding: ParamEncoding::Plain });
            chunks.push(RowChunk { tensor: id, row_offset: offset, rows: n });
            offset += n;
        }
        chunks
    }

    fn layernorm(&mut self, prefix: &str, inp: TensorId, rows: usize, part: Part) -> TensorId {
        let c = self.config.n_embd;
        let weight = self.param(&format!("{prefix}.weight"), &[c], part);
        let bias = self.param(&format!("{prefix}.bias"), &[c], part);
        let out = self.g.activation(format!("{prefix}.out"), &[rows, c]);
        let mean = self.g.activation(format!("{prefix}.mean"), &[rows]);
        let rstd = self.g.activation(format!("{prefix}.rstd"), &[rows]);
        let eps = self.config.layer_norm_epsilon as f32;
        self.g.push(Op::LayerNorm { rows, channels: c, eps, inp, weight, bias, out, mean, rstd });
        out
    }

    /// Adds a trainable parameter that is not part of the base model (a LoRA matrix).
    fn adapter_param(&mut self, name: &str, shape: &[usize]) -> TensorId {
        let id = self.g.tensor(name, shape, DType::F32, TensorKind::Param { trainable: true });
        self.g.params.push(ParamSource { tensor: id, name: name.to_string(), row_offset: 0, rows: shape[0], encoding: ParamEncoding::Plain });
        id
    }

    /// Conv1D: out (rows, n_out) = inp (rows, n_in) @ weight (n_in, n_out) + bias, with a LoRA
    /// branch when the layer is targeted.
    fn conv1d(&mut self, prefix: &str, inp: TensorId, rows: usize, n_in: usize, n_out: usize, part: Part) -> TensorId {
        let lora = self.lora.filter(|spec| spec.targets_module(prefix));
        let base_name = if lora.is_some() { format!("{prefix}.base") } else { format!("{prefix}.out") };
        if self.lora.is_some_and(|spec| spec.quantize_base) && !is_trainable(self.trainable, self.config.n_layer, part) {
            // QLoRA: the frozen base weight is stored as NF4 and dequantised inside the kernel.
            let name = format!("{prefix}.weight");
            let numel = n_in * n_out;
            use crate::graph::plan::{NF4_CODES_SUFFIX, NF4_SCALES_SUFFIX, NF4_SCALE_CODES_SUFFIX, NF4_SCALE_STEPS_SUFFIX};
            use crate::kernels::nf4::{BLOCK_SIZE, GROUP_BLOCKS};
            let frozen = TensorKind::Param { trainable: false };
            let blocks = numel / BLOCK_SIZE;
            let codes = self.g.tensor(format!("{name}{NF4_CODES_SUFFIX}"), &[numel / 8], DType::U32, frozen);
            let mut sources = vec![(codes, ParamEncoding::Nf4Codes)];
            let (scales, steps) = if self.lora.is_some_and(|spec| spec.double_quant) {
                let scales = self.g.tensor(format!("{name}{NF4_SCALE_CODES_SUFFIX}"), &[blocks.div_ceil(4)], DType::U32, frozen);
                let steps = self.g.tensor(format!("{name}{NF4_SCALE_STEPS_SUFFIX}"), &[blocks.div_ceil(GROUP_BLOCKS)], DType::F32, frozen);
                sources.extend([(scales, ParamEncoding::Nf4ScaleCodes), (steps, ParamEncoding::Nf4ScaleSteps)]);
                (scales, Some(steps))
            } else {
                let scales = self.g.tensor(format!("{name}{NF4_SCALES_SUFFIX}"), &[blocks], DType::F32, frozen);
                sources.push((scales, ParamEncoding::Nf4Scales));
                (scales, None)
            };
            for (tensor, encoding) in sources {
                self.g.params.push(ParamSource { tensor, name: name.clone(), row_offset: 0, rows: n_in, encoding });
            }
            let bias = self.param(&format!("{prefix}.bias"), &[n_out], part);
            let out = self.g.activation(base_name, &[rows, n_out]);
            self.g.push(Op::MatmulNf4 { rows, inner: n_in, cols: n_out, inp, codes, scales, steps, bias: Some(bias), out });
            return match lora {
                Some(spec) => self.lora_branch(spec, prefix, inp, out, rows, n_in, n_out),
                None => out,
            };
        }
        if self.precision == Precision::F16 && !is_trainable(self.trainable, self.config.n_layer, part) {
            // A frozen weight stored in f16, two values per u32.
            let name = format!("{prefix}.weight");
            let frozen = TensorKind::Param { trainable: false };
            let packed = self.g.tensor(format!("{name}{}", crate::graph::plan::F16_SUFFIX), &[n_in * n_out / 2], DType::U32, frozen);
            self.g.params.push(ParamSource { tensor: packed, name, row_offset: 0, rows: n_in, encoding: ParamEncoding::F16 });
            let bias = self.param(&format!("{prefix}.bias"), &[n_out], part);
            let out = self.g.activation(base_name, &[rows, n_out]);
            self.g.push(Op::MatmulF16 { rows, inner: n_in, cols: n_out, inp, packed, bias: Some(bias), out });
            return match lora {
                Some(spec) => self.lora_branch(spec, prefix, inp, out, rows, n_in, n_out),
                None => out,
            };
        }
        let weight = self.param(&format!("{prefix}.weight"), &[n_in, n_out], part);
        let bias = self.param(&format!("{prefix}.bias"), &[n_out], part);
        let out = self.g.activation(base_name, &[rows, n_out]);
        self.g.push(Op::Matmul {
            rows,
            inner: n_in,
            cols: n_out,
            layout: WeightLayout::InOut,
            inp,
            weight: vec![RowChunk { tensor: weight, row_offset: 0, rows: n_in }],
            bias: Some(bias),
            out,
        });
        match lora {
            Some(spec) => self.lora_branch(spec, prefix, inp, out, rows, n_in, n_out),
            None => out,
        }
    }

    /// Adds the LoRA branch of a Conv1D whose base product is `base`:
    /// out = base + s * (x A^T) B^T, with x the layer input (after dropout in training).
    /// The base product runs once; the branch adds two thin products and a scaled add.
    #[allow(clippy::too_many_arguments)]
    fn lora_branch(&mut self, spec: &LoraSpec, prefix: &str, inp: TensorId, base: TensorId, rows: usize, n_in: usize, n_out: usize) -> TensorId {
        let r = spec.rank;
        let a = self.adapter_param(&format!("{prefix}.lora_A.weight"), &[r, n_in]);
        let b = self.adapter_param(&format!("{prefix}.lora_B.weight"), &[n_out, r]);
        let x = if spec.dropout > 0.0 {
            let dropped = self.g.activation(format!("{prefix}.lora_dropout"), &[rows, n_in]);
            let seed = self.dropout_seed();
            let salt = self.g.ops.len() as u32;
            self.g.push(Op::Dropout { len: rows * n_in, prob: spec.dropout, seed, salt, inp, out: dropped });
            dropped
        } else {
            inp
        };
        let down = self.g.activation(format!("{prefix}.lora_down"), &[rows, r]);
        self.g.push(Op::Matmul {
            rows,
            inner: n_in,
            cols: r,
            layout: WeightLayout::OutIn,
            inp: x,
            weight: vec![RowChunk { tensor: a, row_offset: 0, rows: r }],
            bias: None,
            out: down,
        });
        let up = self.g.activation(format!("{prefix}.lora_up"), &[rows, n_out]);
        self.g.push(Op::Matmul {
            rows,
            inner: r,
            cols: n_out,
            layout: WeightLayout::OutIn,
            inp: down,
            weight: vec![RowChunk { tensor: b, row_offset: 0, rows: n_out }],
            bias: None,
            out: up,
        });
        let out = self.g.activation(format!("{prefix}.out"), &[rows, n_out]);
        self.g.push(Op::Add { len: rows * n_out, a: base, b: up, scale: spec.scaling(), out });
        out
    }

    /// Returns the input that contains the dropout seed of a step, created on first use.
    fn dropout_seed(&mut self) -> TensorId {
        if let Some(id) = self.g.tensors.iter().position(|t| t.name == DROPOUT_SEED) {
            return id;
        }
        self.g.tensor(DROPOUT_SEED, &[2], DType::U32, TensorKind::Input)
    }

    fn block(&mut self, i: usize, x: TensorId, shape: BatchShape) -> TensorId {
        let (b, t, c) = (shape.batch, shape.seq_len, self.config.n_embd);
        let rows = b * t;
        let part = Part::Block(i);
        let p = format!("h.{i}");
        let ln1 = self.layernorm(&format!("{p}.ln_1"), x, rows, part);
        let qkv = self.conv1d(&format!("{p}.attn.c_attn"), ln1, rows, c, 3 * c, part);
        let nh = self.config.n_head;
        let attention = AttentionShape { batch: b, seq_len: t, channels: c, num_heads: nh };
        let att = self.g.activation(format!("{p}.attn.probs"), &attention.att_dims());
        let att_out = self.g.activation(format!("{p}.attn.out"), &[rows, c]);
        self.g.push(Op::Attention { shape: attention, qkv, att, out: att_out });
        let proj = self.conv1d(&format!("{p}.attn.c_proj"), att_out, rows, c, c, part);
        let x2 = self.g.activation(format!("{p}.residual_1"), &[rows, c]);
        self.g.push(Op::Add { len: rows * c, a: x, b: proj, scale: 1.0, out: x2 });
        let ln2 = self.layernorm(&format!("{p}.ln_2"), x2, rows, part);
        let inner = self.config.inner_dim();
        let fc = self.conv1d(&format!("{p}.mlp.c_fc"), ln2, rows, c, inner, part);
        let act = self.g.activation(format!("{p}.mlp.gelu"), &[rows, inner]);
        self.g.push(Op::Gelu { len: rows * inner, inp: fc, out: act });
        let mlp = self.conv1d(&format!("{p}.mlp.c_proj"), act, rows, inner, c, part);
        let x3 = self.g.activation(format!("{p}.residual_2"), &[rows, c]);
        self.g.push(Op::Add { len: rows * c, a: x2, b: mlp, scale: 1.0, out: x3 });
        x3
    }
}

/// Builds the forward graph of GPT-2 with `head` for batches of `shape`, marking parameters
/// trainable per `trainable`. Tensors larger than `max_binding` bytes (the token embedding) are
/// split into row chunks.
///
/// # Shapes
/// Inputs: `ids` (B*T) u32, `lengths` (B) u32, `targets` (B) i32 for a classifier or (B*T) i32
/// for a language model. Outputs: `logits` (B, K) or (B*T, V), `loss` (2): mean loss and the
/// number of rows counted.
pub(crate) fn build_graph(config: &Gpt2Config, head: Head, shape: BatchShape, trainable: Trainable, max_binding: u64) -> Graph {
    build_graph_with_lora(config, head, shape, trainable, None, max_binding)
}

/// Name of the (2) u32 input with the dropout seed of a step and 1 when dropout is active.
pub(crate) const DROPOUT_SEED: &str = "dropout_seed";

/// [`build_graph`] with a LoRA branch on every layer that `lora` targets. The adapter matrices
/// are trainable; the base weights follow `trainable` (normally [`Trainable::Head`], so only the
/// adapters and the head train).
pub(crate) fn build_graph_with_lora(
    config: &Gpt2Config,
    head: Head,
    shape: BatchShape,
    trainable: Trainable,
    lora: Option<&LoraSpec>,
    max_binding: u64,
) -> Graph {
    build_graph_with(config, head, shape, trainable, lora, Precision::F32, max_binding)
}

/// [`build_graph_with_lora`] with the frozen linear weights stored in `precision`. With
/// [`Precision::F16`] the model must pass [`check_f16`]; NF4 (QLoRA) takes precedence over it
/// for the weights it quantises.
pub(crate) fn build_graph_with(
    config: &Gpt2Config,
    head: Head,
    shape: BatchShape,
    trainable: Trainable,
    lora: Option<&LoraSpec>,
    precision: Precision,
    max_binding: u64,
) -> Graph {
    let mut bld = Builder { g: Graph::default(), config, trainable, lora, precision };
    let (b, t, c, v) = (shape.batch, shape.seq_len, config.n_embd, config.vocab_size);
    let ids = bld.g.tensor("ids", &[b * t], DType::U32, TensorKind::Input);
    let lengths = bld.g.tensor("lengths", &[b], DType::U32, TensorKind::Input);
    // The LM head is tied to wte, so wte is trained with the head of a language model.
    let (wte_part, wte_chunk_bytes) = match head {
        Head::LanguageModel => (Part::Head, max_binding),
        // Each wte chunk also sets the width of one logits chunk (B*T rows of it).
        Head::LanguageModelLoss => (Part::Head, lm_chunks(b * t, c, v, max_binding).vocab_rows as u64 * (c as u64 * 4)),
        Head::Classifier { .. } => (Part::Embeddings, max_binding),
    };
    let wte = bld.chunked_param("wte.weight", v, c, wte_part, wte_chunk_bytes);
    let wpe = bld.param("wpe.weight", &[config.n_positions, c], Part::Embeddings);
    let mut x = bld.g.activation("embedding.out", &[b * t, c]);
    bld.g.push(Op::Embedding { batch: b, seq_len: t, channels: c, ids, wte: wte.clone(), wpe, out: x });
    for i in 0..config.n_layer {
        x = bld.block(i, x, shape);
    }
    match head {
        Head::Classifier { num_labels } => {
            // Layer norm is per row, so pooling before ln_f equals pooling after it and
            // normalises B rows instead of B*T.
            let pooled = bld.g.activation("pooled", &[b, c]);
            bld.g.push(Op::PoolLast { batch: b, seq_len: t, channels: c, hidden: x, lengths, pooled });
            let normed = bld.layernorm("ln_f", pooled, b, Part::FinalNorm);
            let score = bld.param("score.weight", &[num_labels, c], Part::Head);
            let logits = bld.g.tensor("logits", &[b, num_labels], DType::F32, TensorKind::Output);
            bld.g.push(Op::Matmul {
                rows: b,
                inner: c,
                cols: num_labels,
                layout: WeightLayout::OutIn,
                inp: normed,
                weight: vec![RowChunk { tensor: score, row_offset: 0, rows: num_labels }],
                bias: None,
                out: logits,
            });
            let targets = bld.g.tensor("targets", &[b], DType::I32, TensorKind::Input);
            let losses = bld.g.activation("losses", &[b]);
            let loss = bld.g.tensor("loss", &[2], DType::F32, TensorKind::Output);
            bld.g.push(Op::CrossEntropy { rows: b, classes: num_labels, logits, targets, losses, loss });
        }
        Head::LanguageModel => {
            let rows = b * t;
            let normed = bld.layernorm("ln_f", x, rows, Part::FinalNorm);
            let logits = bld.g.tensor("logits", &[rows, v], DType::F32, TensorKind::Output);
            bld.g.push(Op::Matmul {
                rows,
                inner: c,
                cols: v,
                layout: WeightLayout::OutIn,
                inp: normed,
                weight: wte,
                bias: None,
                out: logits,
            });
            let targets = bld.g.tensor("targets", &[rows], DType::I32, TensorKind::Input);
            let losses = bld.g.activation("losses", &[rows]);
            let loss = bld.g.tensor("loss", &[2], DType::F32, TensorKind::Output);
            bld.g.push(Op::CrossEntropy { rows, classes: v, logits, targets, losses, loss });
        }
        Head::LanguageModelLoss => {
            let rows = b * t;
            let normed = bld.layernorm("ln_f", x, rows, Part::FinalNorm);
            let row_chunk = lm_chunks(rows, c, v, max_binding).row_chunk;
            let logits = bld.g.activation("lm_logits", &[row_chunk, v]);
            let stats = bld.g.activation("lm_stats", &[rows, 3]);
            let targets = bld.g.tensor("targets", &[rows], DType::I32, TensorKind::Input);
            let losses = bld.g.activation("losses", &[rows]);
            let loss = bld.g.tensor("loss", &[2], DType::F32, TensorKind::Output);
            bld.g.push(Op::LmLoss { rows, channels: c, vocab: v, row_chunk, inp: normed, wte, targets, logits, stats, losses, loss });
        }
    }
    bld.g
}

/// Bytes of the logits of one row chunk of the LM loss, (row chunk, vocab): large enough that
/// each chunk's products are big, small enough to stay a modest part of a step's memory.
const LM_LOGITS_BYTES: u64 = 80 << 20;

/// Widest vocabulary chunk of the LM loss. A multiple of 128, so that every chunk but the last
/// fills whole blocks of the subgroup matmul and keeps rows aligned for vec4 loads.
const LM_VOCAB_CHUNK: usize = 8192;

/// Row chunks of the LM loss start at multiples of this many rows. A row range of targets,
/// losses, statistics (3 floats per row) and hidden states then starts on a 256-byte boundary,
/// the largest storage offset alignment that WebGPU allows an adapter to require.
const LM_ROW_ALIGN: usize = 64;

/// Split of the LM loss's (rows, vocab) logits into row and vocabulary chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LmChunks {
    /// Rows of wte (vocabulary entries) per chunk.
    pub vocab_rows: usize,
    /// Rows (positions) whose logits over the whole vocabulary exist at once.
    pub row_chunk: usize,
}

/// Chunks of the LM loss with `rows` = B*T positions, `channels` = C and `vocab` = V. A wte chunk
/// (vocab_rows, C) and a logits chunk (row_chunk, vocab_rows) must each fit in `max_binding`
/// bytes, and the logits of one row chunk (row_chunk, V) in [`LM_LOGITS_BYTES`]. A row chunk is
/// all rows when they fit, else a multiple of [`LM_ROW_ALIGN`].
pub(crate) fn lm_chunks(rows: usize, channels: usize, vocab: usize, max_binding: u64) -> LmChunks {
    let by_weight = (max_binding / (channels.max(1) as u64 * 4)) as usize;
    let by_logits = (max_binding / (LM_ROW_ALIGN as u64 * 4)) as usize;
    let vocab_rows = LM_VOCAB_CHUNK.min(by_weight).min(by_logits).clamp(1, vocab.max(1));
    let fit = |r: usize| r as u64 * vocab as u64 * 4 <= LM_LOGITS_BYTES && r as u64 * vocab_rows as u64 * 4 <= max_binding;
    let row_chunk = if fit(rows) {
        rows.max(1)
    } else {
        let budget = (LM_LOGITS_BYTES / (vocab.max(1) as u64 * 4)).min(max_binding / (vocab_rows as u64 * 4)) as usize;
        (budget / LM_ROW_ALIGN * LM_ROW_ALIGN).max(LM_ROW_ALIGN)
    };
    LmChunks { vocab_rows, row_chunk }
}

/// Plans one training step without a device and returns its counts, FLOPs and memory.
pub fn plan_summary(
    config: &Gpt2Config,
    head: Head,
    shape: BatchShape,
    trainable: Trainable,
    lora: Option<&LoraSpec>,
    precision: Precision,
    clip: bool,
    max_binding: u64,
) -> crate::graph::PlanSummary {
    let graph = build_graph_with(config, head, shape, trainable, lora, precision, max_binding);
    let train = trainable != Trainable::Nothing || lora.is_some();
    crate::graph::plan::Plan::new(graph, crate::graph::plan::PlanOptions { train, clip, row_flags: true }).summary()
}

/// Lists the kernels of one training step that touch the first layer `lora` targets, in execution
/// order, each as `pass kind outputs <- inputs` with tensor names: the sequence a LoRA layer
/// adds to the step. Empty when no layer is targeted.
pub fn lora_layer_kernels(config: &Gpt2Config, head: Head, shape: BatchShape, lora: &LoraSpec, max_binding: u64) -> Vec<String> {
    use crate::graph::plan::{Kernel, Plan, PlanOptions};
    let Some(first) = lora.modules(config).ok().and_then(|m| m.into_iter().next()) else { return Vec::new() };
    let graph = build_graph_with_lora(config, head, shape, Trainable::Head, Some(lora), max_binding);
    let plan = Plan::new(graph, PlanOptions { train: true, clip: false, row_flags: true });
    let prefix = format!("{}.", first.prefix);
    let name = |t: &usize| plan.graph.tensors[*t].name.clone();
    let mut lines = Vec::new();
    for (i, kernel) in plan.kernels.iter().enumerate() {
        let tensors = kernel.tensors();
        if !tensors.iter().any(|t| plan.graph.tensors[*t].name.starts_with(&prefix)) {
            continue;
        }
        let pass = if i < plan.forward_end {
            "forward"
        } else if i < plan.backward_end {
            "backward"
        } else {
            "optimizer"
        };
        let line = match kernel {
            Kernel::Forward(op) => {
                let kind = format!("{op:?}");
                let kind = kind.split([' ', '{']).next().unwrap_or("").to_string();
                let outs: Vec<String> = op.outputs().iter().map(name).collect();
                let ins: Vec<String> = op.inputs().iter().map(name).collect();
                format!("{pass:<9} {kind:<16} {} <- {}", outs.join(", "), ins.join(", "))
            }
            other => {
                let kind = format!("{other:?}");
                let kind = kind.split([' ', '{']).next().unwrap_or("").to_string();
                let names: Vec<String> = tensors.iter().map(name).collect();
                format!("{pass:<9} {kind:<16} {}", names.join(", "))
            }
        };
        lines.push(line);
    }
    lines
}
