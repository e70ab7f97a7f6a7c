//! Planner: the full kernel sequence of a step, tensor lifetimes, buffer reuse and peak memory.

use super::autodiff::{self, Backward};
use super::ir::{DType, Graph, Op, RowChunk, TensorId, TensorKind};
use crate::kernels::attention::AttentionShape;
use crate::kernels::matmul::MatmulShape;
use std::collections::HashMap;

/// One kernel of a step, with every tensor it binds.
#[derive(Clone, Debug)]
pub(crate) enum Kernel {
    Forward(Op),
    XentBackward { rows: usize, classes: usize, logits: TensorId, targets: TensorId, loss: TensorId, dlogits: TensorId },
    /// The LM loss of a training step with its gradients (it replaces the forward `Op::LmLoss`,
    /// whose fields it repeats). For each row chunk: the logits of every vocabulary chunk and
    /// the loss, then each chunk's gradient in place, multiplied into the input gradient
    /// (`dinp`, with its accumulate flag) and the gradients of trainable wte chunks (`dwte`).
    /// Logits exist for one row chunk at a time and are computed once per step.
    LmLossFused {
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
        dinp: Option<(TensorId, bool)>,
        dwte: Vec<Option<TensorId>>,
    },
    PoolBackward { batch: usize, seq_len: usize, channels: usize, dpooled: TensorId, lengths: TensorId, dhidden: TensorId, accumulate: bool },
    MatmulInput { shape: MatmulShape, dout: TensorId, weight: TensorId, dinp: TensorId, accumulate: bool },
    MatmulWeight { shape: MatmulShape, inp: TensorId, dout: TensorId, dweight: TensorId },
    MatmulBias { shape: MatmulShape, dout: TensorId, dbias: TensorId },
    GeluBackward { len: usize, inp: TensorId, dout: TensorId, dinp: TensorId, accumulate: bool },
    LayerNormInput {
        rows: usize,
        channels: usize,
        dout: TensorId,
        inp: TensorId,
        weight: TensorId,
        mean: TensorId,
        rstd: TensorId,
        dinp: TensorId,
        accumulate: bool,
    },
    LayerNormParams {
        rows: usize,
        channels: usize,
        dout: TensorId,
        inp: TensorId,
        mean: TensorId,
        rstd: TensorId,
        dweight: TensorId,
        dbias: TensorId,
    },
    AttentionBackward { shape: AttentionShape, dout: TensorId, qkv: TensorId, att: TensorId, datt: TensorId, dqkv: TensorId, accumulate: bool },
    DropoutBackward { len: usize, prob: f32, seed: TensorId, salt: u32, dout: TensorId, dinp: TensorId, accumulate: bool },
    /// dinp (M,K) (+)= dout (M,N) @ deq(W)^T for an NF4 weight.
    MatmulNf4Input { shape: MatmulShape, dout: TensorId, codes: TensorId, scales: TensorId, steps: Option<TensorId>, dinp: TensorId, accumulate: bool },
    /// dinp (M,K) (+)= dout (M,N) @ W^T for a weight stored in f16.
    MatmulF16Input { shape: MatmulShape, dout: TensorId, packed: TensorId, dinp: TensorId, accumulate: bool },
    /// dst (+)= scale * src.
    Copy { len: usize, src: TensorId, dst: TensorId, scale: f32, accumulate: bool },
    EmbeddingToken {
        batch: usize,
        seq_len: usize,
        channels: usize,
        order: TensorId,
        segments: TensorId,
        dout: TensorId,
        dwte: TensorId,
        row_offset: usize,
        rows: usize,
    },
    EmbeddingPosition { batch: usize, seq_len: usize, channels: usize, dout: TensorId, dwpe: TensorId },
    /// With `rows`, one partial sum per row (see [`RowNorm`]).
    NormPartials { len: usize, grad: TensorId, partials: TensorId, offset: usize, rows: Option<RowNorm> },
    NormFinalize { count: usize, partials: TensorId, norm: TensorId },
    /// With `rows`, only the listed rows get the update (see [`RowFlags`]).
    AdamW { len: usize, param: TensorId, grad: TensorId, m: TensorId, v: TensorId, rows: Option<RowFlags> },
}

