//! Token plus position embedding (`shaders/embedding.wgsl`), with the token table split into row
//! chunks so that no binding exceeds the adapter's storage binding limit.
//!
//! Parameter gradients always accumulate; the optimizer zeroes them after applying them.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "embedding", source: include_str!("../../shaders/embedding.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;

// Binding slots are shared across the entry points (input, output, positions, segments, wpe); the
// forward leaves slot 4 unused and binds the placeholder buffer there.
static FORWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "embedding_forward",
    bindings: &[
        BindingKind::Uniform,
        BindingKind::ReadOnly,
        BindingKind::ReadWrite,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
    ],
};
static BACKWARD_TOKEN: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "embedding_backward_token",
    bindings: &[
        BindingKind::Uniform,
        BindingKind::ReadOnly,
        BindingKind::ReadWrite,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
    ],
};
static BACKWARD_POSITION: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "embedding_backward_position",
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadWrite],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[
    (&FORWARD, WORKGROUP_SIZE),
    (&BACKWARD_TOKEN, WORKGROUP_SIZE),
    (&BACKWARD_POSITION, WORKGROUP_SIZE),
];

/// Uniform parameters, laid out as `EmbeddingParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct EmbeddingParams {
    pub batch_size: u32,
    pub seq_len: u32,
    pub channels: u32,
    /// First wte row held by the bound chunk.
    pub row_offset: u32,
    /// Rows in the bound chunk.
    pub chunk_rows: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

fn params(batch: usize, seq_len: usize, channels: usize, row_offset: usize, chunk_rows: usize) -> EmbeddingParams {
    EmbeddingParams {
        batch_size: batch as u32,
        seq_len: seq_len as u32,
        channels: channels as u32,
        row_offset: row_offset as u32,
        chunk_rows: chunk_rows as u32,
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    }
}

/// Panics unless `binding` contains at least `elements` 4-byte values. Shapes come from the
/// model, not from user input, and a smaller binding would make the shader read or write the
/// wrong elements without any error.
fn check_binding(label: &str, name: &str, binding: &TensorBinding<'_>, elements: usize) {
    let needed = elements as u64 * 4;
    assert!(binding.size >= needed, "`{label}`: binding `{name}` is {} bytes, but its shape needs {needed}", binding.size);
}

/// Token positions grouped by id, the host-side input of [`backward_token`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TokenSegments {
    /// The B*T flat positions `b * T + t`, sorted by id; positions of one id keep ascending order.
    pub order: Vec<u32>,
    /// The number of distinct ids, then `(id, start, end)` for each id in ascending id order:
    /// `order[start..end]` are the positions holding that id. Length `1 + 3 * count`.
    pub segments: Vec<u32>,
}

/// Groups the positions of a batch's token ids by id for [`backward_token`].
///
/// # Shapes
/// - `ids`: (B*T)
pub(crate) fn token_segments(ids: &[u32]) -> TokenSegments {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    // sort_by_key is stable, so positions of one id stay in ascending order.
    order.sort_by_key(|&position| ids[position as usize]);
    let mut segments = vec![0u32];
    let mut start = 0usize;
    while start < order.len() {
        let id = ids[order[start] as usize];
        let mut end = start + 1;
        while end < order.len() && ids[order[end] as usize] == id {
            end += 1;
        }
        segments.extend_from_slice(&[id, start as u32, end as u32]);
        start = end;
    }
    segments[0] = ((segments.len() - 1) / 3) as u32;
    TokenSegments { order, segments }
}

/// Writes `out[b, t] = wte[id] + wpe[t]` for every position whose id lies in
/// `[row_offset, row_offset + chunk_rows)` (assigned). Other positions are left untouched, so one
/// dispatch per chunk covers every token.
///
/// # Shapes
/// - `ids`: (B*T) u32
/// - `wte_chunk`: (chunk_rows, C), rows `row_offset..row_offset + chunk_rows` of wte (V, C)
/// - `wpe`: (n_positions, C) with T <= n_positions
/// - `out`: (B, T, C), assigned at this chunk's positions
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    batch: usize,
    seq_len: usize,
    channels: usize,
    ids: TensorBinding<'_>,
    wte_chunk: TensorBinding<'_>,
    row_offset: usize,
    chunk_rows: usize,
    wpe: TensorBinding<'_>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "ids", &ids, batch * seq_len);
    check_binding(label, "wte_chunk", &wte_chunk, chunk_rows * channels);
    check_binding(label, "wpe", &wpe, seq_len * channels);
    check_binding(label, "out", &out, batch * seq_len * channels);
    let p = params(batch, seq_len, channels, row_offset, chunk_rows);
    let groups = super::grid_1d(gpu, (batch * seq_len * channels) as u64, WORKGROUP_SIZE);
    let buffers = [wte_chunk, out, ids, gpu.placeholder(), wpe];
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&p)), &buffers, groups)
}

