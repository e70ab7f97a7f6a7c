//! Graph IR: tensors with static shapes and the forward ops of the kernel families.

use crate::kernels::attention::AttentionShape;
use crate::kernels::matmul::{MatmulShape, WeightLayout};

/// Index of a tensor in [`Graph::tensors`].
pub(crate) type TensorId = usize;

/// Element type of a tensor; every type is 4 bytes wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DType {
    F32,
    U32,
    I32,
}

/// What a tensor is for, which decides how the planner stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TensorKind {
    /// A model weight; `trainable` ones get a gradient and optimizer state.
    Param { trainable: bool },
    /// Written by the host before each step (token ids, lengths, targets).
    Input,
    /// Produced by a forward op and released after its last use.
    Activation,
    /// The gradient of an activation, released after its last use.
    ActivationGrad,
    /// The gradient of a parameter; persistent, accumulated, zeroed by the optimizer.
    ParamGrad,
    /// AdamW first or second moment of a parameter; persistent.
    OptimizerState,
    /// Read back by the host after a step (loss, logits); kept to the end of the step.
    Output,
    /// Scratch space used inside one backward kernel.
    Scratch,
}

/// One tensor of the graph.
#[derive(Clone, Debug)]
pub(crate) struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kind: TensorKind,
}

impl Tensor {
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> u64 {
        self.len() as u64 * 4
    }
}

/// A range of rows of a parameter that is stored as its own tensor because the whole parameter
/// exceeds the adapter's storage binding limit (the 50257-row token embedding of GPT-2).
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowChunk {
    pub tensor: TensorId,
    pub row_offset: usize,
    pub rows: usize,
}

/// Shape of the product of one weight chunk of a matmul op with `rows`, `inner`, `cols`. A
/// weight in one piece covers the whole output; an (N, K) table split into row chunks gives each
/// chunk the output columns of its rows.
pub(crate) fn chunk_shape(rows: usize, inner: usize, cols: usize, layout: WeightLayout, weight: &[RowChunk], chunk: &RowChunk) -> MatmulShape {
    if weight.len() == 1 {
        return MatmulShape::new(rows, inner, cols, layout);
    }
    assert_eq!(layout, WeightLayout::OutIn, "only (N, K) weights are split into row chunks");
    MatmulShape { rows, inner, cols: chunk.rows, layout, out_offset: chunk.row_offset, out_stride: cols }
}

/// Forward ops. Field comments give shapes with the legend of the kernels.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    /// out (B,T,C) = wte[ids] + wpe[t], with wte stored as row chunks.
    Embedding { batch: usize, seq_len: usize, channels: usize, ids: TensorId, wte: Vec<RowChunk>, wpe: TensorId, out: TensorId },
    /// out (N,C) = layernorm(inp) * weight + bias; mean and rstd (N) saved for the backward.
    LayerNorm {
        rows: usize,
        channels: usize,
        eps: f32,
        inp: TensorId,
        weight: TensorId,
        bias: TensorId,
        out: TensorId,
        mean: TensorId,
        rstd: TensorId,
    },
    /// out (M,N) = inp (M,K) @ W + bias. W is one tensor or, for the tied LM head, row chunks of
    /// an (N,K) table that each produce a column range of `out`.
    Matmul {
        rows: usize,
        inner: usize,
        cols: usize,
        layout: WeightLayout,
        inp: TensorId,
        weight: Vec<RowChunk>,
        bias: Option<TensorId>,
        out: TensorId,
    },
    /// out (M,N) = inp (M,K) @ deq(W) + bias, with the frozen weight W (K,N) stored as NF4:
    /// `codes` (K*N/8) u32 and one f32 scale per block of 64 in `scales` (K*N/64), or with
    /// double quantisation 8-bit scale codes in `scales` and one f32 step per 256 blocks in `steps`.
    MatmulNf4 {
        rows: usize,
        inner: usize,
        cols: usize,
        inp: TensorId,
        codes: TensorId,
        scales: TensorId,
        steps: Option<TensorId>,
        bias: Option<TensorId>,
        out: TensorId,
    },
    /// out (M,N) = inp (M,K) @ W + bias, with the frozen weight W (K,N) stored in f16, two
    /// values per u32 in `packed` (K*N/2) (see `kernels::f16_weights`).
    MatmulF16 { rows: usize, inner: usize, cols: usize, inp: TensorId, packed: TensorId, bias: Option<TensorId>, out: TensorId },
    /// out = gelu(inp), tanh form.
    Gelu { len: usize, inp: TensorId, out: TensorId },
    /// out = a + scale * b; scale is 1 for the residual adds and alpha / r for a LoRA branch.
    Add { len: usize, a: TensorId, b: TensorId, scale: f32, out: TensorId },
    /// out = inp * mask / (1 - prob) while training (`seed` (2) u32 = [seed of the step,
    /// active]), out = inp otherwise. `salt` distinguishes the dropout sites of one graph.
    Dropout { len: usize, prob: f32, seed: TensorId, salt: u32, inp: TensorId, out: TensorId },
    /// Causal self-attention over qkv (B,T,3C) into out (B,T,C); att (B,NH,T,T') saved, rows
    /// padded to T' (see `AttentionShape::att_stride`).
    Attention { shape: AttentionShape, qkv: TensorId, att: TensorId, out: TensorId },
    /// pooled (B,C) = hidden[b, lengths[b]-1].
    PoolLast { batch: usize, seq_len: usize, channels: usize, hidden: TensorId, lengths: TensorId, pooled: TensorId },
    /// losses (N) = cross-entropy of logits (N,V) against targets (N, negative = ignored);
    /// loss (2) = [mean over counted rows, counted rows].
    CrossEntropy { rows: usize, classes: usize, logits: TensorId, targets: TensorId, losses: TensorId, loss: TensorId },
    /// Next-token loss of logits = inp (N,C) @ wte^T without ever holding (N,V) logits. Rows
    /// are taken `row_chunk` at a time. For each row chunk and each row chunk of wte (a
    /// vocabulary chunk), the logits go to their block of `logits` (row_chunk, V) and are folded
    /// into `stats` (N,3), and the last vocabulary chunk writes losses (N). Then loss (2) =
    /// [mean, counted rows]. A training step skips this op: the backward recomputes the same
    /// values with the gradients (`Kernel::LmLossFused`).
    LmLoss {
        rows: usize,
        channels: usize,
        vocab: usize,
        row_chunk: usize,
        inp: TensorId,
        wte: Vec<RowChunk>,
        targets: TensorId,
        logits: TensorId,
        stats: TensorId,
        losses: TensorId,
        loss: TensorId,
    },
}

