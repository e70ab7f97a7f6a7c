//! Kernels of one generation step (`shaders/decode.wgsl`). The attention of one new token over
//! cached keys and values lets text generation run one position per step instead of the whole
//! prefix, and the matrix-vector products run that token's linear layers.

use super::matmul::{sized_binding, MatmulShape, WeightLayout};
use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "decode", source: include_str!("../../shaders/decode.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 64;

use BindingKind::{ReadOnly, ReadWrite, Uniform};

static ATTENTION: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "decode_attention",
    // qkv, position, k_cache, v_cache, scores, out
    bindings: &[Uniform, ReadOnly, ReadOnly, ReadWrite, ReadWrite, ReadWrite, ReadWrite],
};

/// Must match `MATVEC_WORKGROUP_SIZE` in the shader.
pub(crate) const MATVEC_WORKGROUP_SIZE: u32 = 32;
/// Outputs per invocation; must match four times `MATVEC_QUADS` and `MATVEC_ROWS` in the shader.
const MATVEC_IN_OUT_COLS: usize = 8;
const MATVEC_OUT_IN_ROWS: usize = 4;
/// Floats in one vec4, the unit of the matrix-vector loads.
const VEC4: usize = 4;

/// Bindings of both matrix-vector products: input, weight, bias, out.
const MATVEC_BINDINGS: &[BindingKind] = &[Uniform, ReadOnly, ReadOnly, ReadOnly, ReadWrite];
static MATVEC_IN_OUT: KernelEntry =
    KernelEntry { family: &FAMILY, entry: "decode_matvec_in_out", bindings: MATVEC_BINDINGS };
static MATVEC_OUT_IN: KernelEntry =
    KernelEntry { family: &FAMILY, entry: "decode_matvec_out_in", bindings: MATVEC_BINDINGS };

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[
    (&ATTENTION, WORKGROUP_SIZE),
    (&MATVEC_IN_OUT, MATVEC_WORKGROUP_SIZE),
    (&MATVEC_OUT_IN, MATVEC_WORKGROUP_SIZE),
];

/// Sizes of the decode attention of one model layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DecodeShape {
    /// C.
    pub channels: usize,
    /// NH.
    pub num_heads: usize,
    /// Rows of the key and value caches: the model's n_positions.
    pub max_positions: usize,
}

/// Uniform parameters, with the field names and order of `DecodeParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct DecodeParams {
    pub channels: u32,
    pub num_heads: u32,
    pub head_size: u32,
    pub max_positions: u32,
    pub scale: f32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

fn params(label: &str, shape: &DecodeShape) -> DecodeParams {
    let DecodeShape { channels, num_heads, max_positions } = *shape;
    assert!(num_heads > 0, "decode attention `{label}`: NH must be at least 1");
    assert!(max_positions > 0, "decode attention `{label}`: max_positions must be at least 1");
    assert!(
        channels > 0 && channels.is_multiple_of(num_heads),
        "decode attention `{label}`: C = {channels} must be a positive multiple of NH = {num_heads}"
    );
    let largest = max_positions.checked_mul(channels.max(num_heads)).and_then(|n| u32::try_from(n).ok());
    assert!(
        largest.is_some(),
        "decode attention `{label}`: a {max_positions} x {channels} cache exceeds u32 indexing"
    );
    let head_size = channels / num_heads;
    DecodeParams {
        channels: channels as u32,
        num_heads: num_heads as u32,
        head_size: head_size as u32,
        max_positions: max_positions as u32,
        scale: 1.0 / (head_size as f32).sqrt(),
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    }
}

/// Creates the dispatch that appends the new token's key and value to the caches at the
/// position stored in `position[0]`, then computes, per head, `softmax(q k_t / sqrt(HS))` over
/// t = 0..=pos and the weighted sum of `v_t` into `out`. `pos` must be below `max_positions`;
/// the caller writes it before each step, so one dispatch serves every position.
///
/// # Shapes
/// - `qkv`: (3C), q | k | v of the new token; head h uses channels h*HS..(h+1)*HS of each
/// - `position`: (1) u32
/// - `k_cache`, `v_cache`: (max_positions, C); row pos assigned, rows 0..pos read
/// - `scores`: (NH, max_positions), scratch
/// - `out`: (C), assigned
///
/// # Panics
/// If C is not a positive multiple of NH, max_positions is 0, or a binding is smaller than its
/// shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention(
    gpu: &Gpu,
    label: &str,
    shape: DecodeShape,
    qkv: TensorBinding<'_>,
    position: TensorBinding<'_>,
    k_cache: TensorBinding<'_>,
    v_cache: TensorBinding<'_>,
    scores: TensorBinding<'_>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let p = params(label, &shape);
    let DecodeShape { channels, num_heads, max_positions } = shape;
    let bindings = [
        sized_binding(label, "qkv", qkv, 3 * channels, false),
        sized_binding(label, "position", position, 1, false),
        sized_binding(label, "k_cache", k_cache, max_positions * channels, false),
        sized_binding(label, "v_cache", v_cache, max_positions * channels, false),
        sized_binding(label, "scores", scores, num_heads * max_positions, false),
        sized_binding(label, "out", out, channels, false),
    ];
    let groups = [num_heads as u32, 1, 1];
    gpu.dispatch(&ATTENTION, label, Some(bytemuck::bytes_of(&p)), &bindings, groups)
}