/// The listed rows of a table whose gradient reaches only the rows of the tokens in the batch:
/// the token embedding, when no tied language-model head adds to its gradient. Before each
/// micro-batch the host lists the rows of its tokens, so that an optimizer step lists every row
/// with a gradient. The optimizer and the gradient norm (see [`RowNorm`]) read only listed rows.
/// Every other row has a zero gradient and owes the step (the decay of its moments and weight,
/// and the step along its moments), which the executor applies before anything reads the row.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowFlags {
    /// U32 tensor: the count of listed rows, then their indices (room for every row).
    pub flags: TensorId,
    /// Floats per row.
    pub row_len: usize,
    /// First row of this table (a row chunk of a split weight) in the whole weight.
    pub row_offset: usize,
}

impl Kernel {
    /// Returns every tensor the kernel binds.
    pub fn tensors(&self) -> Vec<TensorId> {
        use Kernel::*;
        match self {
            Forward(op) => {
                let mut v = op.inputs();
                v.extend(op.outputs());
                v
            }
            XentBackward { logits, targets, loss, dlogits, .. } => vec![*logits, *targets, *loss, *dlogits],
            LmLossFused { inp, wte, targets, logits, stats, losses, loss, dinp, dwte, .. } => {
                let mut v = vec![*inp, *targets, *logits, *stats, *losses, *loss];
                v.extend(wte.iter().map(|c| c.tensor));
                v.extend(dinp.iter().map(|&(t, _)| t));
                v.extend(dwte.iter().flatten().copied());
                v
            }
            PoolBackward { dpooled, lengths, dhidden, .. } => vec![*dpooled, *lengths, *dhidden],
            MatmulInput { dout, weight, dinp, .. } => vec![*dout, *weight, *dinp],
            MatmulWeight { inp, dout, dweight, .. } => vec![*inp, *dout, *dweight],
            MatmulBias { dout, dbias, .. } => vec![*dout, *dbias],
            GeluBackward { inp, dout, dinp, .. } => vec![*inp, *dout, *dinp],
            LayerNormInput { dout, inp, weight, mean, rstd, dinp, .. } => vec![*dout, *inp, *weight, *mean, *rstd, *dinp],
            LayerNormParams { dout, inp, mean, rstd, dweight, dbias, .. } => {
                vec![*dout, *inp, *mean, *rstd, *dweight, *dbias]
            }
            AttentionBackward { dout, qkv, att, datt, dqkv, .. } => vec![*dout, *qkv, *att, *datt, *dqkv],
            Copy { src, dst, .. } => vec![*src, *dst],
            MatmulNf4Input { dout, codes, scales, steps, dinp, .. } => {
                let mut v = vec![*dout, *codes, *scales, *dinp];
                v.extend(steps.iter().copied());
                v
            }
            MatmulF16Input { dout, packed, dinp, .. } => vec![*dout, *packed, *dinp],
            DropoutBackward { seed, dout, dinp, .. } => vec![*seed, *dout, *dinp],
            EmbeddingToken { order, segments, dout, dwte, .. } => vec![*order, *segments, *dout, *dwte],
            EmbeddingPosition { dout, dwpe, .. } => vec![*dout, *dwpe],
            NormPartials { grad, partials, rows, .. } => {
                let mut t = vec![*grad, *partials];
                t.extend(rows.and_then(|r| r.listed));
                t
            }
            NormFinalize { partials, norm, .. } => vec![*partials, *norm],
            AdamW { param, grad, m, v, rows, .. } => {
                let mut t = vec![*param, *grad, *m, *v];
                t.extend(rows.map(|r| r.flags));
                t
            }
        }
    }

