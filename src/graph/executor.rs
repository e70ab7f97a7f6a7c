//! Executor: buffers, pipelines and bind groups created once, a step replayed from one encoder.

use super::ir::{chunk_shape, Graph, Op, ParamEncoding, TensorId};
use super::plan::{Kernel, Plan, PlanOptions, RowNorm, Storage};
use crate::data::Batch;
use crate::gpu::{Dispatch, Gpu, GpuError, TensorBinding};
use crate::kernels::lmloss::{self, VocabChunk};
use crate::kernels::matmul::{MatmulShape, WeightLayout};
use crate::kernels::{adamw, attention, crossentropy, deferred_update, dropout, embedding, f16_weights, gelu, layernorm, matmul, nf4, norm, pooling, residual};
use crate::model::weights::{HostTensor, Weights};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

/// Optimizer settings of a training session.
#[derive(Clone, Copy, Debug)]
pub struct OptimizerSettings {
    /// AdamW first-moment decay.
    pub beta1: f32,
    /// AdamW second-moment decay.
    pub beta2: f32,
    /// AdamW denominator epsilon.
    pub eps: f32,
    /// Decoupled weight decay, applied to every trainable tensor.
    pub weight_decay: f32,
    /// Clip gradients to this global L2 norm; `None` disables clipping.
    pub clip_grad_norm: Option<f32>,
    /// Compute the global gradient norm even without clipping, and skip any update whose norm
    /// is NaN or infinite (the weights and moments keep their last good values).
    pub skip_nonfinite: bool,
}

impl Default for OptimizerSettings {
    fn default() -> Self {
        // torch.optim.AdamW defaults, with the fine-tuning weight decay of 0.1.
        OptimizerSettings { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, clip_grad_norm: None, skip_nonfinite: true }
    }
}

impl OptimizerSettings {
    /// Returns the clipping threshold the AdamW kernel reads: the clip norm, or without clipping the
    /// largest f32 (which never clips) when non-finite updates are skipped, else 0 (no norm).
    fn max_norm(&self) -> f32 {
        match (self.clip_grad_norm, self.skip_nonfinite) {
            (Some(n), _) => n,
            (None, true) => f32::MAX,
            (None, false) => 0.0,
        }
    }
}

/// Inputs the host writes before a step. Lengths are the real token counts of each row (1..=T);
/// targets are class indices (classifier) or next-token ids (language model), negative to ignore.
pub struct StepInputs<'a> {
    /// Token ids (B*T), right-padded.
    pub ids: &'a [u32],
    /// Real tokens per sequence (B).
    pub lengths: &'a [u32],
    /// Targets, one per loss row, negative where ignored.
    pub targets: &'a [i32],
}

/// Scalars read back after a step.
#[derive(Clone, Copy, Debug)]
pub struct StepOutputs {
    /// Mean loss over the counted rows.
    pub loss: f32,
    /// Rows that counted towards the loss.
    pub counted: f32,
}

/// The tensors and sizes of one LM loss, with the row ranges its dispatches bind.
struct LmLossBindings {
    rows: usize,
    channels: usize,
    vocab: usize,
    row_chunk: usize,
    inp: TensorId,
    targets: TensorId,
    logits: TensorId,
    stats: TensorId,
    losses: TensorId,
}

impl LmLossBindings {
    /// Binds rows `start..start + n` of tensor `t`, whose rows are `width` 4-byte values. Row
    /// chunks start at multiples of 64 rows, so the offset meets WebGPU's storage alignment.
    fn rows_of<'s>(&self, session: &'s Session<'_>, t: TensorId, start: usize, n: usize, width: usize) -> TensorBinding<'s> {
        let whole = session.binding(t);
        let offset = (start * width * 4) as u64;
        let size = (n * width * 4) as u64;
        assert!(offset + size <= whole.size, "rows {start}..{} of `{}` lie outside the tensor", start + n, session.name(t));
        TensorBinding { buffer: whole.buffer, offset: whole.offset + offset, size }
    }

    /// Returns the number of rows of the row chunk that starts at `start`.
    fn rows_from(&self, start: usize) -> usize {
        (self.rows - start).min(self.row_chunk)
    }

    /// Returns the product shape and the loss chunk of `n` rows against wte chunk `chunk`.
    fn chunk_shapes(&self, chunk: &super::ir::RowChunk, n: usize) -> (MatmulShape, VocabChunk) {
        let shape = MatmulShape::new(n, self.channels, chunk.rows, WeightLayout::OutIn);
        (shape, VocabChunk { rows: n, cols: chunk.rows, col_offset: chunk.row_offset, vocab: self.vocab })
    }

    /// Binds rows `start..start + n` of the targets, the statistics and the losses.
    fn loss_rows<'s>(&self, session: &'s Session<'_>, start: usize, n: usize) -> [TensorBinding<'s>; 3] {
        [self.rows_of(session, self.targets, start, n, 1), self.rows_of(session, self.stats, start, n, 3), self.rows_of(session, self.losses, start, n, 1)]
    }

    /// Binds the logits block (n, chunk.rows) of vocabulary chunk `chunk`: the blocks of the
    /// chunks lie one after another in `logits`, each sized for a full row chunk.
    fn logits_block<'s>(&self, session: &'s Session<'_>, chunk: &super::ir::RowChunk, n: usize) -> TensorBinding<'s> {
        let whole = session.binding(self.logits);
        let offset = (self.row_chunk * chunk.row_offset * 4) as u64;
        TensorBinding { buffer: whole.buffer, offset: whole.offset + offset, size: (n * chunk.rows * 4) as u64 }
    }
}

/// A planned model on a device, ready to run steps.
pub struct Session<'g> {
    gpu: &'g Gpu,
    plan: Plan,
    dedicated: HashMap<TensorId, wgpu::Buffer>,
    pool: Vec<wgpu::Buffer>,
    dispatches: Vec<Dispatch>,
    forward_dispatches: usize,
    backward_dispatches: usize,
    /// Dispatches of the forward LM loss, which a training step skips because its fused
    /// backward kernel computes the same logits and loss (empty when there is none).
    train_skip: std::ops::Range<usize>,
    step_buffer: wgpu::Buffer,
    settings: OptimizerSettings,
    optimizer_steps: u64,
    by_name: HashMap<String, TensorId>,
    /// Seed of the run's dropout masks; each training micro-batch derives its own from it.
    dropout_seed: u64,
    /// Training micro-batches since the last optimizer update.
    micro_batches: u64,
    /// Mean of the block scales of each double-quantised NF4 weight, by its codes tensor.
    nf4_means: HashMap<TensorId, f32>,
    /// Device copies of the loss of recent training steps, when enabled by [`Session::log_losses`].
    loss_log: Option<LossLog>,
    /// Host copies of the row flags of the tables whose optimizer skips untouched rows (see
    /// [`RowFlags`](super::plan::RowFlags)).
    touched_rows: RefCell<Vec<TouchedRows>>,
    /// Distinct token ids of the batch last written by [`Session::set_inputs`], when some table
    /// has row flags.
    batch_tokens: RefCell<Vec<u32>>,
    /// (lr, norm, bias corrections) of each optimizer step since the log was last emptied. The
    /// rows of the tables above that were not listed in a step still owe that step's update (see
    /// `shaders/deferred_update.wgsl`). `None` without such tables.
    step_log: Option<wgpu::Buffer>,
    /// Steps in `step_log`.
    logged_steps: Cell<u32>,
    /// Steps that `step_log` may hold before every row settles: [`STEP_LOG_STEPS`], fewer in
    /// tests.
    step_log_steps: u32,
    /// Options the plan was made with, which the plans of shorter batches share.
    options: PlanOptions,
    /// Rows B and positions T of the graph's batch (0 and 0 without an embedding).
    batch_shape: (usize, usize),
    /// Positions of the batch that the next step runs on: T, or fewer with
    /// [`Session::allow_shorter_batches`].
    seq_len: usize,
    shorter: Option<ShorterBatches<'g>>,
}

/// The forward and backward dispatches of a step over fewer positions than the graph's,
/// bound to the session's buffers (see [`Session::allow_shorter_batches`]).
struct ShortPass {
    dispatches: Vec<Dispatch>,
    /// `dispatches[..forward]` is the forward pass.
    forward: usize,
}

/// The graph builder and passes of a session that runs batches of fewer positions than its
/// graph's.
struct ShorterBatches<'g> {
    /// Builds the session's graph for a number of positions.
    build: Box<dyn Fn(usize) -> Graph + 'g>,
    /// Batches run on a multiple of this many positions.
    multiple: usize,
    /// The passes built so far, by positions.
    passes: HashMap<usize, ShortPass>,
}

/// Optimizer steps the step log holds; when it is full, every row settles what it owes and the
/// log starts again.
/// NOTE: that settle applies up to this many steps to every row in one dispatch: a product per
/// value and step for rows without moments, and also a square root and two divisions for rows
/// with moments. Not measured for the moments; by estimate seconds on lavapipe, once per 1,024 steps.
const STEP_LOG_STEPS: u32 = 1024;