/// Uniform parameters, with the field names and order of `MatvecParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct MatvecParams {
    pub inner: u32,
    pub cols: u32,
    pub out_offset: u32,
    pub has_bias: u32,
}

/// Returns true when [`matvec`] runs `shape`: one row, and whole vec4s along every weight row
/// (K a multiple of 4, and N too for [`WeightLayout::InOut`]).
pub(crate) fn matvec_fits(shape: &MatmulShape) -> bool {
    let rows_aligned = match shape.layout {
        WeightLayout::InOut => shape.cols.is_multiple_of(VEC4),
        WeightLayout::OutIn => true,
    };
    shape.rows == 1 && shape.inner.is_multiple_of(VEC4) && rows_aligned
}

/// Creates the dispatch of the one-row product `out[out_offset + n] = sum_k inp[k] * W[k, n] +
/// bias[n]`, the same result as [`super::matmul::forward`] for one row with a fraction of its
/// work. It assigns `out`.
///
/// # Shapes
/// - `inp`: (K)
/// - `weight`: (K, N) for [`WeightLayout::InOut`], (N, K) for [`WeightLayout::OutIn`]
/// - `bias`: (N), or `None`
/// - `out`: at least `out_offset + N` floats, of which `out_offset..out_offset + N` are written
///
/// # Panics
/// Unless [`matvec_fits`] is true for `shape`, N and K are non-zero and every binding is large
/// enough for its shape.
pub(crate) fn matvec(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    inp: TensorBinding<'_>,
    weight: TensorBinding<'_>,
    bias: Option<TensorBinding<'_>>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let MatmulShape { inner, cols, layout, out_offset, .. } = shape;
    assert!(
        matvec_fits(&shape) && inner > 0 && cols > 0,
        "matvec `{label}`: needs one row, K > 0 a multiple of 4 and N > 0 (a multiple of 4 for (K, N) weights), \
         got M={} K={inner} N={cols} {layout:?}",
        shape.rows
    );
    let largest = (out_offset + cols).max(inner * cols);
    assert!(u32::try_from(largest).is_ok(), "matvec `{label}`: {largest} floats exceed u32 indexing");
    let p = MatvecParams {
        inner: inner as u32,
        cols: cols as u32,
        out_offset: out_offset as u32,
        has_bias: u32::from(bias.is_some()),
    };
    let bias = bias.map_or_else(|| gpu.placeholder(), |b| sized_binding(label, "bias", b, cols, false));
    let bindings = [
        sized_binding(label, "inp", inp, inner, true),
        sized_binding(label, "weight", weight, inner * cols, true),
        bias,
        sized_binding(label, "out", out, out_offset + cols, false),
    ];
    let (kernel, outputs_per_invocation) = match layout {
        WeightLayout::InOut => (&MATVEC_IN_OUT, MATVEC_IN_OUT_COLS),
        WeightLayout::OutIn => (&MATVEC_OUT_IN, MATVEC_OUT_IN_ROWS),
    };
    let invocations = cols.div_ceil(outputs_per_invocation) as u64;
    let groups = super::grid_1d(gpu, invocations, MATVEC_WORKGROUP_SIZE);
    gpu.dispatch(kernel, label, Some(bytemuck::bytes_of(&p)), &bindings, groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::attention as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// Same basis as the attention forward tests: f32 dot products and sums of at most a few
    /// hundred terms of size about 1, whose rounding stays near 1e-6. The exponentials are summed
    /// before normalising here, which changes only the last bits. On lavapipe the largest
    /// absolute error of the small shapes was 7e-8.
    const ATOL: f64 = 5e-6;
    const RTOL: f64 = 1e-4;

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<DecodeParams>() % 16, 0);
    }

    /// (T, C, NH, max_positions): T = 1 (pos 0 only), odd head counts and sizes, heads wider
    /// than the workgroup, more keys than the workgroup, caches longer than the sequence, and
    /// the GPT-2 small layer.
    fn cases() -> Vec<(usize, usize, usize, usize)> {
        vec![(1, 8, 2, 1), (5, 15, 3, 9), (9, 35, 5, 9), (70, 130, 2, 75), (3, 1, 1, 4), (33, 768, 12, 40)]
    }

    /// Feeds the T rows of a random qkv (T, 3C) one position at a time and checks each output
    /// against row t of full causal attention, then checks the caches against k and v.
    #[test]
    fn decode_attention_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (seq_len, channels, num_heads, max_positions) in cases() {
            let case = format!("T={seq_len} C={channels} NH={num_heads} max_positions={max_positions}");
            let shape = DecodeShape { channels, num_heads, max_positions };
            let qkv = random_vec(seq_len * 3 * channels, seq_len as u64 + 7);
            let (_, want_out) = reference::attention_forward(&to_f64(&qkv), 1, seq_len, channels, num_heads);

            // NaN in every cache and scratch entry: a row the kernel reads before writing it
            // would turn the output into NaN.
            let poison = vec![f32::NAN; max_positions * channels];
            let d_qkv = gpu.storage_buffer("qkv", (3 * channels * 4) as u64).unwrap();
            let d_position = gpu.storage_buffer("position", 4).unwrap();
            let d_k = gpu.upload("k_cache", &poison).unwrap();
            let d_v = gpu.upload("v_cache", &poison).unwrap();
            let d_scores = gpu.upload("scores", &vec![f32::NAN; num_heads * max_positions]).unwrap();
            let d_out = gpu.storage_buffer("out", (channels * 4) as u64).unwrap();
            let dispatch = attention(
                gpu,
                "decode test",
                shape,
                (&d_qkv).into(),
                (&d_position).into(),
                (&d_k).into(),
                (&d_v).into(),
                (&d_scores).into(),
                (&d_out).into(),
            )
            .unwrap();

            for t in 0..seq_len {
                gpu.write(&d_qkv, 0, &qkv[t * 3 * channels..(t + 1) * 3 * channels]);
                gpu.write(&d_position, 0, &[t as u32]);
                gpu.run("decode test", std::slice::from_ref(&dispatch)).unwrap();
                let got: Vec<f32> = gpu.read(&d_out, 0, channels).unwrap();
                let want = &want_out[t * channels..(t + 1) * channels];
                assert_close(&format!("decode_attention out {case} pos={t}"), &got, want, ATOL, RTOL);
            }

            let got_k: Vec<f32> = gpu.read(&d_k, 0, seq_len * channels).unwrap();
            let got_v: Vec<f32> = gpu.read(&d_v, 0, seq_len * channels).unwrap();
            for t in 0..seq_len {
                for i in 0..channels {
                    let row = t * 3 * channels;
                    let (k, v) = (qkv[row + channels + i], qkv[row + 2 * channels + i]);
                    let index = t * channels + i;
                    assert_eq!(got_k[index], k, "decode_attention k_cache {case} at position {t}, channel {i}");
                    assert_eq!(got_v[index], v, "decode_attention v_cache {case} at position {t}, channel {i}");
                }
            }
        }
    }

    /// The same step twice gives the same bits: every reduction runs in a fixed order.
    #[test]
    fn decode_attention_is_bitwise_repeatable() {
        let Some(gpu) = test_gpu() else { return };
        let (channels, num_heads, max_positions, pos) = (96, 3, 100, 80usize);
        let shape = DecodeShape { channels, num_heads, max_positions };
        let d_k = gpu.upload("k_cache", &random_vec(max_positions * channels, 11)).unwrap();
        let d_v = gpu.upload("v_cache", &random_vec(max_positions * channels, 12)).unwrap();
        let d_qkv = gpu.upload("qkv", &random_vec(3 * channels, 13)).unwrap();
        let d_position = gpu.upload("position", &[pos as u32]).unwrap();
        let d_scores = gpu.storage_buffer("scores", (num_heads * max_positions * 4) as u64).unwrap();
        let d_out = gpu.storage_buffer("out", (channels * 4) as u64).unwrap();
        let dispatch = attention(
            gpu,
            "decode repeat",
            shape,
            (&d_qkv).into(),
            (&d_position).into(),
            (&d_k).into(),
            (&d_v).into(),
            (&d_scores).into(),
            (&d_out).into(),
        )
        .unwrap();
        gpu.run("decode repeat", std::slice::from_ref(&dispatch)).unwrap();
        let first: Vec<f32> = gpu.read(&d_out, 0, channels).unwrap();
        gpu.run("decode repeat", std::slice::from_ref(&dispatch)).unwrap();
        let second: Vec<f32> = gpu.read(&d_out, 0, channels).unwrap();
        for (i, (a, b)) in first.iter().zip(&second).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "decode_attention C={channels} pos={pos}: channel {i} gave {a} then {b}");
        }
    }

    /// Same basis as the matmul tests: with inputs uniform in [-1, 1), a sum over K terms has
    /// magnitude about sqrt(K) / 3, and in-order f32 accumulation adds about eps times the
    /// partial sum per term; the matmul tests measured 1.4e-4 at K = 3072. A missing or doubled
    /// term (about 0.1) fails.
    const MATVEC_ATOL: f64 = 3e-4;
    const MATVEC_RTOL: f64 = 1e-4;

    #[test]
    fn matvec_params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<MatvecParams>() % 16, 0);
    }

    #[test]
    fn matvec_fits_needs_one_aligned_row() {
        let shape = |rows, inner, cols, layout| MatmulShape::new(rows, inner, cols, layout);
        assert!(matvec_fits(&shape(1, 768, 2304, WeightLayout::InOut)));
        assert!(matvec_fits(&shape(1, 768, 50257, WeightLayout::OutIn)), "odd N is fine for (N, K) weights");
        assert!(!matvec_fits(&shape(2, 768, 2304, WeightLayout::InOut)), "two rows");
        assert!(!matvec_fits(&shape(1, 18, 24, WeightLayout::InOut)), "K = 18");
        assert!(!matvec_fits(&shape(1, 16, 6, WeightLayout::InOut)), "N = 6 for (K, N) weights");
    }

    /// Both layouts against the f64 reference, with and without bias, at an output offset:
    /// N that is and is not a multiple of each invocation's outputs, and the GPT-2 small shapes.
    #[test]
    fn matvec_matches_reference() {
        use crate::reference::matmul::{matmul_forward, MatmulDims, WeightLayout as RefLayout};
        let Some(gpu) = test_gpu() else { return };
        let cases = [
            (4, 4, WeightLayout::InOut, RefLayout::InOut),
            (8, 12, WeightLayout::InOut, RefLayout::InOut),
            (48, 144, WeightLayout::InOut, RefLayout::InOut),
            (768, 2304, WeightLayout::InOut, RefLayout::InOut),
            (3072, 768, WeightLayout::InOut, RefLayout::InOut),
            (4, 1, WeightLayout::OutIn, RefLayout::OutIn),
            (48, 7, WeightLayout::OutIn, RefLayout::OutIn),
            (768, 5003, WeightLayout::OutIn, RefLayout::OutIn),
        ];
        for (inner, cols, layout, ref_layout) in cases {
            for (with_bias, out_offset) in [(true, 0usize), (false, 5)] {
                let case = format!("K={inner} N={cols} {layout:?} bias={with_bias} out_offset={out_offset}");
                let seed = (inner * 31 + cols) as u64;
                let inp = random_vec(inner, seed);
                let weight = random_vec(inner * cols, seed + 1);
                let bias = random_vec(cols, seed + 2);
                let d_inp = gpu.upload("inp", &inp).unwrap();
                let d_weight = gpu.upload("weight", &weight).unwrap();
                let d_bias = gpu.upload("bias", &bias).unwrap();
                // NaN everywhere, so a missing store or one outside the range shows.
                let out_len = out_offset + cols + 3;
                let d_out = gpu.upload("out", &vec![f32::NAN; out_len]).unwrap();
                let shape = MatmulShape { out_offset, out_stride: out_offset + cols, ..MatmulShape::new(1, inner, cols, layout) };
                let d_bias_binding = with_bias.then(|| TensorBinding::from(&d_bias));
                let dispatch =
                    matvec(gpu, "matvec test", shape, (&d_inp).into(), (&d_weight).into(), d_bias_binding, (&d_out).into())
                        .unwrap();
                gpu.run("matvec test", std::slice::from_ref(&dispatch)).unwrap();
                let got: Vec<f32> = gpu.read(&d_out, 0, out_len).unwrap();

                let dims = MatmulDims { rows: 1, inner, cols, layout: ref_layout };
                let bias64 = to_f64(&bias);
                let want = matmul_forward(&to_f64(&inp), &to_f64(&weight), with_bias.then_some(&bias64[..]), dims);
                let written = &got[out_offset..out_offset + cols];
                assert_close(&format!("decode_matvec {case}"), written, &want, MATVEC_ATOL, MATVEC_RTOL);
                for (i, value) in got.iter().enumerate() {
                    let inside = (out_offset..out_offset + cols).contains(&i);
                    assert!(inside || value.is_nan(), "decode_matvec {case}: wrote {value} at index {i}, outside the output range");
                }
            }
        }
    }
}