/// Adds the token-embedding gradient of this chunk's ids:
/// `dwte[id] += sum of dout over the positions of id` (accumulated), in the fixed order of
/// `order`, so two runs give bitwise-identical gradients. Segments whose id lies outside the chunk
/// are skipped.
///
/// The dispatch is sized for B*T segments, the most a batch can have, so it can be recorded before
/// the segments are known. The kernel reads the actual count from `segments[0]`.
///
/// # Shapes
/// - `order`: (B*T) u32, and `segments`: (1 + 3 * count) u32, from [`token_segments`]
/// - `dout`: (B, T, C)
/// - `dwte_chunk`: (chunk_rows, C), rows `row_offset..row_offset + chunk_rows` of dwte, accumulated
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_token(
    gpu: &Gpu,
    label: &str,
    batch: usize,
    seq_len: usize,
    channels: usize,
    order: TensorBinding<'_>,
    segments: TensorBinding<'_>,
    dout: TensorBinding<'_>,
    dwte_chunk: TensorBinding<'_>,
    row_offset: usize,
    chunk_rows: usize,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "order", &order, batch * seq_len);
    // The segment count is only known on the device; the count itself must be there.
    check_binding(label, "segments", &segments, 1);
    check_binding(label, "dout", &dout, batch * seq_len * channels);
    check_binding(label, "dwte_chunk", &dwte_chunk, chunk_rows * channels);
    let p = params(batch, seq_len, channels, row_offset, chunk_rows);
    let groups = super::grid_1d(gpu, (batch * seq_len * channels) as u64, WORKGROUP_SIZE);
    let buffers = [dout, dwte_chunk, order, segments];
    gpu.dispatch(&BACKWARD_TOKEN, label, Some(bytemuck::bytes_of(&p)), &buffers, groups)
}