    /// Floating-point operations of the kernel, counting a multiply-add as two. Matmuls and
    /// attention products dominate; elementwise kernels count a few operations per element.
    pub fn flops(&self) -> u64 {
        use Kernel::*;
        let matmul = |s: &MatmulShape| 2 * (s.rows * s.inner * s.cols) as u64;
        // Causal attention: scores and weighted sum each cost B*NH*T*T*HS multiply-adds, of which
        // about half (the lower triangle) count; the batched products compute the whole square.
        let attention = |s: &AttentionShape| {
            let t = s.seq_len as u64;
            2 * 2 * (s.batch as u64) * t * t * (s.channels as u64) / 2
        };
        match self {
            Forward(op) => match op {
                Op::Embedding { batch, seq_len, channels, .. } => (batch * seq_len * channels) as u64,
                Op::LayerNorm { rows, channels, .. } => 8 * (rows * channels) as u64,
                Op::Matmul { rows, inner, cols, bias, .. } => {
                    2 * (rows * inner * cols) as u64 + if bias.is_some() { (rows * cols) as u64 } else { 0 }
                }
                Op::MatmulNf4 { rows, inner, cols, bias, .. } | Op::MatmulF16 { rows, inner, cols, bias, .. } => {
                    2 * (rows * inner * cols) as u64 + if bias.is_some() { (rows * cols) as u64 } else { 0 }
                }
                Op::Gelu { len, .. } => 12 * *len as u64,
                Op::Add { len, .. } => *len as u64,
                Op::Dropout { len, .. } => *len as u64,
                Op::Attention { shape, .. } => attention(shape) + 5 * (shape.batch * shape.num_heads * shape.seq_len * shape.seq_len) as u64 / 2,
                Op::PoolLast { .. } => 0,
                Op::CrossEntropy { rows, classes, .. } => 4 * (rows * classes) as u64,
                Op::LmLoss { rows, channels, vocab, .. } => 2 * (rows * channels * vocab) as u64 + 4 * (rows * vocab) as u64,
            },
            XentBackward { rows, classes, .. } => 3 * (rows * classes) as u64,
            // The logits product is counted once, by the forward op that a training step skips:
            // here only the two gradient products and the elementwise gradient of the loss.
            LmLossFused { rows, channels, vocab, wte, dinp, dwte, .. } => {
                let input = if dinp.is_some() { 2 * (rows * channels * vocab) as u64 } else { 0 };
                let weight: u64 = wte.iter().zip(dwte).filter(|(_, d)| d.is_some()).map(|(c, _)| 2 * (rows * channels * c.rows) as u64).sum();
                input + weight + 3 * (rows * vocab) as u64
            }
            PoolBackward { .. } => 0,
            MatmulInput { shape, .. } | MatmulWeight { shape, .. } | MatmulNf4Input { shape, .. } | MatmulF16Input { shape, .. } => matmul(shape),
            MatmulBias { shape, .. } => (shape.rows * shape.cols) as u64,
            GeluBackward { len, .. } => 16 * *len as u64,
            LayerNormInput { rows, channels, .. } => 10 * (rows * channels) as u64,
            LayerNormParams { rows, channels, .. } => 5 * (rows * channels) as u64,
            AttentionBackward { shape, .. } => 2 * attention(shape) + 4 * (shape.batch * shape.num_heads * shape.seq_len * shape.seq_len) as u64 / 2,
            Copy { len, accumulate, .. } => u64::from(*accumulate) * *len as u64,
            DropoutBackward { len, .. } => *len as u64,
            EmbeddingToken { batch, seq_len, channels, .. } | EmbeddingPosition { batch, seq_len, channels, .. } => {
                (batch * seq_len * channels) as u64
            }
            NormPartials { len, .. } => 2 * *len as u64,
            NormFinalize { count, .. } => *count as u64,
            AdamW { len, .. } => 16 * *len as u64,
        }
    }
}

/// The gradient norm of a table whose gradient reaches only the rows of the batch's tokens (see
/// [`row_sparse_table`]): one partial sum per row. A session with row lists sums only the listed
/// rows, in the order a dense session sums every row, so both get the same bits.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RowNorm {
    /// Floats per row.
    pub row_len: usize,
    /// The table's list of rows ([`RowFlags::flags`]), when it has one. The partial sums of the
    /// other rows must then hold +0, which the executor writes after each step.
    pub listed: Option<TensorId>,
}

/// Storage location of a tensor's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Storage {
    /// A buffer of its own, alive for the whole session (parameters, gradients, inputs, ...).
    Dedicated,
    /// A shared pool buffer, reused by tensors whose lifetimes do not overlap.
    Pool(usize),
    /// Never touched by any kernel of the plan.
    Unused,
}

/// Counts, FLOPs and memory of a planned step, computed before anything runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlanSummary {
    /// Dispatches of the forward pass (including the loss).
    pub forward_dispatches: usize,
    /// Dispatches of the backward pass.
    pub backward_dispatches: usize,
    /// Dispatches of the optimizer (norm reduction and AdamW).
    pub optimizer_dispatches: usize,
    /// Floating-point operations of the forward pass per step.
    pub forward_flops: u64,
    /// Floating-point operations of the backward pass per step.
    pub backward_flops: u64,
    /// Parameters updated by the optimizer.
    pub trainable_params: u64,
    /// Parameters that are frozen.
    pub frozen_params: u64,
    /// Bytes of every buffer the step allocates: parameters, gradients, optimizer state, inputs
    /// and the reusable activation pool.
    pub peak_bytes: u64,
    /// Bytes of parameters.
    pub param_bytes: u64,
    /// Bytes of parameter gradients and optimizer moments.
    pub optimizer_bytes: u64,
    /// Bytes of the activation pool after reuse.
    pub activation_bytes: u64,
    /// Bytes the activations would take without reuse.
    pub activation_bytes_without_reuse: u64,
    /// Gradient buffers in the plan, one per trainable parameter tensor.
    pub gradient_buffers: usize,
}