/// The host copy of one table's row lists (see [`RowFlags`](super::plan::RowFlags)): the rows
/// that the current optimizer step's batches give a gradient, which the host lists and uploads
/// before each micro-batch, and the steps that the other rows still owe.
struct TouchedRows {
    /// Model weight whose table (or row chunk) the flags cover.
    weight: String,
    /// The table's parameter tensor.
    param: TensorId,
    /// Its AdamW moments, m and v.
    moments: [TensorId; 2],
    /// Device list of the rows of the current optimizer step.
    flags: TensorId,
    row_len: usize,
    /// Row of the whole weight that `host[0]` corresponds to.
    row_offset: usize,
    /// Per row, [`LISTED`] and [`MOMENTS`] bits.
    host: Vec<u8>,
    /// The rows of the current optimizer step, in the order they were listed.
    listed_rows: Vec<u32>,
    /// Rows of `listed_rows` that the device list already holds.
    uploaded_rows: usize,
    /// The count in the device list, `None` when the next upload must write the list whatever
    /// its length: before the first upload, and after each step, whose rows stay in the device
    /// list until the next upload replaces them.
    device_count: Option<usize>,
    /// Workgroup counts of the AdamW and norm dispatches over the listed rows.
    adamw_counts: wgpu::Buffer,
    norm_counts: wgpu::Buffer,
    /// The gradient norm's partial sums and the index of this table's first one, one per row,
    /// when the session computes the norm. Only the listed rows' sums are written, so the others
    /// must be +0, and each step starts by zeroing the table's range.
    norm_partials: Option<(TensorId, usize)>,
    /// Per row, the first logged step that the row still owes; it is up to date when this
    /// equals the session's `logged_steps`.
    owed_from: Vec<u32>,
    /// Rows (and their first owed step) for `settle` to update, and its workgroup counts.
    list: wgpu::Buffer,
    settle_counts: wgpu::Buffer,
    /// Applies the steps that the rows in `list` owe.
    settle: Dispatch,
}

/// Row bit of [`TouchedRows::host`]: listed for the current optimizer step.
const LISTED: u8 = 1;
/// Row bit of [`TouchedRows::host`]: the moments may be nonzero (the row had a gradient).
const MOMENTS: u8 = 2;

impl TouchedRows {
    /// Lists the rows (numbered in the whole weight) that fall in this table for the current
    /// optimizer step. They must be up to date: AdamW updates listed rows in full.
    fn list_rows(&mut self, rows: impl Iterator<Item = usize>) {
        for row in rows {
            let Some(r) = row.checked_sub(self.row_offset).filter(|&r| r < self.host.len()) else { continue };
            if self.host[r] & LISTED != 0 {
                continue;
            }
            self.host[r] |= LISTED | MOMENTS;
            self.listed_rows.push(r as u32);
        }
    }

    /// Ends the optimizer step of the listed rows, which AdamW brought up to date through logged
    /// step `end - 1`: from now on they owe the steps from `end` on, like the others.
    fn end_step(&mut self, end: u32) {
        for &r in &self.listed_rows {
            self.host[r as usize] &= !LISTED;
            self.owed_from[r as usize] = end;
        }
        self.listed_rows.clear();
        self.uploaded_rows = 0;
        // The next upload rewrites the list even if the next step lists as many rows.
        self.device_count = None;
    }

    /// Returns the rows `r` that owe logged steps before `end` (whose `owed_from[r]` is below
    /// it), and counts them as up to date from now on.
    fn take_owed(&mut self, end: u32, rows: impl Iterator<Item = usize>) -> Vec<deferred_update::Owed> {
        let mut owed = Vec::new();
        for r in rows {
            if self.owed_from[r] < end {
                owed.push(deferred_update::Owed { row: r as u32, from: self.owed_from[r], moments: self.host[r] & MOMENTS != 0 });
                self.owed_from[r] = end;
            }
        }
        owed
    }

    /// Writes the list of rows that owe logged steps before `end`, and the workgroup counts of
    /// `settle` over them.
    fn write_owed(&self, gpu: &Gpu, end: u32, rows: &[deferred_update::Owed]) {
        gpu.write(&self.list, 0, &deferred_update::list(end, rows));
        gpu.write(&self.settle_counts, 0, &deferred_update::rows_workgroups(gpu, rows.len(), self.row_len));
    }

    /// Uploads the rows listed since the last upload, and the workgroup counts of the
    /// dispatches over the listed rows.
    fn upload(&mut self, gpu: &Gpu, dedicated: &HashMap<TensorId, wgpu::Buffer>) {
        let listed = self.listed_rows.len();
        if self.device_count == Some(listed) {
            return;
        }
        let flags = &dedicated[&self.flags];
        gpu.write(flags, 0, &[listed as u32]);
        if self.uploaded_rows < listed {
            gpu.write(flags, 4 * (1 + self.uploaded_rows as u64), &self.listed_rows[self.uploaded_rows..]);
        }
        gpu.write(&self.adamw_counts, 0, &adamw::rows_workgroups(gpu, listed, self.row_len));
        gpu.write(&self.norm_counts, 0, &norm::rows_workgroups(gpu, listed));
        self.uploaded_rows = listed;
        self.device_count = Some(listed);
    }
}

/// A buffer on the device that each training step copies its loss and position count into, so
/// that the host reads many steps' losses in one transfer instead of waiting for every step.
struct LossLog {
    buffer: wgpu::Buffer,
    /// Steps the buffer has room for.
    capacity: usize,
    /// Steps copied since the last [`Session::drain_losses`].
    filled: usize,
}

/// Bytes of one step's entry in the loss log: the loss and the count of positions.
const LOSS_ENTRY_BYTES: u64 = 8;

