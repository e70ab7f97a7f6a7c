//! Next-token cross-entropy over vocabulary chunks (`shaders/lmloss.wgsl`).
//!
//! The language-model loss needs logits (rows, vocab): 206 MB for 1,024 tokens of GPT-2, over
//! the 128 MiB binding limit of some adapters and wasteful on all. The graph computes one chunk
//! of logits at a time (a matmul of some rows against a row chunk of wte) and calls
//! [`chunk_forward`] on it, which folds the chunk into a running log-sum-exp per row. Once every
//! vocabulary chunk of those rows is folded, a training step turns each chunk into its gradient
//! in place with [`chunk_backward`]. The mean over counted rows reuses
//! [`crossentropy::mean`](super::crossentropy::mean).
//!
//! Targets follow the cross-entropy convention: negative means ignored; a target >= vocab gives
//! a NaN loss and NaN gradients.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily = ShaderFamily { name: "lmloss", source: include_str!("../../shaders/lmloss.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;

/// Columns of one row per invocation of the backward; must match `COLUMNS_PER_INVOCATION`.
const BACKWARD_COLUMNS_PER_INVOCATION: usize = 4;

/// Both entries share one binding layout: chunk, targets, stats, losses, loss_out.
const BINDINGS: &[BindingKind] = &[
    BindingKind::Uniform,
    BindingKind::ReadWrite,
    BindingKind::ReadOnly,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
    BindingKind::ReadOnly,
];

static FORWARD: KernelEntry = KernelEntry { family: &FAMILY, entry: "lmloss_chunk_forward", bindings: BINDINGS };
static BACKWARD: KernelEntry = KernelEntry { family: &FAMILY, entry: "lmloss_chunk_backward", bindings: BINDINGS };

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&FORWARD, WORKGROUP_SIZE), (&BACKWARD, WORKGROUP_SIZE)];

/// Uniform parameters, laid out as `LmLossParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LmLossParams {
    pub rows: u32,
    pub cols: u32,
    pub col_offset: u32,
    pub vocab: u32,
    pub first: u32,
    pub last: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// One vocabulary chunk: columns `col_offset..col_offset + cols` of a `vocab`-wide row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct VocabChunk {
    pub rows: usize,
    pub cols: usize,
    pub col_offset: usize,
    pub vocab: usize,
}

impl VocabChunk {
    fn params(&self) -> LmLossParams {
        LmLossParams {
            rows: self.rows as u32,
            cols: self.cols as u32,
            col_offset: self.col_offset as u32,
            vocab: self.vocab as u32,
            first: u32::from(self.col_offset == 0),
            last: u32::from(self.col_offset + self.cols == self.vocab),
            _pad0: 0,
            _pad1: 0,
        }
    }
}

fn check_binding(label: &str, name: &str, binding: &TensorBinding<'_>, elements: usize) {
    let needed = elements as u64 * 4;
    assert!(binding.size >= needed, "`{label}`: binding `{name}` is {} bytes, but its shape needs {needed}", binding.size);
}

fn check_chunk(label: &str, c: &VocabChunk) {
    assert!(c.cols > 0, "`{label}`: chunk {c:?} has no columns");
    assert!(c.col_offset + c.cols <= c.vocab, "`{label}`: chunk {c:?} lies outside the vocabulary");
}

/// Folds one chunk of logits into the running statistics of each row; on the last chunk
/// (`col_offset + cols == vocab`) writes `losses[r] = logsumexp(logits[r]) - logits[r, t]`.
/// Chunks must arrive in increasing `col_offset`, starting at 0.
///
/// # Shapes
/// - `chunk`: (rows, cols), logits of vocabulary columns `col_offset..col_offset + cols`
/// - `targets`: (rows) i32, negative to ignore the row
/// - `stats`: (rows, 3), running max, running sum, target logit; assigned by the first chunk
/// - `losses`: (rows), assigned by the last chunk
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_forward(
    gpu: &Gpu,
    label: &str,
    c: VocabChunk,
    chunk: TensorBinding<'_>,
    targets: TensorBinding<'_>,
    stats: TensorBinding<'_>,
    losses: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_chunk(label, &c);
    check_binding(label, "chunk", &chunk, c.rows * c.cols);
    check_binding(label, "targets", &targets, c.rows);
    check_binding(label, "stats", &stats, 3 * c.rows);
    check_binding(label, "losses", &losses, c.rows);
    let p = c.params();
    let grid = crate::gpu::grid_for(c.rows as u32, gpu.limits().max_compute_workgroups_per_dimension);
    let placeholder = gpu.placeholder();
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&p)), &[chunk, targets, stats, losses, placeholder], grid)
}