/// Options that change the kernels of a step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PlanOptions {
    /// Emit the backward pass and the optimizer.
    pub train: bool,
    /// Clip gradients by their global norm (adds the norm reduction kernels).
    pub clip: bool,
    /// Give the optimizer row flags for tables whose gradient reaches only some rows (see
    /// [`RowFlags`]); off only to compare against the dense update in tests.
    pub row_flags: bool,
}

/// Name suffixes of the two device tensors of an NF4 weight.
pub(crate) const NF4_CODES_SUFFIX: &str = ".nf4_codes";
pub(crate) const NF4_SCALES_SUFFIX: &str = ".nf4_scales";
pub(crate) const NF4_SCALE_CODES_SUFFIX: &str = ".nf4_scale_codes";
pub(crate) const NF4_SCALE_STEPS_SUFFIX: &str = ".nf4_scale_steps";
/// Name suffix of the device tensor of a weight stored in f16.
pub(crate) const F16_SUFFIX: &str = ".f16";
/// Part of the name of every tensor that holds NF4 block scales, double-quantised or not.
const NF4_SCALES_MARK: &str = ".nf4_scale";

/// The planned step: kernels in order with phase boundaries, and the storage of every tensor.
#[derive(Debug)]
pub(crate) struct Plan {
    pub graph: Graph,
    pub kernels: Vec<Kernel>,
    /// `kernels[..forward_end]` is the forward pass.
    pub forward_end: usize,
    /// `kernels[forward_end..backward_end]` is the backward pass, the rest the optimizer.
    pub backward_end: usize,
    pub storage: Vec<Storage>,
    pub pool_sizes: Vec<u64>,
    pub backward: Backward,
    /// The global gradient norm, when clipping.
    pub norm: Option<TensorId>,
}

/// Name suffix of the row flags of a table whose optimizer skips untouched rows (see [`RowFlags`]).
const ROWS_TOUCHED_SUFFIX: &str = ".rows_touched";

/// Floats per row and first row of `grad` in the whole table when only token-embedding backward
/// kernels write it, so that it is nonzero only in the rows of the batch's tokens.
fn row_sparse_table(backward: &[Kernel], grad: TensorId) -> Option<(usize, usize)> {
    let mut found = None;
    for kernel in backward {
        if !kernel.tensors().contains(&grad) {
            continue;
        }
        match kernel {
            Kernel::EmbeddingToken { dwte, channels, row_offset, .. } if *dwte == grad => {
                found = Some((*channels, *row_offset));
            }
            _ => return None,
        }
    }
    found
}

/// Number of partial sums of one gradient tensor in the norm reduction; must match the norm
/// kernels: one per row with `rows`, else one per block.
fn norm_partials(len: usize, rows: Option<RowNorm>) -> usize {
    match rows {
        Some(r) => len / r.row_len,
        None => crate::kernels::norm::partials_len(len),
    }
}