impl<'g> Session<'g> {
    /// Plans `graph`, checks it against the adapter's limits, allocates every buffer, uploads
    /// the parameters from `weights` and creates every dispatch.
    pub(crate) fn new(
        gpu: &'g Gpu,
        graph: super::ir::Graph,
        weights: &Weights,
        train: bool,
        settings: OptimizerSettings,
    ) -> Result<Session<'g>, GpuError> {
        // The row lists size their dispatches indirectly; without that, every table gets the
        // dense update.
        Session::with_row_flags(gpu, graph, weights, train, settings, gpu.indirect_dispatch())
    }

    /// [`Session::new`], with `row_flags` false giving every table the dense optimizer update.
    pub(crate) fn with_row_flags(
        gpu: &'g Gpu,
        graph: super::ir::Graph,
        weights: &Weights,
        train: bool,
        settings: OptimizerSettings,
        row_flags: bool,
    ) -> Result<Session<'g>, GpuError> {
        let clip = settings.clip_grad_norm.is_some() || settings.skip_nonfinite;
        let options = PlanOptions { train, clip, row_flags };
        let plan = Plan::new(graph, options);
        check_limits(gpu, &plan)?;
        let batch_shape = plan
            .kernels
            .iter()
            .find_map(|kernel| match kernel {
                Kernel::Forward(Op::Embedding { batch, seq_len, .. }) => Some((*batch, *seq_len)),
                _ => None,
            })
            .unwrap_or((0, 0));
        let peak_bytes = plan.summary().peak_bytes;
        let mut dedicated = HashMap::new();
        let mut by_name = HashMap::new();
        for (id, t) in plan.graph.tensors.iter().enumerate() {
            by_name.insert(t.name.clone(), id);
            if plan.storage[id] == Storage::Dedicated {
                dedicated.insert(id, gpu.storage_buffer(&t.name, t.bytes())?);
            }
        }
        let pool = plan
            .pool_sizes
            .iter()
            .enumerate()
            .map(|(i, &bytes)| gpu.storage_buffer(&format!("activation pool {i}"), bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let step_buffer = gpu.storage_buffer("adamw step", std::mem::size_of::<adamw::AdamWStep>() as u64)?;
        let mut session = Session {
            gpu,
            plan,
            dedicated,
            pool,
            dispatches: Vec::new(),
            forward_dispatches: 0,
            backward_dispatches: 0,
            train_skip: 0..0,
            step_buffer,
            settings,
            optimizer_steps: 0,
            by_name,
            dropout_seed: 0,
            micro_batches: 0,
            nf4_means: HashMap::new(),
            loss_log: None,
            touched_rows: RefCell::new(Vec::new()),
            batch_tokens: RefCell::new(Vec::new()),
            step_log: None,
            logged_steps: Cell::new(0),
            step_log_steps: STEP_LOG_STEPS,
            options,
            batch_shape,
            seq_len: batch_shape.1,
            shorter: None,
        };
        session.touched_rows = RefCell::new(session.row_flag_tables()?);
        session.upload_weights(weights)?;
        session.build_dispatches()?;
        // The counts of the recorded dispatches, which depend on the kernels chosen for this
        // adapter (the plan's summary counts attention's tile kernels).
        let (forward, backward) = (session.forward_dispatches, session.backward_dispatches);
        log::info!(
            "plan: {forward} forward + {backward} backward + {} optimizer dispatches, {:.1} MiB peak",
            session.dispatches.len() - forward - backward,
            peak_bytes as f64 / (1 << 20) as f64
        );
        Ok(session)
    }

    fn binding(&self, t: TensorId) -> TensorBinding<'_> {
        let bytes = self.plan.graph.tensors[t].bytes();
        let buffer = match self.plan.storage[t] {
            Storage::Dedicated => &self.dedicated[&t],
            Storage::Pool(b) => &self.pool[b],
            Storage::Unused => panic!("tensor `{}` is bound but the plan never uses it", self.plan.graph.tensors[t].name),
        };
        TensorBinding { buffer, offset: 0, size: bytes.max(4) }
    }

    /// Parameters, gradients and counts of the plan.
    pub fn summary(&self) -> super::PlanSummary {
        self.plan.summary()
    }

    fn upload_weights(&mut self, weights: &Weights) -> Result<(), GpuError> {
        let mut quantized: HashMap<String, nf4::Nf4Matrix> = HashMap::new();
        for source in &self.plan.graph.params {
            let Some(buffer) = self.dedicated.get(&source.tensor) else { continue };
            let host = weights.get(&source.name).unwrap_or_else(|| {
                panic!("weight `{}` missing after loading; the loader checks every expected name", source.name)
            });
            if source.encoding == ParamEncoding::F16 {
                let (rows, cols) = (host.shape[0], host.shape[1..].iter().product());
                let packed = f16_weights::pack(&host.data, rows, cols)
                    .map_err(|e| GpuError::WeightEncoding { name: source.name.clone(), encoding: "f16".into(), message: e.to_string() })?;
                self.gpu.write(buffer, 0, &packed);
                continue;
            }
            if source.encoding != ParamEncoding::Plain {
                if !quantized.contains_key(&source.name) {
                    let (rows, cols) = (host.shape[0], host.shape[1..].iter().product());
                    let double_quant = self.plan.graph.params.iter().any(|p| p.name == source.name && p.encoding == ParamEncoding::Nf4ScaleCodes);
                    let matrix = nf4::quantize(&host.data, rows, cols, double_quant)
                        .map_err(|e| GpuError::WeightEncoding { name: source.name.clone(), encoding: "NF4".into(), message: e.to_string() })?;
                    quantized.insert(source.name.clone(), matrix);
                }
                let matrix = &quantized[&source.name];
                match (source.encoding, &matrix.scales) {
                    (ParamEncoding::Nf4Codes, scales) => {
                        self.gpu.write(buffer, 0, &matrix.packed);
                        if let nf4::Nf4Scales::Double(double) = scales {
                            self.nf4_means.insert(source.tensor, double.mean);
                        }
                    }
                    (ParamEncoding::Nf4Scales, nf4::Nf4Scales::Full(scales)) => self.gpu.write(buffer, 0, scales),
                    (ParamEncoding::Nf4ScaleCodes, nf4::Nf4Scales::Double(double)) => self.gpu.write(buffer, 0, &double.packed_codes()),
                    (ParamEncoding::Nf4ScaleSteps, nf4::Nf4Scales::Double(double)) => self.gpu.write(buffer, 0, &double.steps),
                    (encoding, _) => unreachable!("{encoding:?} of `{}` with double-quantised scales", source.name),
                }
                continue;
            }
            let row_len: usize = host.shape[1..].iter().product::<usize>().max(1);
            let start = source.row_offset * row_len;
            let end = start + source.rows * row_len;
            self.gpu.write(buffer, 0, &host.data[start..end]);
        }
        Ok(())
    }

    /// Reads every trainable parameter back into host weights, joining row chunks. Frozen
    /// parameters never change, so `into`, which starts as the weights the session was created
    /// from, already contains them.
    pub fn download_weights(&self, into: &mut Weights) -> Result<(), GpuError> {
        self.settle_all_rows()?;
        for source in &self.plan.graph.params {
            if !self.plan.graph.is_trainable(source.tensor) {
                continue;
            }
            let Some(buffer) = self.dedicated.get(&source.tensor) else { continue };
            let len = self.plan.graph.tensors[source.tensor].len();
            let values: Vec<f32> = self.gpu.read(buffer, 0, len)?;
            let host: &mut HostTensor = into.get_mut(&source.name).unwrap_or_else(|| {
                panic!("weight `{}` missing from the host copy the session was created from", source.name)
            });
            let row_len: usize = host.shape[1..].iter().product::<usize>().max(1);
            let start = source.row_offset * row_len;
            host.data[start..start + len].copy_from_slice(&values);
        }
        Ok(())
    }

    /// Names of the tensors that hold model weight `name`: one, or one per row chunk.
    #[cfg(test)]
    pub(crate) fn plan_param_names(&self, name: &str) -> Vec<String> {
        self.plan
            .graph
            .params
            .iter()
            .filter(|p| p.name == name)
            .map(|p| self.plan.graph.tensors[p.tensor].name.clone())
            .collect()
    }

    /// Chunks of model weight `name` that have a `{chunk}{suffix}` buffer, with that buffer's id
    /// and the chunk's first element in the whole weight.
    fn state_chunks(&self, name: &str, suffix: &str) -> Vec<(TensorId, usize)> {
        let mut chunks = Vec::new();
        for source in self.plan.graph.params.iter().filter(|p| p.name == name) {
            let tensor = &self.plan.graph.tensors[source.tensor];
            let row_len: usize = tensor.shape[1..].iter().product::<usize>().max(1);
            let Some(&id) = self.by_name.get(&format!("{}{suffix}", tensor.name)) else { continue };
            if self.plan.storage[id] == Storage::Dedicated {
                chunks.push((id, source.row_offset * row_len));
            }
        }
        chunks
    }

    /// Reads the state `suffix` of model weight `name`, joining its row chunks: `.grad` for its
    /// gradient, `.adam_m` and `.adam_v` for its AdamW moments, `` for the weight itself. `None`
    /// when the plan has no such buffer (a frozen weight, or a forward-only session).
    pub fn read_param_state(&self, name: &str, suffix: &str, numel: usize) -> Result<Option<Vec<f32>>, GpuError> {
        let chunks = self.state_chunks(name, suffix);
        if chunks.is_empty() {
            return Ok(None);
        }
        if suffix != ".grad" && self.has_row_table(name) {
            // The rows that owe steps contain stale values and moments.
            self.settle_all_rows()?;
        }
        let mut whole = vec![0.0f32; numel];
        for (id, start) in chunks {
            let len = self.plan.graph.tensors[id].len();
            let values: Vec<f32> = self.gpu.read(&self.dedicated[&id], 0, len)?;
            whole[start..start + len].copy_from_slice(&values);
        }
        Ok(Some(whole))
    }

    /// Writes the state `suffix` of model weight `name` (see [`Session::read_param_state`]) from
    /// `whole`, split into its row chunks. Returns false when the plan has no such buffer.
    pub fn write_param_state(&self, name: &str, suffix: &str, whole: &[f32]) -> Result<bool, GpuError> {
        if self.has_row_table(name) {
            // Rows about to be overwritten must not keep owing steps: afterwards no row owes any.
            self.settle_all_rows()?;
        }
        let chunks = self.state_chunks(name, suffix);
        for &(id, start) in &chunks {
            let len = self.plan.graph.tensors[id].len();
            self.gpu.write(&self.dedicated[&id], 0, &whole[start..start + len]);
        }
        if suffix == ".adam_m" || suffix == ".adam_v" {
            // Rows with nonzero moments owe moment updates, not just weight decay, from now on.
            for table in self.touched_rows.borrow_mut().iter_mut().filter(|t| t.weight == name) {
                let first = table.row_offset * table.row_len;
                let rows = whole[first..first + table.host.len() * table.row_len].chunks(table.row_len);
                for (r, row) in rows.enumerate() {
                    if row.iter().any(|&x| x != 0.0) {
                        table.host[r] |= MOMENTS;
                    }
                }
            }
        }
        Ok(!chunks.is_empty())
    }

    /// Returns whether model weight `name` has a table whose rows may owe steps.
    fn has_row_table(&self, name: &str) -> bool {
        self.touched_rows.borrow().iter().any(|table| table.weight == name)
    }

    /// Lets the step log hold only `steps` steps (at most [`STEP_LOG_STEPS`]), so that tests
    /// reach the point where it fills.
    #[cfg(test)]
    pub(crate) fn set_step_log_steps(&mut self, steps: u32) {
        self.step_log_steps = steps.min(STEP_LOG_STEPS);
    }

    /// Sets the seed from which every training micro-batch derives its dropout mask.
    pub fn set_dropout_seed(&mut self, seed: u64) {
        self.dropout_seed = seed;
    }

    /// Sets the count of optimizer steps submitted, and of the updates applied, which AdamW's
    /// bias correction uses. They differ by the steps skipped for a NaN or infinite gradient. A
    /// resumed run restores both from its checkpoint.
    pub fn set_optimizer_steps(&mut self, submitted: u64, applied: u64) {
        self.optimizer_steps = submitted;
        if self.plan.norm.is_some() {
            self.gpu.write(&self.step_buffer, adamw::STEPS_OFFSET, &[u32::try_from(applied).unwrap_or(u32::MAX)]);
        }
    }

    /// Returns the count of updates applied, t of the last one: the optimizer steps submitted
    /// less those skipped for a NaN or infinite gradient. Waits for the submitted steps when the
    /// device counts them.
    pub fn applied_optimizer_steps(&self) -> Result<u64, GpuError> {
        if self.plan.norm.is_none() {
            return Ok(self.optimizer_steps);
        }
        let words: Vec<u32> = self.gpu.read(&self.step_buffer, (adamw::STEPS_OFFSET / 4) as usize, 1)?;
        Ok(u64::from(words[0]))
    }

    /// Reads a tensor by name (an output, a parameter or a parameter gradient). Reading a table
    /// or moments whose rows owe steps first applies all of them (a pass over the table).
    pub fn read_tensor(&self, name: &str) -> Result<Option<Vec<f32>>, GpuError> {
        let Some(&id) = self.by_name.get(name) else { return Ok(None) };
        if self.plan.storage[id] != Storage::Dedicated {
            return Ok(None);
        }
        if self.touched_rows.borrow().iter().any(|table| table.param == id || table.moments.contains(&id)) {
            self.settle_all_rows()?;
        }
        let len = self.plan.graph.tensors[id].len();
        Ok(Some(self.gpu.read(&self.dedicated[&id], 0, len)?))
    }

    fn input(&self, name: &str) -> Option<&wgpu::Buffer> {
        let id = *self.by_name.get(name)?;
        self.dedicated.get(&id)
    }

    /// Writes one batch into the input buffers. After [`Session::allow_shorter_batches`], use
    /// [`Session::set_batch`], which also chooses the positions that the step runs on.
    pub fn set_inputs(&self, inputs: &StepInputs<'_>) {
        if self.shorter.is_some() {
            let (rows, _) = self.batch_shape;
            assert_eq!(inputs.ids.len(), rows * self.seq_len, "token ids for {rows} rows of {} positions", self.seq_len);
        }
        let ids = self.input("ids").expect("every graph has token ids");
        self.gpu.write(ids, 0, inputs.ids);
        if let Some(buffer) = self.input("lengths") {
            self.gpu.write(buffer, 0, inputs.lengths);
        }
        let targets = self.input("targets").expect("every graph has targets");
        self.gpu.write(targets, 0, inputs.targets);
        if let (Some(order), Some(segments)) = (self.input("token_order"), self.input("token_segments")) {
            let s = embedding::token_segments(inputs.ids);
            self.gpu.write(order, 0, &s.order);
            self.gpu.write(segments, 0, &s.segments);
            if !self.touched_rows.borrow().is_empty() {
                // segments: the number of distinct ids, then (id, start, end) for each.
                let distinct = s.segments[0] as usize;
                *self.batch_tokens.borrow_mut() = (0..distinct).map(|k| s.segments[1 + 3 * k]).collect();
            }
        }
    }

    /// Creates the host copies of the plan's row lists, every row up to date and with zero
    /// moments, and the step log and dispatches that settle what the rows owe.
    fn row_flag_tables(&mut self) -> Result<Vec<TouchedRows>, GpuError> {
        let rows: Vec<(TensorId, usize, [TensorId; 2], super::plan::RowFlags)> = self
            .plan
            .kernels
            .iter()
            .filter_map(|kernel| match kernel {
                Kernel::AdamW { param, len, m, v, rows: Some(rows), .. } => Some((*param, *len, [*m, *v], *rows)),
                _ => None,
            })
            .collect();
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let log = self.gpu.storage_buffer("step log", u64::from(STEP_LOG_STEPS) * deferred_update::STEP_BYTES)?;
        let s = &self.settings;
        let constants = deferred_update::Constants { weight_decay: s.weight_decay, max_norm: s.max_norm(), beta1: s.beta1, beta2: s.beta2, eps: s.eps };
        let mut tables = Vec::new();
        for (param, len, [m, v], flags) in rows {
            let source = self.plan.graph.params.iter().find(|p| p.tensor == param).expect("every trained tensor is a model weight");
            let count = len / flags.row_len;
            let name = self.name(param).to_string();
            let list = self.gpu.storage_buffer(&format!("{name} owed rows"), (deferred_update::list_len(count) * 4) as u64)?;
            let settle_counts = self.gpu.indirect_buffer(&format!("{name} deferred update workgroups"));
            let label = format!("deferred update {name}");
            let state = [self.binding(param), self.binding(m), self.binding(v)];
            let settle = deferred_update::settle_rows(self.gpu, &label, len, flags.row_len, constants, count, (&log).into(), (&list).into(), state, &settle_counts)?;
            let norm_partials = self.plan.kernels.iter().find_map(|kernel| match kernel {
                Kernel::NormPartials { partials, offset, rows: Some(RowNorm { listed: Some(listed), .. }), .. } if *listed == flags.flags => {
                    Some((*partials, *offset))
                }
                _ => None,
            });
            tables.push(TouchedRows {
                weight: source.name.clone(),
                param,
                moments: [m, v],
                flags: flags.flags,
                row_len: flags.row_len,
                row_offset: flags.row_offset,
                host: vec![0; count],
                listed_rows: Vec::new(),
                uploaded_rows: 0,
                device_count: None,
                adamw_counts: self.gpu.indirect_buffer(&format!("{name} adamw workgroups")),
                norm_counts: self.gpu.indirect_buffer(&format!("{name} norm workgroups")),
                norm_partials,
                owed_from: vec![0; count],
                list,
                settle_counts,
                settle,
            });
        }
        self.step_log = Some(log);
        Ok(tables)
    }

    /// Lists the rows of the tokens of the batch about to train for the current optimizer step
    /// and uploads the newly listed rows, before the micro-batch that gives those rows a
    /// gradient.
    fn flag_batch_rows(&self) {
        let tokens = self.batch_tokens.borrow();
        for table in self.touched_rows.borrow_mut().iter_mut() {
            table.list_rows(tokens.iter().map(|&id| id as usize));
            table.upload(self.gpu, &self.dedicated);
        }
    }

    /// Ends the optimizer step for every table's listed rows, which AdamW brought up to date.
    /// Also zeroes the tables' partial sums of the gradient norm. Callers do this before they
    /// submit the step, so the queue runs the write first. The step's norm kernel then writes
    /// its listed rows and finds +0 in every other row, the sum of their zero gradients.
    fn end_step_rows(&self) {
        let end = self.logged_steps.get();
        for table in self.touched_rows.borrow_mut().iter_mut() {
            if let Some((partials, first)) = table.norm_partials {
                let zeros = vec![0.0f32; table.host.len()];
                self.gpu.write(&self.dedicated[&partials], 4 * first as u64, &zeros);
            }
            table.end_step(end);
        }
    }

    /// Logs an optimizer step recorded into `encoder` for the rows whose update is deferred, then
    /// ends the step for the listed rows. Its learning rate is written now. Its gradient norm, and
    /// the bias corrections that the host did not compute, are copied when the step has run.
    /// Call before submitting the step.
    fn log_step(&self, encoder: &mut wgpu::CommandEncoder, lr: f32, bias_corrections: Option<[f32; 2]>) {
        let Some(log) = &self.step_log else { return };
        let at = u64::from(self.logged_steps.get()) * deferred_update::STEP_BYTES;
        self.gpu.write(log, at, &[lr]);
        let corrections_at = at + deferred_update::BIAS_CORRECTIONS_OFFSET;
        match bias_corrections {
            Some(values) => self.gpu.write(log, corrections_at, &values),
            None => encoder.copy_buffer_to_buffer(&self.step_buffer, adamw::BIAS_CORRECTIONS_OFFSET, log, corrections_at, 8),
        }
        if let Some(norm) = self.plan.norm {
            encoder.copy_buffer_to_buffer(&self.dedicated[&norm], 0, log, at + deferred_update::NORM_OFFSET, 4);
        }
        self.logged_steps.set(self.logged_steps.get() + 1);
        self.end_step_rows();
    }

    /// Writes the list of the batch's rows that owe logged steps, for each table, and returns
    /// the indices of the tables whose `settle` dispatch must run before the forward pass reads
    /// those rows. The host copy counts them as up to date from now on.
    fn owed_batch_rows(&self) -> Vec<usize> {
        let end = self.logged_steps.get();
        let tokens = self.batch_tokens.borrow();
        let mut owing = Vec::new();
        for (k, table) in self.touched_rows.borrow_mut().iter_mut().enumerate() {
            let (offset, count) = (table.row_offset, table.host.len());
            let rows = tokens.iter().filter_map(|&id| (id as usize).checked_sub(offset).filter(|&r| r < count));
            let owed = table.take_owed(end, rows);
            if !owed.is_empty() {
                table.write_owed(self.gpu, end, &owed);
                owing.push(k);
            }
        }
        owing
    }

    /// Applies every step that rows owe, then empties the step log: before the host reads a
    /// table or its moments, and when the log is full.
    fn settle_all_rows(&self) -> Result<(), GpuError> {
        let end = self.logged_steps.get();
        if end == 0 {
            return Ok(());
        }
        let mut tables = self.touched_rows.borrow_mut();
        let mut owing = Vec::new();
        for (k, table) in tables.iter_mut().enumerate() {
            let owed = table.take_owed(end, 0..table.host.len());
            if !owed.is_empty() {
                table.write_owed(self.gpu, end, &owed);
                owing.push(k);
            }
            table.owed_from.fill(0);
        }
        self.logged_steps.set(0);
        if owing.is_empty() {
            return Ok(());
        }
        let mut encoder = self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("deferred update") });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("deferred update"), timestamp_writes: None });
            for &k in &owing {
                tables[k].settle.record(&mut pass);
            }
        }
        self.gpu.queue.submit(Some(encoder.finish()));
        self.gpu.check_errors("deferred row updates")
    }

    /// Writes the AdamW values of the next optimizer step that the host owns, and returns the
    /// bias corrections that it wrote, if any. A session that computes the gradient norm counts
    /// the step on the device (see [`adamw::count_step`]), which writes t and the bias
    /// corrections, so that a skipped step does not advance t even before the host learns of
    /// it. Otherwise no step is skipped, and the host writes t, the submitted updates, with its
    /// corrections, or with `fixed_corrections`.
    fn write_step(&self, lr: f32, grad_scale: f32, fixed_corrections: Option<[f32; 2]>) -> Option<[f32; 2]> {
        let s = &self.settings;
        if self.plan.norm.is_some() {
            self.gpu.write(&self.step_buffer, 0, &[lr, s.beta1, s.beta2, s.eps]);
            self.gpu.write(&self.step_buffer, adamw::MAX_NORM_OFFSET, &[s.max_norm(), grad_scale]);
            return None;
        }
        let t = u32::try_from(self.optimizer_steps).unwrap_or(u32::MAX);
        let corrections = fixed_corrections.unwrap_or([adamw::bias_correction(s.beta1, t), adamw::bias_correction(s.beta2, t)]);
        let step = adamw::AdamWStep {
            lr,
            beta1: s.beta1,
            beta2: s.beta2,
            eps: s.eps,
            bias_correction1: corrections[0],
            bias_correction2: corrections[1],
            max_norm: s.max_norm(),
            grad_scale,
            steps: t,
            _pad: [0; 3],
        };
        self.gpu.write(&self.step_buffer, 0, &[step]);
        Some(corrections)
    }

    /// Records the forward pass, and with `train` the backward pass, into one command encoder
    /// and submits it. With `update`, the optimizer runs too with learning rate `lr`.
    pub fn submit(&mut self, train: bool, update: Option<f32>, grad_scale: f32) -> Result<(), GpuError> {
        if train {
            if let Some(error) = injected_fault(self.optimizer_steps) {
                return Err(error);
            }
        }
        if let Some(buffer) = self.input(crate::model::gpt2::DROPOUT_SEED) {
            // The mask depends only on the run seed, the optimizer step and the micro-batch
            // within it, so a resumed run draws the masks the uninterrupted run drew.
            let mixed = self.dropout_seed ^ self.optimizer_steps.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.micro_batches.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
            let folded = (mixed ^ (mixed >> 32)) as u32;
            self.gpu.write(buffer, 0, &[folded, u32::from(train)]);
        }
        // A step that runs the optimizer: with an update, the training dispatches run to the end.
        let optimizer = train && update.is_some();
        if optimizer && self.logged_steps.get() >= self.step_log_steps {
            self.settle_all_rows()?;
        }
        // Before the rows are listed: listed rows must be up to date.
        let owing = self.owed_batch_rows();
        if train {
            self.micro_batches = if update.is_some() { 0 } else { self.micro_batches + 1 };
            self.flag_batch_rows();
        }
        let end = if !train {
            self.forward_dispatches
        } else if update.is_some() {
            self.dispatches.len()
        } else {
            self.forward_dispatches + self.backward_dispatches
        };
        let mut bias_corrections = None;
        if let Some(lr) = update {
            self.optimizer_steps += 1;
            bias_corrections = self.write_step(lr, grad_scale, None);
        }
        let mut encoder = self
            .gpu
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("training step") });
        {
            let tables = self.touched_rows.borrow();
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("training step"),
                timestamp_writes: None,
            });
            for &k in &owing {
                tables[k].settle.record(&mut pass);
            }
            for dispatch in self.step_dispatches(train, end) {
                dispatch.record(&mut pass);
            }
        }
        if let (true, Some(lr)) = (optimizer, update) {
            self.log_step(&mut encoder, lr, bias_corrections);
        }
        if train {
            if let Some(log) = &mut self.loss_log {
                assert!(log.filled < log.capacity, "the loss log is full: call drain_losses every {} training steps", log.capacity);
                let id = self.by_name["loss"];
                let offset = log.filled as u64 * LOSS_ENTRY_BYTES;
                encoder.copy_buffer_to_buffer(&self.dedicated[&id], 0, &log.buffer, offset, LOSS_ENTRY_BYTES);
                log.filled += 1;
            }
        }
        self.gpu.queue.submit(Some(encoder.finish()));
        self.gpu.check_errors("training step")
    }

    /// Makes every training step copy its loss into a device buffer with room for `steps`
    /// steps, to be read with [`Session::drain_losses`] at least every `steps` training steps.
    /// Then the host need not wait for each step to finish before submitting the next.
    pub fn log_losses(&mut self, steps: usize) -> Result<(), GpuError> {
        let steps = steps.max(1);
        let buffer = self.gpu.storage_buffer("loss log", steps as u64 * LOSS_ENTRY_BYTES)?;
        self.loss_log = Some(LossLog { buffer, capacity: steps, filled: 0 });
        Ok(())
    }

    /// Returns the loss of every training step submitted since the last call, in order, and
    /// empties the log (waits for those steps). Empty when [`Session::log_losses`] was not called.
    pub fn drain_losses(&mut self) -> Result<Vec<StepOutputs>, GpuError> {
        let Some(log) = &mut self.loss_log else { return Ok(Vec::new()) };
        if log.filled == 0 {
            return Ok(Vec::new());
        }
        let values: Vec<f32> = self.gpu.read(&log.buffer, 0, 2 * log.filled)?;
        log.filled = 0;
        Ok(values.chunks(2).map(|pair| StepOutputs { loss: pair[0], counted: pair[1] }).collect())
    }

    /// Returns the number of training steps whose losses wait in the log.
    pub fn logged_losses(&self) -> usize {
        self.loss_log.as_ref().map_or(0, |log| log.filled)
    }

    /// Runs one step (forward, backward and an optimizer update with learning rate 0 when
    /// `train`) with every dispatch in its own timed compute pass, and returns each dispatch's
    /// label and GPU milliseconds. Needs TIMESTAMP_QUERY; returns `None` without it.
    pub fn profile(&mut self, train: bool) -> Result<Option<Vec<(String, f64)>>, GpuError> {
        if !self.gpu.features().contains(wgpu::Features::TIMESTAMP_QUERY) {
            return Ok(None);
        }
        let end = if train { self.dispatches.len() } else { self.forward_dispatches };
        // The profiled step runs AdamW with learning rate 0, which leaves the weights as they are
        // but decays the moments. It counts as an update where the device counts them, and has
        // bias corrections 1 elsewhere. It is logged like any step, so that the rows it does not
        // list owe that decay too. The rows it reads must be up to date.
        if train && self.logged_steps.get() >= self.step_log_steps {
            self.settle_all_rows()?;
        }
        let owing = self.owed_batch_rows();
        let mut bias_corrections = None;
        if train {
            self.flag_batch_rows();
            bias_corrections = self.write_step(0.0, 1.0, Some([1.0, 1.0]));
        }
        let tables = self.touched_rows.borrow();
        let chosen: Vec<&Dispatch> =
            owing.iter().map(|&k| &tables[k].settle).chain(self.step_dispatches(train, end)).collect();
        let count = (2 * chosen.len()) as u32;
        let query_set = self.gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("dispatch timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count,
        });
        let resolve = self.gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("dispatch timestamp resolve"),
            size: u64::from(count) * 8,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let mut encoder =
            self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("profiled step") });
        for (i, dispatch) in chosen.iter().enumerate() {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(&dispatch.label),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &query_set,
                    beginning_of_pass_write_index: Some(2 * i as u32),
                    end_of_pass_write_index: Some(2 * i as u32 + 1),
                }),
            });
            dispatch.record(&mut pass);
        }
        encoder.resolve_query_set(&query_set, 0..count, &resolve, 0);
        let labels: Vec<String> = chosen.iter().map(|d| d.label.clone()).collect();
        drop(chosen);
        drop(tables);
        if train {
            self.log_step(&mut encoder, 0.0, bias_corrections);
        }
        self.gpu.queue.submit(Some(encoder.finish()));
        let ticks: Vec<u64> = self.gpu.read(&resolve, 0, count as usize)?;
        let period_ns = f64::from(self.gpu.queue.get_timestamp_period());
        let timed = labels
            .into_iter()
            .enumerate()
            .map(|(i, label)| (label, ticks[2 * i + 1].saturating_sub(ticks[2 * i]) as f64 * period_ns / 1e6))
            .collect();
        Ok(Some(timed))
    }

    /// Returns the dispatches a step records, of the first `end` of the full list: all of them,
    /// except the forward LM loss in a training step. A batch of fewer positions than the
    /// graph's runs its own forward and backward dispatches and the shared optimizer ones.
    fn step_dispatches(&self, train: bool, end: usize) -> Vec<&Dispatch> {
        let short = self.shorter.as_ref().and_then(|s| s.passes.get(&self.seq_len));
        let Some(short) = short else {
            return (0..end).filter(|i| !(train && self.train_skip.contains(i))).map(|i| &self.dispatches[i]).collect();
        };
        let passes = self.forward_dispatches + self.backward_dispatches;
        let mut list: Vec<&Dispatch> = if end <= self.forward_dispatches { short.dispatches[..short.forward].iter().collect() } else { short.dispatches.iter().collect() };
        list.extend(&self.dispatches[passes.min(end)..end]);
        list
    }

    /// Lets [`Session::set_batch`] run a batch whose rows all end before the graph's T positions
    /// on positions `0..L` only, L being its longest row rounded up to a multiple of `multiple`.
    /// Attention is causal, so a position after the end of its row changes neither the pooled
    /// logits nor any gradient: the shorter step computes what the full one does, with less
    /// work, and only the order of some sums differs. `build(L)` must return the session's graph
    /// built for L positions. Its forward and backward dispatches bind the session's buffers,
    /// which were planned for T positions and are at least as large. The optimizer's dispatches
    /// do not depend on L, so the passes share them. LoRA dropout draws its mask per element of
    /// the (B*L, C) input, so with dropout a shorter step draws other masks than the full one
    /// would, from the same distribution.
    ///
    /// # Panics
    /// On a graph without a token embedding or with the fused language-model loss, whose row
    /// chunks depend on T.
    pub(crate) fn allow_shorter_batches(&mut self, multiple: usize, build: Box<dyn Fn(usize) -> Graph + 'g>) {
        assert!(self.batch_shape.1 > 0, "only a graph with a token embedding runs shorter batches");
        assert!(self.train_skip.is_empty(), "a graph with the fused language-model loss cannot run shorter batches");
        self.shorter = Some(ShorterBatches { build, multiple: multiple.max(1), passes: HashMap::new() });
    }

    /// Positions of the batch that the next step runs on.
    #[cfg(test)]
    pub(crate) fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Writes `batch`, whose shape must be the graph's, into the input buffers; after
    /// [`Session::allow_shorter_batches`], only the positions that its rows need.
    pub(crate) fn set_batch(&mut self, batch: &Batch) -> Result<(), GpuError> {
        let (rows, full) = self.batch_shape;
        assert_eq!(batch.batch_size, rows, "a batch of {} rows for a graph of {rows}", batch.batch_size);
        assert_eq!(batch.seq_len, full, "a batch of {} positions for a graph of {full}", batch.seq_len);
        let len = match &self.shorter {
            Some(s) => {
                let longest = batch.lengths.iter().copied().max().unwrap_or(1) as usize;
                (longest.div_ceil(s.multiple) * s.multiple).min(full)
            }
            None => full,
        };
        if len != full && !self.shorter.as_ref().is_some_and(|s| s.passes.contains_key(&len)) {
            let pass = self.short_pass(len)?;
            self.shorter.as_mut().expect("checked above").passes.insert(len, pass);
        }
        self.seq_len = len;
        let short;
        let batch = if len < full {
            short = batch.shortened(len);
            &short
        } else {
            batch
        };
        self.set_inputs(&StepInputs { ids: &batch.ids, lengths: &batch.lengths, targets: &batch.labels });
        Ok(())
    }

    /// Plans the session's graph for `len` positions and creates its forward and backward
    /// dispatches on the session's buffers.
    fn short_pass(&mut self, len: usize) -> Result<ShortPass, GpuError> {
        let shorter = self.shorter.as_ref().expect("shorter batches are allowed");
        let mut plan = Plan::new((shorter.build)(len), self.options);
        check_same_tensors(&self.plan, &plan, len);
        plan.storage = self.plan.storage.clone();
        plan.pool_sizes = self.plan.pool_sizes.clone();
        // `binding` and the kernel arguments read the shorter plan; the buffers stay the full one's.
        let full = std::mem::replace(&mut self.plan, plan);
        let mut dispatches = Vec::new();
        let mut forward = 0;
        let mut built = Ok(());
        for (i, kernel) in self.plan.kernels[..self.plan.backward_end].iter().enumerate() {
            if i == self.plan.forward_end {
                forward = dispatches.len();
            }
            built = self.kernel_dispatches(kernel, &mut dispatches);
            if built.is_err() {
                break;
            }
        }
        if self.plan.forward_end == self.plan.backward_end {
            forward = dispatches.len();
        }
        self.plan = full;
        built?;
        log::debug!("plan for {len} positions: {forward} forward + {} backward dispatches", dispatches.len() - forward);
        Ok(ShortPass { dispatches, forward })
    }

    /// Optimizer steps submitted so far, skipped ones included.
    pub fn optimizer_steps(&self) -> u64 {
        self.optimizer_steps
    }

    /// Reads the loss of the last submitted step (waits for it).
    pub fn read_loss(&self) -> Result<StepOutputs, GpuError> {
        let values = self.read_tensor("loss")?.expect("every graph has a loss output");
        Ok(StepOutputs { loss: values[0], counted: values[1] })
    }

    /// Reads the logits of the last submitted step (waits for it).
    ///
    /// # Panics
    /// On a graph with the chunked language-model loss, which never keeps whole logits.
    pub fn read_logits(&self) -> Result<Vec<f32>, GpuError> {
        Ok(self.read_tensor("logits")?.expect("only graphs with a logits output are read for logits"))
    }

    fn build_dispatches(&mut self) -> Result<(), GpuError> {
        let mut dispatches = Vec::new();
        let mut forward = 0;
        let mut backward = 0;
        let fused = self.plan.kernels.iter().any(|k| matches!(k, Kernel::LmLossFused { .. }));
        let mut train_skip = 0..0;
        for (i, kernel) in self.plan.kernels.iter().enumerate() {
            let before = dispatches.len();
            self.kernel_dispatches(kernel, &mut dispatches)?;
            if fused && matches!(kernel, Kernel::Forward(Op::LmLoss { .. })) {
                train_skip = before..dispatches.len();
            }
            if i < self.plan.forward_end {
                forward += dispatches.len() - before;
            } else if i < self.plan.backward_end {
                backward += dispatches.len() - before;
            }
        }
        self.dispatches = dispatches;
        self.forward_dispatches = forward;
        self.backward_dispatches = backward;
        self.train_skip = train_skip;
        Ok(())
    }

    /// Records, for rows `start..start + row_chunk` (or fewer at the end), the logits of every
    /// vocabulary chunk into its block of `logits` and their fold into the rows' statistics.
    fn lm_logits_and_loss(&self, lm: &LmLossBindings, wte: &[super::ir::RowChunk], start: usize, out: &mut Vec<Dispatch>) -> Result<(), GpuError> {
        let n = lm.rows_from(start);
        let inp = lm.rows_of(self, lm.inp, start, n, lm.channels);
        let [targets, stats, losses] = lm.loss_rows(self, start, n);
        for chunk in wte {
            let name = self.name(chunk.tensor);
            let (shape, c) = lm.chunk_shapes(chunk, n);
            let block = lm.logits_block(self, chunk, n);
            out.push(matmul::forward(self.gpu, &format!("lm logits {name}"), shape, inp, self.binding(chunk.tensor), None, block)?);
            out.push(lmloss::chunk_forward(self.gpu, &format!("lm loss {name}"), c, block, targets, stats, losses)?);
        }
        Ok(())
    }

    fn name(&self, t: TensorId) -> &str {
        &self.plan.graph.tensors[t].name
    }

    /// Returns the bindings of an NF4 weight (K, N), with the mean recorded when its scales were
    /// uploaded.
    fn nf4_weight(&self, rows: usize, cols: usize, codes: TensorId, scales: TensorId, steps: Option<TensorId>) -> nf4::Nf4Weight<'_> {
        let double_quant = steps.map(|steps| nf4::DoubleQuantBinding { steps: self.binding(steps), mean: self.nf4_means.get(&codes).copied().unwrap_or(0.0) });
        nf4::Nf4Weight { rows, cols, packed: self.binding(codes), scales: self.binding(scales), double_quant }
    }

    fn kernel_dispatches(&self, kernel: &Kernel, out: &mut Vec<Dispatch>) -> Result<(), GpuError> {
        let gpu = self.gpu;
        let b = |t: TensorId| self.binding(t);
        match kernel {
            Kernel::Forward(op) => match op {
                Op::Embedding { batch, seq_len, channels, ids, wte, wpe, out: o } => {
                    for chunk in wte {
                        out.push(embedding::forward(
                            gpu,
                            &format!("embedding {}", self.name(chunk.tensor)),
                            *batch,
                            *seq_len,
                            *channels,
                            b(*ids),
                            b(chunk.tensor),
                            chunk.row_offset,
                            chunk.rows,
                            b(*wpe),
                            b(*o),
                        )?);
                    }
                }
                Op::LayerNorm { rows, channels, eps, inp, weight, bias, out: o, mean, rstd } => {
                    out.push(layernorm::forward(
                        gpu,
                        &format!("layernorm {}", self.name(*o)),
                        *rows,
                        *channels,
                        *eps,
                        b(*inp),
                        b(*weight),
                        b(*bias),
                        b(*o),
                        b(*mean),
                        b(*rstd),
                    )?);
                }
                Op::Matmul { rows, inner, cols, layout, inp, weight, bias, out: o } => {
                    for chunk in weight {
                        let shape = chunk_shape(*rows, *inner, *cols, *layout, weight, chunk);
                        out.push(matmul::forward(
                            gpu,
                            &format!("matmul {}", self.name(chunk.tensor)),
                            shape,
                            b(*inp),
                            b(chunk.tensor),
                            bias.map(b),
                            b(*o),
                        )?);
                    }
                }
                Op::MatmulNf4 { rows, inner, cols, inp, codes, scales, steps, bias, out: o } => {
                    let shape = MatmulShape::new(*rows, *inner, *cols, WeightLayout::InOut);
                    let weight = self.nf4_weight(*inner, *cols, *codes, *scales, *steps);
                    out.push(nf4::forward(gpu, &format!("matmul nf4 {}", self.name(*codes)), shape, b(*inp), weight, bias.map(b), b(*o))?);
                }
                Op::MatmulF16 { rows, inner, cols, inp, packed, bias, out: o } => {
                    let shape = MatmulShape::new(*rows, *inner, *cols, WeightLayout::InOut);
                    let weight = f16_weights::F16Weight { rows: *inner, cols: *cols, packed: self.binding(*packed) };
                    out.push(f16_weights::forward(gpu, &format!("matmul f16 {}", self.name(*packed)), shape, b(*inp), weight, bias.map(b), b(*o))?);
                }
                Op::Gelu { len, inp, out: o } => {
                    out.push(gelu::forward(gpu, &format!("gelu {}", self.name(*o)), *len, b(*inp), b(*o))?);
                }
                Op::Add { len, a, b: bb, scale, out: o } => {
                    out.push(residual::forward(gpu, &format!("residual {}", self.name(*o)), *len, *scale, b(*a), b(*bb), b(*o))?);
                }
                Op::Dropout { len, prob, seed, salt, inp, out: o } => {
                    out.push(dropout::forward(gpu, &format!("dropout {}", self.name(*o)), *len, *prob, *salt, b(*seed), b(*inp), b(*o))?);
                }
                Op::Attention { shape, qkv, att, out: o } => {
                    out.extend(attention::forward(gpu, &format!("attention {}", self.name(*o)), *shape, b(*qkv), b(*att), b(*o))?);
                }
                Op::PoolLast { batch, seq_len, channels, hidden, lengths, pooled } => {
                    out.push(pooling::forward(gpu, "pool last token", *batch, *seq_len, *channels, b(*hidden), b(*lengths), b(*pooled))?);
                }
                Op::CrossEntropy { rows, classes, logits, targets, losses, loss } => {
                    out.push(crossentropy::forward(gpu, "cross-entropy", *rows, *classes, b(*logits), b(*targets), b(*losses))?);
                    out.push(crossentropy::mean(gpu, "cross-entropy mean", *rows, b(*losses), b(*targets), b(*loss))?);
                }
                Op::LmLoss { rows, channels, vocab, row_chunk, inp, wte, targets, logits, stats, losses, loss } => {
                    let lm = LmLossBindings { rows: *rows, channels: *channels, vocab: *vocab, row_chunk: *row_chunk, inp: *inp, targets: *targets, logits: *logits, stats: *stats, losses: *losses };
                    for start in (0..*rows).step_by(*row_chunk) {
                        self.lm_logits_and_loss(&lm, wte, start, out)?;
                    }
                    out.push(crossentropy::mean(gpu, "lm loss mean", *rows, b(*losses), b(*targets), b(*loss))?);
                }
            },
            Kernel::LmLossFused { rows, channels, vocab, row_chunk, inp, wte, targets, logits, stats, losses, loss, dinp, dwte } => {
                let lm = LmLossBindings { rows: *rows, channels: *channels, vocab: *vocab, row_chunk: *row_chunk, inp: *inp, targets: *targets, logits: *logits, stats: *stats, losses: *losses };
                // The gradient divides by the number of counted rows, which depends only on the
                // targets: the mean kernel writes it now (with a mean of stale losses that the
                // last dispatch replaces).
                out.push(crossentropy::mean(gpu, "lm loss count", *rows, b(*losses), b(*targets), b(*loss))?);
                for start in (0..*rows).step_by(*row_chunk) {
                    self.lm_logits_and_loss(&lm, wte, start, out)?;
                    let n = lm.rows_from(start);
                    let [target_rows, stat_rows, loss_rows] = lm.loss_rows(self, start, n);
                    for (i, chunk) in wte.iter().enumerate() {
                        let name = self.name(chunk.tensor);
                        let (shape, c) = lm.chunk_shapes(chunk, n);
                        let block = lm.logits_block(self, chunk, n);
                        out.push(lmloss::chunk_backward(gpu, &format!("lm loss grad {name}"), c, block, target_rows, stat_rows, loss_rows, b(*loss))?);
                        if let Some((dinp, accumulate)) = dinp {
                            out.push(matmul::backward_input(
                                gpu,
                                &format!("matmul input grad {}", self.name(*dinp)),
                                shape,
                                block,
                                b(chunk.tensor),
                                lm.rows_of(self, *dinp, start, n, *channels),
                                *accumulate || i > 0,
                            )?);
                        }
                        if let Some(dweight) = dwte[i] {
                            out.push(matmul::backward_weight(
                                gpu,
                                &format!("matmul weight grad {}", self.name(dweight)),
                                shape,
                                lm.rows_of(self, *inp, start, n, *channels),
                                block,
                                b(dweight),
                            )?);
                        }
                    }
                }
                out.push(crossentropy::mean(gpu, "lm loss mean", *rows, b(*losses), b(*targets), b(*loss))?);
            }
            Kernel::XentBackward { rows, classes, logits, targets, loss, dlogits } => {
                out.push(crossentropy::backward(gpu, "cross-entropy backward", *rows, *classes, b(*logits), b(*targets), b(*loss), b(*dlogits))?);
            }
            Kernel::PoolBackward { batch, seq_len, channels, dpooled, lengths, dhidden, accumulate } => {
                out.push(pooling::backward(gpu, "pool backward", *batch, *seq_len, *channels, b(*dpooled), b(*lengths), b(*dhidden), *accumulate)?);
            }
            Kernel::MatmulInput { shape, dout, weight, dinp, accumulate } => {
                out.push(matmul::backward_input(gpu, &format!("matmul input grad {}", self.name(*dinp)), *shape, b(*dout), b(*weight), b(*dinp), *accumulate)?);
            }
            Kernel::MatmulWeight { shape, inp, dout, dweight } => {
                out.push(matmul::backward_weight(gpu, &format!("matmul weight grad {}", self.name(*dweight)), *shape, b(*inp), b(*dout), b(*dweight))?);
            }
            Kernel::MatmulBias { shape, dout, dbias } => {
                out.push(matmul::backward_bias(gpu, &format!("matmul bias grad {}", self.name(*dbias)), *shape, b(*dout), b(*dbias))?);
            }
            Kernel::GeluBackward { len, inp, dout, dinp, accumulate } => {
                out.push(gelu::backward(gpu, &format!("gelu backward {}", self.name(*dinp)), *len, b(*inp), b(*dout), b(*dinp), *accumulate)?);
            }
            Kernel::LayerNormInput { rows, channels, dout, inp, weight, mean, rstd, dinp, accumulate } => {
                out.push(layernorm::backward_input(
                    gpu,
                    &format!("layernorm input grad {}", self.name(*dinp)),
                    *rows,
                    *channels,
                    b(*dout),
                    b(*inp),
                    b(*weight),
                    b(*mean),
                    b(*rstd),
                    b(*dinp),
                    *accumulate,
                )?);
            }
            Kernel::LayerNormParams { rows, channels, dout, inp, mean, rstd, dweight, dbias } => {
                out.push(layernorm::backward_params(
                    gpu,
                    &format!("layernorm param grad {}", self.name(*dweight)),
                    *rows,
                    *channels,
                    b(*dout),
                    b(*inp),
                    b(*mean),
                    b(*rstd),
                    b(*dweight),
                    b(*dbias),
                )?);
            }
            Kernel::AttentionBackward { shape, dout, qkv, att, datt, dqkv, accumulate } => {
                out.extend(attention::backward(
                    gpu,
                    &format!("attention backward {}", self.name(*dqkv)),
                    *shape,
                    b(*dout),
                    b(*qkv),
                    b(*att),
                    b(*datt),
                    b(*dqkv),
                    *accumulate,
                )?);
            }
            Kernel::Copy { len, src, dst, scale, accumulate } => {
                out.push(residual::copy_or_accumulate(gpu, &format!("residual grad {}", self.name(*dst)), *len, *accumulate, *scale, b(*src), b(*dst))?);
            }
            Kernel::MatmulNf4Input { shape, dout, codes, scales, steps, dinp, accumulate } => {
                let weight = self.nf4_weight(shape.inner, shape.cols, *codes, *scales, *steps);
                out.push(nf4::backward_input(gpu, &format!("matmul nf4 input grad {}", self.name(*dinp)), *shape, b(*dout), weight, b(*dinp), *accumulate)?);
            }
            Kernel::MatmulF16Input { shape, dout, packed, dinp, accumulate } => {
                let weight = f16_weights::F16Weight { rows: shape.inner, cols: shape.cols, packed: self.binding(*packed) };
                out.push(f16_weights::backward_input(gpu, &format!("matmul f16 input grad {}", self.name(*dinp)), *shape, b(*dout), weight, b(*dinp), *accumulate)?);
            }
            Kernel::DropoutBackward { len, prob, seed, salt, dout, dinp, accumulate } => {
                out.push(dropout::backward(
                    gpu,
                    &format!("dropout grad {}", self.name(*dinp)),
                    *len,
                    *prob,
                    *salt,
                    *accumulate,
                    b(*seed),
                    b(*dout),
                    b(*dinp),
                )?);
            }
            Kernel::EmbeddingToken { batch, seq_len, channels, order, segments, dout, dwte, row_offset, rows } => {
                out.push(embedding::backward_token(
                    gpu,
                    &format!("embedding grad {}", self.name(*dwte)),
                    *batch,
                    *seq_len,
                    *channels,
                    b(*order),
                    b(*segments),
                    b(*dout),
                    b(*dwte),
                    *row_offset,
                    *rows,
                )?);
            }
            Kernel::EmbeddingPosition { batch, seq_len, channels, dout, dwpe } => {
                out.push(embedding::backward_position(gpu, "position embedding grad", *batch, *seq_len, *channels, b(*dout), b(*dwpe))?);
            }
            Kernel::NormPartials { len, grad, partials, offset, rows } => {
                let label = format!("grad norm {}", self.name(*grad));
                out.push(match rows {
                    None => norm::partial_sums(gpu, &label, *len, b(*grad), b(*partials), *offset)?,
                    Some(RowNorm { row_len, listed: None }) => norm::row_sums(gpu, &label, *len, *row_len, b(*grad), b(*partials), *offset)?,
                    Some(RowNorm { row_len, listed: Some(flags) }) => {
                        let tables = self.touched_rows.borrow();
                        let table = tables.iter().find(|t| t.flags == *flags).expect("every row-flagged table has host lists");
                        norm::listed_row_sums(gpu, &label, *len, *row_len, b(*grad), b(*flags), b(*partials), *offset, &table.norm_counts)?
                    }
                });
            }
            Kernel::NormFinalize { count, partials, norm: n } => {
                out.push(norm::finalize(gpu, "grad norm total", *count, b(*partials), b(*n))?);
                out.push(adamw::count_step(gpu, TensorBinding::whole(&self.step_buffer), b(*n))?);
            }
            Kernel::AdamW { len, param, grad, m, v, rows } => {
                let norm_binding = match self.plan.norm {
                    Some(n) => b(n),
                    None => gpu.placeholder(),
                };
                let label = format!("adamw {}", self.name(*param));
                let step = TensorBinding::whole(&self.step_buffer);
                let state = adamw::AdamWState { param: b(*param), grad: b(*grad), m: b(*m), v: b(*v) };
                let decay = self.settings.weight_decay;
                out.push(match rows {
                    None => adamw::update(gpu, &label, *len, decay, step, norm_binding, state)?,
                    Some(r) => {
                        let tables = self.touched_rows.borrow();
                        let table = tables.iter().find(|t| t.flags == r.flags).expect("every row-flagged table has host lists");
                        adamw::update_rows(gpu, &label, *len, r.row_len, decay, step, norm_binding, state, b(r.flags), &table.adamw_counts)?
                    }
                });
            }
        }
        Ok(())
    }
}