/// Adds the position-embedding gradient: `dwpe[t] += sum_b dout[b, t]` (accumulated), the batch
/// added in ascending order. Rows of `dwpe` from T on are untouched.
///
/// # Shapes
/// - `dout`: (B, T, C)
/// - `dwpe`: (n_positions, C) with T <= n_positions, accumulated
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_position(
    gpu: &Gpu,
    label: &str,
    batch: usize,
    seq_len: usize,
    channels: usize,
    dout: TensorBinding<'_>,
    dwpe: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "dout", &dout, batch * seq_len * channels);
    check_binding(label, "dwpe", &dwpe, seq_len * channels);
    let p = params(batch, seq_len, channels, 0, 0);
    let groups = super::grid_1d(gpu, (seq_len * channels) as u64, WORKGROUP_SIZE);
    gpu.dispatch(&BACKWARD_POSITION, label, Some(bytemuck::bytes_of(&p)), &[dout, dwpe], groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::embedding as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};
    use rand::{Rng, SeedableRng};

    /// The forward adds two f32 values once, so it is exact up to one rounding.
    const FORWARD_ATOL: f64 = 1e-6;
    const FORWARD_RTOL: f64 = 1e-6;
    /// The backward sums at most B*T values in [-1, 1) per element (96 in the largest case) on top
    /// of an initial value. The f32 rounding error of such a sum stays well below 1e-5 absolute.
    const BACKWARD_ATOL: f64 = 1e-5;
    const BACKWARD_RTOL: f64 = 1e-5;

    /// Random ids below `vocab`, with a few ids forced to repeat.
    fn random_ids(len: usize, vocab: u32, seed: u64) -> Vec<u32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
        for i in (0..len).step_by(3) {
            ids[i] = ids[0];
        }
        ids
    }

    /// Splits `vocab` rows into two chunks, the first of `split` rows.
    fn chunks(vocab: usize, split: usize) -> [(usize, usize); 2] {
        [(0, split), (split, vocab - split)]
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<EmbeddingParams>() % 16, 0);
    }

    #[test]
    fn token_segments_groups_repeated_ids() {
        let segments = token_segments(&[5, 2, 5, 9, 2, 5]);
        assert_eq!(segments.order, vec![1, 4, 0, 2, 5, 3]);
        assert_eq!(segments.segments, vec![3, 2, 0, 2, 5, 2, 5, 9, 5, 6]);
        let empty = token_segments(&[]);
        assert_eq!(empty.segments, vec![0]);
    }

    /// (B, T, C, V, n_positions): T = 1, odd sizes, and GPT-2 small's channels with a vocabulary
    /// small enough for a quick test.
    fn cases() -> Vec<(usize, usize, usize, usize, usize)> {
        vec![(1, 1, 3, 5, 4), (3, 7, 13, 29, 9), (4, 24, 768, 301, 32)]
    }

    #[test]
    fn embedding_forward_two_chunks_match_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (seed, (batch, seq_len, channels, vocab, n_positions)) in cases().into_iter().enumerate() {
            let seed = seed as u64;
            let ids = random_ids(batch * seq_len, vocab as u32, seed);
            let wte = random_vec(vocab * channels, seed + 10);
            let wpe = random_vec(n_positions * channels, seed + 20);
            let dids = gpu.upload("ids", &ids).unwrap();
            let dwpe = gpu.upload("wpe", &wpe).unwrap();
            // NaN marks an element that no chunk wrote.
            let dout = gpu.upload("out", &vec![f32::NAN; batch * seq_len * channels]).unwrap();
            let split = vocab / 2;
            let chunk_buffers: Vec<wgpu::Buffer> = chunks(vocab, split)
                .iter()
                .map(|&(offset, rows)| gpu.upload("wte chunk", &wte[offset * channels..(offset + rows) * channels]).unwrap())
                .collect();
            let dispatches: Vec<Dispatch> = chunks(vocab, split)
                .iter()
                .zip(&chunk_buffers)
                .map(|(&(offset, rows), buffer)| {
                    forward(gpu, "embedding", batch, seq_len, channels, (&dids).into(), buffer.into(), offset, rows, (&dwpe).into(), (&dout).into())
                        .unwrap()
                })
                .collect();
            gpu.run("embedding test", &dispatches).unwrap();
            let got: Vec<f32> = gpu.read(&dout, 0, batch * seq_len * channels).unwrap();
            let want = reference::embedding_forward(&ids, &to_f64(&wte), &to_f64(&wpe), batch, seq_len, channels);
            let what = format!("embedding_forward B={batch} T={seq_len} C={channels} V={vocab} chunks of {split}");
            assert_close(&what, &got, &want, FORWARD_ATOL, FORWARD_RTOL);
        }
    }

    #[test]
    fn embedding_forward_leaves_other_chunks_untouched() {
        let Some(gpu) = test_gpu() else { return };
        let (batch, seq_len, channels, vocab) = (2, 3, 5, 10);
        let ids = [0u32, 7, 4, 5, 9, 1];
        let (offset, rows) = (4, 4);
        let wte = random_vec(vocab * channels, 1);
        let wpe = random_vec(seq_len * channels, 2);
        let dids = gpu.upload("ids", &ids).unwrap();
        let dwpe = gpu.upload("wpe", &wpe).unwrap();
        let chunk = gpu.upload("wte chunk", &wte[offset * channels..(offset + rows) * channels]).unwrap();
        let sentinel = -7.0f32;
        let dout = gpu.upload("out", &vec![sentinel; batch * seq_len * channels]).unwrap();
        let d = forward(gpu, "embedding", batch, seq_len, channels, (&dids).into(), (&chunk).into(), offset, rows, (&dwpe).into(), (&dout).into())
            .unwrap();
        gpu.run("embedding test", &[d]).unwrap();
        let got: Vec<f32> = gpu.read(&dout, 0, batch * seq_len * channels).unwrap();
        let want = reference::embedding_forward(&ids, &to_f64(&wte), &to_f64(&wpe), batch, seq_len, channels);
        for (position, &id) in ids.iter().enumerate() {
            let inside = (offset..offset + rows).contains(&(id as usize));
            for c in 0..channels {
                let i = position * channels + c;
                if inside {
                    let err = (f64::from(got[i]) - want[i]).abs();
                    assert!(err <= FORWARD_ATOL, "embedding_forward id {id} in chunk, out[{i}]: got {} expected {}", got[i], want[i]);
                } else {
                    assert_eq!(got[i], sentinel, "embedding_forward id {id} outside chunk {offset}..{}: out[{i}] was written", offset + rows);
                }
            }
        }
    }

    /// Runs both backward kernels over two wte chunks, accumulating into `initial` values, and
    /// returns (dwte, dwpe) read back.
    #[allow(clippy::too_many_arguments)]
    fn device_backward(
        gpu: &Gpu,
        ids: &[u32],
        dout: &[f32],
        initial_wte: &[f32],
        initial_wpe: &[f32],
        dims: (usize, usize, usize, usize),
        split: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (batch, seq_len, channels, vocab) = dims;

        let segments = token_segments(ids);
        let dorder = gpu.upload("order", &segments.order).unwrap();
        let dsegments = gpu.upload("segments", &segments.segments).unwrap();
        let ddout = gpu.upload("dout", dout).unwrap();
        let ddwpe = gpu.upload("dwpe", initial_wpe).unwrap();
        let chunk_buffers: Vec<wgpu::Buffer> = chunks(vocab, split)
            .iter()
            .map(|&(offset, rows)| gpu.upload("dwte chunk", &initial_wte[offset * channels..(offset + rows) * channels]).unwrap())
            .collect();

        let mut dispatches = Vec::new();
        for (&(offset, rows), buffer) in chunks(vocab, split).iter().zip(&chunk_buffers) {
            let d = backward_token(
                gpu,
                "embedding token backward",
                batch,
                seq_len,
                channels,
                (&dorder).into(),
                (&dsegments).into(),
                (&ddout).into(),
                buffer.into(),
                offset,
                rows,
            )
            .unwrap();
            dispatches.push(d);
        }
        dispatches.push(
            backward_position(gpu, "embedding position backward", batch, seq_len, channels, (&ddout).into(), (&ddwpe).into())
                .unwrap(),
        );
        gpu.run("embedding test", &dispatches).unwrap();

        let mut dwte = Vec::new();
        for (&(_, rows), buffer) in chunks(vocab, split).iter().zip(&chunk_buffers) {
            dwte.extend(gpu.read::<f32>(buffer, 0, rows * channels).unwrap());
        }
        let dwpe = gpu.read(&ddwpe, 0, initial_wpe.len()).unwrap();
        (dwte, dwpe)
    }

    #[test]
    fn embedding_backward_repeated_ids_match_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (seed, (batch, seq_len, channels, vocab, n_positions)) in cases().into_iter().enumerate() {
            let seed = seed as u64;
            let ids = random_ids(batch * seq_len, vocab as u32, seed);
            let dout = random_vec(batch * seq_len * channels, seed + 30);
            // Non-zero starting gradients check that both kernels accumulate.
            let initial_wte = random_vec(vocab * channels, seed + 40);
            let initial_wpe = random_vec(n_positions * channels, seed + 50);
            let split = vocab / 3 + 1;
            let (dwte, dwpe) =
                device_backward(gpu, &ids, &dout, &initial_wte, &initial_wpe, (batch, seq_len, channels, vocab), split);
            let (want_wte, want_wpe) =
                reference::embedding_backward(&ids, &to_f64(&dout), vocab, n_positions, batch, seq_len, channels);
            let plus = |grad: Vec<f64>, initial: &[f32]| -> Vec<f64> {
                grad.iter().zip(initial).map(|(g, i)| g + f64::from(*i)).collect()
            };
            let shape = format!("B={batch} T={seq_len} C={channels} V={vocab} chunks of {split}");
            assert_close(
                &format!("embedding_backward_token {shape}"),
                &dwte,
                &plus(want_wte, &initial_wte),
                BACKWARD_ATOL,
                BACKWARD_RTOL,
            );
            assert_close(
                &format!("embedding_backward_position {shape}"),
                &dwpe,
                &plus(want_wpe, &initial_wpe),
                BACKWARD_ATOL,
                BACKWARD_RTOL,
            );
        }
    }

    #[test]
    fn embedding_backward_is_bitwise_repeatable() {
        let Some(gpu) = test_gpu() else { return };
        let (batch, seq_len, channels, vocab, n_positions) = (8, 120, 64, 50, 120);
        // A small vocabulary makes every id repeat many times.
        let ids = random_ids(batch * seq_len, vocab as u32, 7);
        let dout = random_vec(batch * seq_len * channels, 8);
        let zeros_wte = vec![0.0f32; vocab * channels];
        let zeros_wpe = vec![0.0f32; n_positions * channels];
        let dims = (batch, seq_len, channels, vocab);
        let first = device_backward(gpu, &ids, &dout, &zeros_wte, &zeros_wpe, dims, 20);
        let second = device_backward(gpu, &ids, &dout, &zeros_wte, &zeros_wpe, dims, 20);
        for (i, (a, b)) in first.0.iter().zip(&second.0).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "embedding_backward_token dwte[{i}] differs between runs: {a} vs {b}");
        }
        for (i, (a, b)) in first.1.iter().zip(&second.1).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "embedding_backward_position dwpe[{i}] differs between runs: {a} vs {b}");
        }
    }
}