impl Plan {
    /// Differentiates and plans `graph` (whose last op is the loss).
    pub fn new(mut graph: Graph, options: PlanOptions) -> Plan {
        let mut kernels: Vec<Kernel> = graph.ops.iter().cloned().map(Kernel::Forward).collect();
        let forward_end = kernels.len();
        let backward = if options.train { autodiff::differentiate(&mut graph) } else { Backward::default() };
        kernels.extend(backward.kernels.iter().cloned());
        let backward_end = kernels.len();

        let mut norm = None;
        if options.train && !backward.param_grads.is_empty() {
            // The tables whose gradient reaches only the batch's rows get a norm summed per row
            // and, with row flags on, a list of the step's rows. The AdamW row kernel reads whole
            // vec4s of one row, so only rows of a multiple of 4 floats get the list.
            let mut row_flags = HashMap::new();
            let mut row_norms = HashMap::new();
            for &(param, grad) in &backward.param_grads {
                let Some((row_len, row_offset)) = row_sparse_table(&backward.kernels, grad) else { continue };
                // The dense session sums such a table per row too, so that both agree bit for bit.
                let mut row_norm = RowNorm { row_len, listed: None };
                if options.row_flags && row_len % 4 == 0 {
                    let rows = graph.tensors[param].shape[0];
                    let name = format!("{}{ROWS_TOUCHED_SUFFIX}", graph.tensors[param].name);
                    let flags = graph.tensor(name, &[1 + rows], DType::U32, TensorKind::OptimizerState);
                    row_flags.insert(grad, RowFlags { flags, row_len, row_offset });
                    row_norm.listed = Some(flags);
                }
                row_norms.insert(grad, row_norm);
            }
            if options.clip {
                let partials_of = |g: TensorId| norm_partials(graph.tensors[g].len(), row_norms.get(&g).copied());
                let total: usize = backward.param_grads.iter().map(|&(_, g)| partials_of(g)).sum();
                // The listed-row kernel leaves the partial sums of unlisted rows alone, so they
                // must keep their zeros: a dedicated buffer rather than a shared pool slot.
                let kind = if row_flags.is_empty() { TensorKind::Scratch } else { TensorKind::OptimizerState };
                let partials = graph.tensor("grad_norm_partials", &[total], DType::F32, kind);
                let n = graph.tensor("grad_norm", &[1], DType::F32, TensorKind::Output);
                let mut offset = 0;
                for &(_, grad) in &backward.param_grads {
                    let len = graph.tensors[grad].len();
                    let rows = row_norms.get(&grad).copied();
                    kernels.push(Kernel::NormPartials { len, grad, partials, offset, rows });
                    offset += norm_partials(len, rows);
                }
                kernels.push(Kernel::NormFinalize { count: total, partials, norm: n });
                norm = Some(n);
            }
            for &(param, grad) in &backward.param_grads {
                let shape = graph.tensors[param].shape.clone();
                let name = graph.tensors[param].name.clone();
                let m = graph.tensor(format!("{name}.adam_m"), &shape, DType::F32, TensorKind::OptimizerState);
                let v = graph.tensor(format!("{name}.adam_v"), &shape, DType::F32, TensorKind::OptimizerState);
                let rows = row_flags.get(&grad).copied();
                kernels.push(Kernel::AdamW { len: graph.tensors[param].len(), param, grad, m, v, rows });
            }
        }
        let (storage, pool_sizes) = assign_storage(&graph, &kernels);
        Plan { graph, kernels, forward_end, backward_end, storage, pool_sizes, backward, norm }
    }

    /// Counts, FLOPs and bytes of the plan.
    pub fn summary(&self) -> PlanSummary {
        let count = |range: std::ops::Range<usize>| -> usize { self.kernels[range].iter().map(dispatch_count).sum() };
        let flops = |range: std::ops::Range<usize>| -> u64 { self.kernels[range].iter().map(Kernel::flops).sum() };
        let mut trainable_params = 0;
        let mut frozen_params = 0;
        let mut param_bytes = 0;
        let mut optimizer_bytes = 0;
        let mut dedicated_bytes = 0;
        let mut activation_bytes_without_reuse = 0;
        for (id, t) in self.graph.tensors.iter().enumerate() {
            match t.kind {
                TensorKind::Param { trainable: true } => trainable_params += t.len() as u64,
                // An NF4 weight counts its values once, through its codes (8 per u32).
                TensorKind::Param { trainable: false } if t.name.ends_with(NF4_CODES_SUFFIX) => frozen_params += 8 * t.len() as u64,
                TensorKind::Param { trainable: false } if t.name.contains(NF4_SCALES_MARK) => {}
                // An f16 weight stores two values per u32.
                TensorKind::Param { trainable: false } if t.name.ends_with(F16_SUFFIX) => frozen_params += 2 * t.len() as u64,
                TensorKind::Param { trainable: false } => frozen_params += t.len() as u64,
                _ => {}
            }
            match t.kind {
                TensorKind::Param { .. } => param_bytes += t.bytes(),
                TensorKind::ParamGrad | TensorKind::OptimizerState => optimizer_bytes += t.bytes(),
                _ => {}
            }
            match self.storage[id] {
                Storage::Dedicated => dedicated_bytes += t.bytes(),
                Storage::Pool(_) => activation_bytes_without_reuse += t.bytes(),
                Storage::Unused => {}
            }
        }
        let activation_bytes: u64 = self.pool_sizes.iter().sum();
        // A training step skips the forward LM loss, whose work the fused backward kernel does.
        let skipped: usize = if self.kernels[self.forward_end..].iter().any(|k| matches!(k, Kernel::LmLossFused { .. })) {
            self.kernels[..self.forward_end].iter().filter(|k| matches!(k, Kernel::Forward(Op::LmLoss { .. }))).map(dispatch_count).sum()
        } else {
            0
        };
        PlanSummary {
            forward_dispatches: count(0..self.forward_end) - skipped,
            backward_dispatches: count(self.forward_end..self.backward_end),
            optimizer_dispatches: count(self.backward_end..self.kernels.len()),
            forward_flops: flops(0..self.forward_end),
            backward_flops: flops(self.forward_end..self.backward_end),
            trainable_params,
            frozen_params,
            peak_bytes: dedicated_bytes + activation_bytes,
            param_bytes,
            optimizer_bytes,
            activation_bytes,
            activation_bytes_without_reuse,
            gradient_buffers: self.backward.param_grads.len(),
        }
    }
}