impl Op {
    /// Tensors read by the op.
    pub fn inputs(&self) -> Vec<TensorId> {
        match self {
            Op::Embedding { ids, wte, wpe, .. } => {
                let mut v = vec![*ids, *wpe];
                v.extend(wte.iter().map(|c| c.tensor));
                v
            }
            Op::LayerNorm { inp, weight, bias, .. } => vec![*inp, *weight, *bias],
            Op::Matmul { inp, weight, bias, .. } => {
                let mut v = vec![*inp];
                v.extend(weight.iter().map(|c| c.tensor));
                v.extend(bias.iter().copied());
                v
            }
            Op::MatmulNf4 { inp, codes, scales, steps, bias, .. } => {
                let mut v = vec![*inp, *codes, *scales];
                v.extend(steps.iter().copied());
                v.extend(bias.iter().copied());
                v
            }
            Op::MatmulF16 { inp, packed, bias, .. } => {
                let mut v = vec![*inp, *packed];
                v.extend(bias.iter().copied());
                v
            }
            Op::Gelu { inp, .. } => vec![*inp],
            Op::Add { a, b, .. } => vec![*a, *b],
            Op::Dropout { inp, seed, .. } => vec![*inp, *seed],
            Op::Attention { qkv, .. } => vec![*qkv],
            Op::PoolLast { hidden, lengths, .. } => vec![*hidden, *lengths],
            Op::CrossEntropy { logits, targets, .. } => vec![*logits, *targets],
            Op::LmLoss { inp, wte, targets, .. } => {
                let mut v = vec![*inp, *targets];
                v.extend(wte.iter().map(|c| c.tensor));
                v
            }
        }
    }

    /// Tensors written by the op.
    pub fn outputs(&self) -> Vec<TensorId> {
        match self {
            Op::Embedding { out, .. } => vec![*out],
            Op::LayerNorm { out, mean, rstd, .. } => vec![*out, *mean, *rstd],
            Op::Matmul { out, .. } => vec![*out],
            Op::MatmulNf4 { out, .. } | Op::MatmulF16 { out, .. } => vec![*out],
            Op::Gelu { out, .. } => vec![*out],
            Op::Add { out, .. } => vec![*out],
            Op::Dropout { out, .. } => vec![*out],
            Op::Attention { att, out, .. } => vec![*att, *out],
            Op::PoolLast { pooled, .. } => vec![*pooled],
            Op::CrossEntropy { losses, loss, .. } => vec![*losses, *loss],
            Op::LmLoss { logits, stats, losses, loss, .. } => vec![*logits, *stats, *losses, *loss],
        }
    }
}

/// Source of a parameter tensor's values: rows `row_offset..row_offset + rows` of the
/// model weight `name` (all rows unless the weight is split into chunks).
#[derive(Clone, Debug)]
pub(crate) struct ParamSource {
    pub tensor: TensorId,
    pub name: String,
    pub row_offset: usize,
    pub rows: usize,
    /// Storage format of the weight's values in the device tensor.
    pub encoding: ParamEncoding,
}

/// Storage of a parameter on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ParamEncoding {
    /// f32 values as on the host.
    Plain,
    /// The 4-bit NF4 codes of the whole weight, 8 per u32 (see `kernels::nf4`).
    Nf4Codes,
    /// The f32 scale of each block of 64 values of an NF4 weight.
    Nf4Scales,
    /// The 8-bit codes of double-quantised block scales, 4 per u32.
    Nf4ScaleCodes,
    /// The f32 step of each group of 256 double-quantised block scales.
    Nf4ScaleSteps,
    /// The values rounded to f16, two per u32 (see `kernels::f16_weights`).
    F16,
}

/// A forward graph: tensors and ops in execution order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Graph {
    pub tensors: Vec<Tensor>,
    pub ops: Vec<Op>,
    pub params: Vec<ParamSource>,
}

impl Graph {
    pub fn tensor(&mut self, name: impl Into<String>, shape: &[usize], dtype: DType, kind: TensorKind) -> TensorId {
        self.tensors.push(Tensor { name: name.into(), shape: shape.to_vec(), dtype, kind });
        self.tensors.len() - 1
    }

    pub fn activation(&mut self, name: impl Into<String>, shape: &[usize]) -> TensorId {
        self.tensor(name, shape, DType::F32, TensorKind::Activation)
    }

    pub fn is_trainable(&self, id: TensorId) -> bool {
        matches!(self.tensors[id].kind, TensorKind::Param { trainable: true })
    }

    pub fn push(&mut self, op: Op) {
        self.ops.push(op);
    }
}