/// Checks that `short`, the plan of the session's graph for `len` positions, can run on the
/// buffers of the session's plan `full`. It must have the same tensors, each no larger and used
/// exactly when it is in `full`, and the same kernels on them.
fn check_same_tensors(full: &Plan, short: &Plan, len: usize) {
    assert_eq!(full.graph.tensors.len(), short.graph.tensors.len(), "the graph for {len} positions has other tensors than the session's");
    for (id, (a, b)) in full.graph.tensors.iter().zip(&short.graph.tensors).enumerate() {
        assert!(
            a.name == b.name && b.bytes() <= a.bytes() && (full.storage[id] == Storage::Unused) == (short.storage[id] == Storage::Unused),
            "tensor {id} is `{}` of {} bytes in the session's graph but `{}` of {} bytes in the graph for {len} positions",
            a.name,
            a.bytes(),
            b.name,
            b.bytes()
        );
    }
    // The same kernels on the same tensors give every tensor the same lifetime, so the full
    // plan's sharing of pool buffers holds for the short one.
    let phases = |p: &Plan| (p.forward_end, p.backward_end, p.kernels.len());
    assert_eq!(phases(full), phases(short), "the graph for {len} positions has other kernels than the session's");
    for (i, (a, b)) in full.kernels.iter().zip(&short.kernels).enumerate() {
        assert_eq!(a.tensors(), b.tensors(), "kernel {i} uses other tensors in the graph for {len} positions");
    }
}