/// Overwrites a chunk of logits with the gradient of the mean loss:
/// `chunk[r, j] = (exp(chunk[r, j] - max[r]) / sum[r] - [col_offset + j == t[r]]) / count`.
///
/// # Shapes
/// - `chunk`: (rows, cols), logits in, gradient out
/// - `targets`: (rows) i32
/// - `stats`: (rows, 3), after the last [`chunk_forward`]
/// - `losses`: (rows), bound but not read
/// - `loss_out`: (2), from `crossentropy::mean`
#[allow(clippy::too_many_arguments)]
pub(crate) fn chunk_backward(
    gpu: &Gpu,
    label: &str,
    c: VocabChunk,
    chunk: TensorBinding<'_>,
    targets: TensorBinding<'_>,
    stats: TensorBinding<'_>,
    losses: TensorBinding<'_>,
    loss_out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_chunk(label, &c);
    check_binding(label, "chunk", &chunk, c.rows * c.cols);
    check_binding(label, "targets", &targets, c.rows);
    check_binding(label, "stats", &stats, 3 * c.rows);
    check_binding(label, "loss_out", &loss_out, 2);
    let p = c.params();
    let groups_per_row = c.cols.div_ceil(BACKWARD_COLUMNS_PER_INVOCATION) as u64;
    let grid = super::grid_1d(gpu, c.rows as u64 * groups_per_row, WORKGROUP_SIZE);
    gpu.dispatch(&BACKWARD, label, Some(bytemuck::bytes_of(&p)), &[chunk, targets, stats, losses, loss_out], grid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::crossentropy;
    use crate::reference::crossentropy as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};
    use rand::{Rng, SeedableRng};

    /// As in the full cross-entropy test: a few units of f32 rounding on losses up to log(V).
    const LOSS_ATOL: f64 = 2e-5;
    const LOSS_RTOL: f64 = 2e-6;
    /// The gradient is a probability over the count; the target class cancels to (p - 1), whose
    /// absolute error is that of p. Divided by the count below.
    const GRAD_ATOL_TIMES_COUNT: f64 = 5e-7;
    const GRAD_RTOL: f64 = 1e-5;

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<LmLossParams>() % 16, 0);
    }

    /// Splits random logits (rows, vocab) into chunks of `width` columns, runs the chunked forward,
    /// the mean and the chunked backward, and checks them against the whole-row reference.
    fn check(rows: usize, vocab: usize, width: usize, ignored: &[usize]) {
        let Some(gpu) = test_gpu() else { return };
        let logits: Vec<f32> = random_vec(rows * vocab, 7).iter().map(|x| 6.0 * x).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let targets: Vec<i32> =
            (0..rows).map(|r| if ignored.contains(&r) { -1 } else { rng.random_range(0..vocab as i32) }).collect();
        let chunks: Vec<VocabChunk> = (0..vocab)
            .step_by(width)
            .map(|o| VocabChunk { rows, cols: width.min(vocab - o), col_offset: o, vocab })
            .collect();
        let slice = |c: &VocabChunk| -> Vec<f32> {
            (0..rows).flat_map(|r| logits[r * vocab + c.col_offset..r * vocab + c.col_offset + c.cols].iter().copied()).collect()
        };
        let buffers: Vec<wgpu::Buffer> = chunks.iter().map(|c| gpu.upload("chunk", &slice(c)).unwrap()).collect();
        let dt = gpu.upload("targets", &targets).unwrap();
        let dstats = gpu.upload("stats", &vec![f32::NAN; 3 * rows]).unwrap();
        let dlosses = gpu.upload("losses", &vec![f32::NAN; rows]).unwrap();
        let dloss_out = gpu.storage_buffer("loss_out", 8).unwrap();
        let mut dispatches = Vec::new();
        for (c, buffer) in chunks.iter().zip(&buffers) {
            dispatches.push(chunk_forward(gpu, "lm forward", *c, buffer.into(), (&dt).into(), (&dstats).into(), (&dlosses).into()).unwrap());
        }
        dispatches.push(crossentropy::mean(gpu, "lm mean", rows, (&dlosses).into(), (&dt).into(), (&dloss_out).into()).unwrap());
        for (c, buffer) in chunks.iter().zip(&buffers) {
            dispatches.push(
                chunk_backward(gpu, "lm backward", *c, buffer.into(), (&dt).into(), (&dstats).into(), (&dlosses).into(), (&dloss_out).into())
                    .unwrap(),
            );
        }
        gpu.run("lmloss test", &dispatches).unwrap();

        let shape = format!("rows={rows} vocab={vocab} chunk width={width}");
        let l64 = to_f64(&logits);
        let want = reference::crossentropy_forward(&l64, &targets, rows, vocab);
        let losses: Vec<f32> = gpu.read(&dlosses, 0, rows).unwrap();
        assert_close(&format!("lmloss_chunk_forward {shape}"), &losses, &want.losses, LOSS_ATOL, LOSS_RTOL);
        let loss_out: Vec<f32> = gpu.read(&dloss_out, 0, 2).unwrap();
        assert_close(&format!("lmloss mean {shape}"), &loss_out[..1], &[want.mean], LOSS_ATOL, LOSS_RTOL);
        let want_grad = reference::crossentropy_backward(&l64, &targets, rows, vocab);
        let mut got = vec![0.0f32; rows * vocab];
        for (c, buffer) in chunks.iter().zip(&buffers) {
            let part: Vec<f32> = gpu.read(buffer, 0, rows * c.cols).unwrap();
            for r in 0..rows {
                got[r * vocab + c.col_offset..r * vocab + c.col_offset + c.cols].copy_from_slice(&part[r * c.cols..(r + 1) * c.cols]);
            }
        }
        let atol = GRAD_ATOL_TIMES_COUNT / want.count.max(1) as f64;
        assert_close(&format!("lmloss_chunk_backward {shape}"), &got, &want_grad, atol, GRAD_RTOL);
    }

    #[test]
    fn lmloss_one_chunk_matches_reference() {
        check(5, 37, 37, &[2]);
    }

    #[test]
    fn lmloss_uneven_chunks_match_reference() {
        check(7, 1000, 300, &[0, 6]);
        check(1, 3, 1, &[]);
    }

    #[test]
    fn lmloss_gpt2_vocabulary_in_chunks_matches_reference() {
        check(4, 50257, 8192, &[1]);
    }

    #[test]
    fn lmloss_out_of_range_target_gives_nan() {
        let Some(gpu) = test_gpu() else { return };
        let (rows, vocab) = (2, 8);
        let targets = [8i32, 3];
        let c = VocabChunk { rows, cols: vocab, col_offset: 0, vocab };
        let dc = gpu.upload("chunk", &random_vec(rows * vocab, 1)).unwrap();
        let dt = gpu.upload("targets", &targets).unwrap();
        let dstats = gpu.storage_buffer("stats", 24).unwrap();
        let dlosses = gpu.storage_buffer("losses", 8).unwrap();
        let d = chunk_forward(gpu, "lm forward", c, (&dc).into(), (&dt).into(), (&dstats).into(), (&dlosses).into()).unwrap();
        gpu.run("lmloss test", &[d]).unwrap();
        let losses: Vec<f32> = gpu.read(&dlosses, 0, rows).unwrap();
        assert!(losses[0].is_nan(), "target 8 of vocab 8 gave loss {}, expected NaN", losses[0]);
        assert!(losses[1].is_finite(), "valid row gave loss {}", losses[1]);
    }
}