/// Dispatches one kernel records; attention and chunked ops record several.
pub(crate) fn dispatch_count(kernel: &Kernel) -> usize {
    match kernel {
        Kernel::Forward(Op::Embedding { wte, .. }) => wte.len(),
        Kernel::Forward(Op::Matmul { weight, .. }) => weight.len(),
        // attention::forward records scores, softmax and weighted sum; attention::backward, with
        // the tile kernels, the probability gradient, the softmax backward and the query and
        // key/value gradients. Its batched products (adapters with 8-lane subgroups) record the
        // key and value gradients apart, one dispatch more; the executor logs the recorded counts.
        Kernel::Forward(Op::Attention { .. }) => 3,
        Kernel::Forward(Op::CrossEntropy { .. }) => 2,
        // A matmul and a fold per row and vocabulary chunk, then the mean.
        Kernel::Forward(Op::LmLoss { rows, row_chunk, wte, .. }) => rows.div_ceil(*row_chunk) * 2 * wte.len() + 1,
        // The count before and the mean after; per row and vocabulary chunk a matmul, a fold,
        // the gradient in place and the gradient products.
        Kernel::LmLossFused { rows, row_chunk, wte, dinp, dwte, .. } => {
            let per_row_chunk = 3 * wte.len() + dinp.map_or(0, |_| wte.len()) + dwte.iter().flatten().count();
            2 + rows.div_ceil(*row_chunk) * per_row_chunk
        }
        Kernel::AttentionBackward { .. } => 4,
        // The total, then the step count of AdamW (see adamw::count_step).
        Kernel::NormFinalize { .. } => 2,
        _ => 1,
    }
}

/// Gives persistent tensors their own buffers and packs transient ones (activations, their
/// gradients, scratch) into pool buffers by lifetime, best fit first.
fn assign_storage(graph: &Graph, kernels: &[Kernel]) -> (Vec<Storage>, Vec<u64>) {
    let n = graph.tensors.len();
    let mut first = vec![usize::MAX; n];
    let mut last = vec![0usize; n];
    for (i, k) in kernels.iter().enumerate() {
        for t in k.tensors() {
            first[t] = first[t].min(i);
            last[t] = last[t].max(i);
        }
    }
    let mut storage = vec![Storage::Unused; n];
    let mut transient: Vec<TensorId> = Vec::new();
    for (id, t) in graph.tensors.iter().enumerate() {
        if first[id] == usize::MAX {
            continue;
        }
        match t.kind {
            TensorKind::Activation | TensorKind::ActivationGrad | TensorKind::Scratch => transient.push(id),
            _ => storage[id] = Storage::Dedicated,
        }
    }
    transient.sort_by_key(|&id| (first[id], id));
    let mut pool_sizes: Vec<u64> = Vec::new();
    // For each pool buffer, the last kernel index that uses it.
    let mut busy_until: Vec<usize> = Vec::new();
    for id in transient {
        let bytes = graph.tensors[id].bytes();
        let free = (0..pool_sizes.len()).filter(|&b| busy_until[b] < first[id]);
        // Best fit: the smallest free buffer that fits the tensor, else the largest free one
        // (grown to fit), else a new buffer.
        let fitting = free.clone().filter(|&b| pool_sizes[b] >= bytes).min_by_key(|&b| pool_sizes[b]);
        let chosen = fitting.or_else(|| free.max_by_key(|&b| pool_sizes[b]));
        let b = match chosen {
            Some(b) => b,
            None => {
                pool_sizes.push(0);
                busy_until.push(0);
                pool_sizes.len() - 1
            }
        };
        pool_sizes[b] = pool_sizes[b].max(bytes);
        busy_until[b] = last[id];
        storage[id] = Storage::Pool(b);
    }
    (storage, pool_sizes)
}