/// Environment variable that makes a training step fail as a driver would, for tests of the
/// error path: `device-lost@N` or `out-of-memory@N` fails the training submit made after N
/// optimizer steps.
pub const FAULT_VARIABLE: &str = "SHADERTUNE_FAULT";

/// Returns the error that [`FAULT_VARIABLE`] requests at `steps` optimizer steps, if any.
fn injected_fault(steps: u64) -> Option<GpuError> {
    static FAULT: std::sync::OnceLock<Option<(String, u64)>> = std::sync::OnceLock::new();
    let fault = FAULT.get_or_init(|| {
        let value = std::env::var(FAULT_VARIABLE).ok()?;
        let (kind, at) = value.split_once('@')?;
        Some((kind.to_string(), at.parse().ok()?))
    });
    let (kind, at) = fault.as_ref()?;
    if *at != steps {
        return None;
    }
    let context = "training step".to_string();
    let message = format!("injected by {FAULT_VARIABLE}");
    match kind.as_str() {
        "device-lost" => Some(GpuError::DeviceLost { context, message }),
        "out-of-memory" => Some(GpuError::Execution { context, message: format!("out of memory ({message})") }),
        _ => None,
    }
}

/// Rejects a plan whose buffers exceed the adapter's binding or buffer limits, before any
/// allocation, with the numbers and what to reduce.
fn check_limits(gpu: &Gpu, plan: &Plan) -> Result<(), GpuError> {
    let limits = gpu.limits();
    for (id, t) in plan.graph.tensors.iter().enumerate() {
        if plan.storage[id] == Storage::Unused {
            continue;
        }
        let limit = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size);
        if t.bytes() > limit {
            return Err(GpuError::PlanTooLarge {
                tensor: t.name.clone(),
                shape: format!("{:?}", t.shape),
                bytes: t.bytes(),
                limit,
            });
        }
    }
    Ok(())
}
