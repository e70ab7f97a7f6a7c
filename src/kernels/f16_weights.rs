//! Frozen linear weights stored in half precision (`--precision f16`): host-side packing and the
//! products of a frozen layer whose weight the kernels (`shaders/matmul_f16.wgsl`) widen to f32
//! while they multiply. Storage halves; every multiply-add and sum stays f32.
//!
//! # Format
//! A weight (K, N), stored (in, out) as GPT-2's Conv1D weights, is flattened in storage order and
//! each element rounded to the nearest IEEE 754 binary16 value (ties to even). Element e is the
//! low 16 bits of `packed[e / 2]` when e is even and the high 16 bits when it is odd. N must be a
//! multiple of 8, so that each weight row is a whole number of 16-byte words.

use super::matmul::{sized_binding, Kernels, MatmulShape, WeightLayout};
use super::nf4::out_floats;
use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "matmul_f16", source: include_str!("../../shaders/matmul_f16.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 64;
/// Weights per vec4<u32> word the kernels load; N must be a multiple of it.
pub(crate) const WORD_VALUES: usize = 8;
/// Result rows per invocation of the forward, whose columns are one word; must match
/// `FORWARD_ROWS` in the shader.
const FORWARD_ROWS: usize = 16;
/// Result rows and columns per invocation of the input gradient; must match `BACKWARD_ROWS` and
/// `BACKWARD_COLS` in the shader.
const BACKWARD_ROWS: usize = 32;
const BACKWARD_COLS: usize = 8;
const U32_BYTES: u64 = 4;

/// Bindings: params, result, activations (inp or dout), packed weight, bias.
static FORWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "matmul_f16_forward",
    bindings: &[BindingKind::Uniform, BindingKind::ReadWrite, BindingKind::ReadOnly, BindingKind::ReadOnly, BindingKind::ReadOnly],
};
static BACKWARD_INPUT: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "matmul_f16_backward_input",
    bindings: &[BindingKind::Uniform, BindingKind::ReadWrite, BindingKind::ReadOnly, BindingKind::ReadOnly],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&FORWARD, WORKGROUP_SIZE), (&BACKWARD_INPUT, WORKGROUP_SIZE)];

/// Errors from packing a weight in half precision.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum F16Error {
    /// The value count does not match the shape.
    #[error("cannot store a weight of shape ({rows}, {cols}) in f16: it has {len} values, expected {rows} * {cols}")]
    LengthMismatch {
        /// Rows of the requested shape.
        rows: usize,
        /// Columns of the requested shape.
        cols: usize,
        /// Values given.
        len: usize,
    },
    /// The shape is not one the kernels read.
    #[error("cannot store a weight of shape ({rows}, {cols}) in f16: its column count must be a non-zero multiple of {WORD_VALUES}")]
    UnsupportedShape {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// A value is NaN, infinite or beyond the f16 range (65504 in magnitude).
    #[error("cannot store element ({row}, {col}) = {value} in f16: it is not finite or exceeds the f16 range of +-65504")]
    OutOfRange {
        /// Row of the element.
        row: usize,
        /// Column of the element.
        col: usize,
        /// Its value.
        value: f32,
    },
}

/// Rounds a weight (rows, cols), given row-major in storage order, to f16 and packs two values per
/// u32 as the module documentation describes.
///
/// # Errors
/// [`F16Error`] when `values` does not hold rows * cols values, when cols is not a non-zero
/// multiple of [`WORD_VALUES`] or rows is 0, or when a value is not finite in f16.
pub(crate) fn pack(values: &[f32], rows: usize, cols: usize) -> Result<Vec<u32>, F16Error> {
    if rows == 0 || cols == 0 || !cols.is_multiple_of(WORD_VALUES) {
        return Err(F16Error::UnsupportedShape { rows, cols });
    }
    if values.len() != rows * cols {
        return Err(F16Error::LengthMismatch { rows, cols, len: values.len() });
    }
    let half = |index: usize| -> Result<u32, F16Error> {
        let value = values[index];
        let rounded = half::f16::from_f32(value);
        if !rounded.is_finite() {
            return Err(F16Error::OutOfRange { row: index / cols, col: index % cols, value });
        }
        Ok(u32::from(rounded.to_bits()))
    };
    (0..values.len() / 2).map(|word| Ok(half(2 * word)? | (half(2 * word + 1)? << 16))).collect()
}

/// Returns the f32 values of a packed weight in storage order, which the kernels multiply with.
#[cfg(test)]
pub(crate) fn unpack(packed: &[u32]) -> Vec<f32> {
    packed
        .iter()
        .flat_map(|&word| [word & 0xffff, word >> 16].map(|bits| half::f16::from_bits(bits as u16).to_f32()))
        .collect()
}

/// Rounds each value to f16 and back, giving the weight that a `--precision f16` run computes
/// with. Values beyond the f16 range become infinite, which [`pack`] rejects.
#[cfg(test)]
pub(crate) fn round_trip(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
}

/// The weight argument of the launchers: a packed f16 weight (K, N).
#[derive(Clone, Copy, Debug)]
pub(crate) struct F16Weight<'a> {
    /// K.
    pub rows: usize,
    /// N, a multiple of [`WORD_VALUES`].
    pub cols: usize,
    /// (K * N / 2) u32.
    pub packed: TensorBinding<'a>,
}

fn encoded<'a>(weight: &F16Weight<'a>) -> super::matmul::EncodedWeight<'a> {
    super::matmul::EncodedWeight::F16 { packed: weight.packed }
}

/// Uniform parameters, with the field names and order of `F16Params` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct F16Params {
    pub rows: u32,
    pub cols: u32,
    pub inner: u32,
    pub out_stride: u32,
    pub out_offset: u32,
    pub accumulate: u32,
    pub has_bias: u32,
    pub vec4_loads: u32,
}

/// Checks a product against its weight. Every failure is a programming error, as for
/// [`MatmulShape`] in the f32 launchers.
fn check_shape(label: &str, shape: &MatmulShape, weight: &F16Weight<'_>) {
    assert!(
        shape.layout == WeightLayout::InOut,
        "matmul_f16 `{label}`: f16 weights are stored (K, N) like GPT-2's Conv1D weights, so WeightLayout::OutIn \
         is not supported"
    );
    let MatmulShape { rows, inner, cols, out_offset, out_stride, .. } = *shape;
    for (name, dimension) in [("M", rows), ("K", inner), ("N", cols)] {
        assert!(dimension > 0, "matmul_f16 `{label}`: every dimension must be non-zero, got {name}=0 (M={rows} K={inner} N={cols})");
    }
    assert!(
        weight.rows == inner && weight.cols == cols,
        "matmul_f16 `{label}`: the weight is ({}, {}), the product needs (K, N) = ({inner}, {cols})",
        weight.rows,
        weight.cols
    );
    assert!(cols.is_multiple_of(WORD_VALUES), "matmul_f16 `{label}`: N={cols} is not a multiple of {WORD_VALUES}");
    assert!(
        out_offset + cols <= out_stride,
        "matmul_f16 `{label}`: columns {out_offset}..{} do not fit in an output row of stride {out_stride}",
        out_offset + cols
    );
    let needed = (inner * cols / 2) as u64 * U32_BYTES;
    assert!(
        weight.packed.size >= needed,
        "matmul_f16 `{label}`: the packed weight holds {} bytes, ({inner}, {cols}) needs {needed}",
        weight.packed.size
    );
    let largest = out_floats(shape).max(rows * inner).max(inner * cols);
    assert!(u32::try_from(largest).is_ok(), "matmul_f16 `{label}`: {largest} floats exceed u32 indexing");
}

fn params(shape: &MatmulShape, accumulate: bool, has_bias: bool, vec4_loads: bool) -> F16Params {
    F16Params {
        rows: shape.rows as u32,
        cols: shape.cols as u32,
        inner: shape.inner as u32,
        out_stride: shape.out_stride as u32,
        out_offset: shape.out_offset as u32,
        accumulate: u32::from(accumulate),
        has_bias: u32::from(has_bias),
        vec4_loads: u32::from(vec4_loads),
    }
}

/// Creates the dispatch of the forward product
/// `out[m, out_offset + n] = sum_k inp[m, k] * W[k, n] + bias[n]`, which assigns `out`.
///
/// # Shapes
/// - `inp`: (M, K)
/// - `weight`: (K, N) in f16; only [`WeightLayout::InOut`] is supported
/// - `bias`: (N), or `None`
/// - `out`: (M, out_stride), of which columns `out_offset..out_offset + N` are written
///
/// # Panics
/// If the layout is [`WeightLayout::OutIn`], a dimension is zero, the weight's shape is not
/// (K, N), N is not a multiple of 8, the columns do not fit in `out_stride`, or a binding is
/// smaller than its shape.
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    inp: TensorBinding<'_>,
    weight: F16Weight<'_>,
    bias: Option<TensorBinding<'_>>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    forward_with(gpu, label, Kernels::Any, shape, inp, weight, bias, out)
}

/// [`forward`] with the choice of shader.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_with(
    gpu: &Gpu,
    label: &str,
    kernels: Kernels,
    shape: MatmulShape,
    inp: TensorBinding<'_>,
    weight: F16Weight<'_>,
    bias: Option<TensorBinding<'_>>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_shape(label, &shape, &weight);
    if kernels == Kernels::Any {
        if let Some(dispatch) = super::matmul::encoded_subgroup(gpu, label, shape, false, inp, encoded(&weight), bias, out, false)? {
            return Ok(dispatch);
        }
    }
    let MatmulShape { rows, inner, cols, .. } = shape;
    // Activation rows start at multiples of K floats.
    let params = params(&shape, false, bias.is_some(), inner.is_multiple_of(4));
    let inp = sized_binding(label, "inp", inp, rows * inner, true);
    let bias = bias.map_or_else(|| gpu.placeholder(), |b| sized_binding(label, "bias", b, cols, false));
    let out = sized_binding(label, "out", out, out_floats(&shape), false);
    let invocations = rows.div_ceil(FORWARD_ROWS) * (cols / WORD_VALUES);
    let groups = super::grid_1d(gpu, invocations as u64, WORKGROUP_SIZE);
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&params)), &[out, inp, weight.packed, bias], groups)
}

/// Creates the dispatch of the input gradient
/// `dinp[m, k] (+)= sum_n dout[m, out_offset + n] * W[k, n]`, that is `dout @ W^T`. It assigns
/// `dinp`, or adds to it when `accumulate` is true.
///
/// # Shapes
/// - `dout`: (M, out_stride), of which columns `out_offset..out_offset + N` are read
/// - `weight`: (K, N) in f16; only [`WeightLayout::InOut`] is supported
/// - `dinp`: (M, K)
///
/// # Panics
/// As [`forward`].
pub(crate) fn backward_input(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    dout: TensorBinding<'_>,
    weight: F16Weight<'_>,
    dinp: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Dispatch, GpuError> {
    backward_input_with(gpu, label, Kernels::Any, shape, dout, weight, dinp, accumulate)
}

/// [`backward_input`] with the choice of shader.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_input_with(
    gpu: &Gpu,
    label: &str,
    kernels: Kernels,
    shape: MatmulShape,
    dout: TensorBinding<'_>,
    weight: F16Weight<'_>,
    dinp: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Dispatch, GpuError> {
    check_shape(label, &shape, &weight);
    if kernels == Kernels::Any {
        if let Some(dispatch) = super::matmul::encoded_subgroup(gpu, label, shape, true, dout, encoded(&weight), None, dinp, accumulate)? {
            return Ok(dispatch);
        }
    }
    let MatmulShape { rows, inner, .. } = shape;
    // The kernel reads dout in runs of 8 floats from out_offset + a multiple of 8.
    let vec4_loads = shape.out_stride.is_multiple_of(4) && shape.out_offset.is_multiple_of(4);
    let params = params(&shape, accumulate, false, vec4_loads);
    let dout = sized_binding(label, "dout", dout, out_floats(&shape), true);
    let dinp = sized_binding(label, "dinp", dinp, rows * inner, false);
    let invocations = rows.div_ceil(BACKWARD_ROWS) * inner.div_ceil(BACKWARD_COLS);
    let groups = super::grid_1d(gpu, invocations as u64, WORKGROUP_SIZE);
    gpu.dispatch(&BACKWARD_INPUT, label, Some(bytemuck::bytes_of(&params)), &[dinp, dout, weight.packed], groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::nf4::tests::{column_ranges, dims};
    use crate::reference::matmul as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// As for the f32 matmul: inputs uniform in [-1, 1), weights the f16 values the kernel reads,
    /// each result an in-order f32 sum of at most 3072 terms. A missing or doubled term fails.
    const ATOL: f64 = 3e-4;
    const RTOL: f64 = 1e-4;

    /// (M, K, N): M = 1, odd M, GPT-2 tiny's (128 -> 384) and (512 -> 128), K = 7 (scalar
    /// activation loads in the forward, a partial k tile in the input gradient), N = 8 and GPT-2
    /// small's mlp.c_fc (768 -> 3072).
    const SHAPES: [(usize, usize, usize); 7] =
        [(1, 128, 384), (7, 128, 384), (33, 512, 128), (17, 128, 128), (5, 7, 64), (3, 9, 8), (16, 768, 3072)];

    #[test]
    fn pack_rounds_to_nearest_and_orders_halves() {
        // 1 + 2^-11 lies halfway between 1 and the next f16 (1 + 2^-10): ties go to even, so 1.
        let tie = 1.0 + 2f32.powi(-11);
        let values = [1.0, -2.0, tie, 65504.0, 6.0e-8, -0.0, 0.1, 3.0];
        let packed = pack(&values, 1, 8).unwrap();
        assert_eq!(packed.len(), 4, "two values per word");
        assert_eq!(packed[0], 0xc000_3c00, "word 0 (1.0 low, -2.0 high): {:#010x}", packed[0]);
        assert_eq!(packed[1] & 0xffff, 0x3c00, "the tie {tie} rounds to even (1.0)");
        assert_eq!(packed[1] >> 16, 0x7bff, "65504 is the largest finite f16");
        assert_eq!(packed[2] & 0xffff, 0x0001, "6e-8 is the smallest subnormal f16");
        assert_eq!(packed[2] >> 16, 0x8000, "-0.0 keeps its sign");
        let restored = unpack(&packed);
        assert_eq!(restored, round_trip(&values), "unpack returns the rounded values in storage order");
        assert_eq!(restored[6], 0.099_975_586, "0.1 in f16");
    }

    #[test]
    fn round_trip_error_within_half_an_ulp() {
        let values: Vec<f32> = random_vec(4096, 5).iter().enumerate().map(|(i, v)| v * 10f32.powi((i % 6) as i32 - 3)).collect();
        for (index, (&value, &got)) in values.iter().zip(&round_trip(&values)).enumerate() {
            // Normal f16 values keep 11 significant bits; below 2^-14 the spacing is 2^-24.
            let bound = (value.abs() * 2f32.powi(-11)).max(2f32.powi(-25));
            assert!((got - value).abs() <= bound, "element {index}: {value} rounded to {got}, error above {bound}");
        }
    }

    #[test]
    fn pack_rejects_invalid_input() {
        let error = pack(&[0.0; 30], 3, 10).unwrap_err();
        assert!(matches!(error, F16Error::UnsupportedShape { rows: 3, cols: 10 }), "cols 10: {error:?}");
        assert!(error.to_string().contains("(3, 10)"), "message does not name the shape: {error}");
        let error = pack(&[0.0; 20], 2, 8).unwrap_err();
        assert!(matches!(error, F16Error::LengthMismatch { rows: 2, cols: 8, len: 20 }), "20 values: {error:?}");
        let mut values = vec![0.5; 16];
        values[8 + 5] = 70000.0;
        let error = pack(&values, 2, 8).unwrap_err();
        assert!(matches!(error, F16Error::OutOfRange { row: 1, col: 5, .. }), "70000 at (1, 5): {error:?}");
        assert!(error.to_string().contains("(1, 5) = 70000"), "message does not name the element: {error}");
        values[13] = f32::NAN;
        assert!(matches!(pack(&values, 2, 8), Err(F16Error::OutOfRange { row: 1, col: 5, .. })), "NaN at (1, 5)");
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<F16Params>() % 16, 0);
    }

    fn upload<T: bytemuck::Pod>(gpu: &Gpu, label: &str, data: &[T]) -> wgpu::Buffer {
        gpu.upload(label, data).expect("test buffers fit the adapter's limits")
    }

    fn read(gpu: &Gpu, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
        gpu.read(buffer, 0, len).expect("read-back succeeds")
    }

    fn weight(packed: &wgpu::Buffer, inner: usize, cols: usize) -> F16Weight<'_> {
        F16Weight { rows: inner, cols, packed: packed.into() }
    }

    fn describe(kind: &str, shape: &MatmulShape, flag: &str) -> String {
        let MatmulShape { rows, inner, cols, out_offset, out_stride, .. } = *shape;
        format!("matmul_f16 {kind} M={rows} K={inner} N={cols} columns {out_offset}..{} of {out_stride} {flag}", out_offset + cols)
    }

    /// Runs the forward into an output that contains random values and compares its column range
    /// with the f64 product of the f16 weight, and every other column with its old value.
    fn check_forward(gpu: &Gpu, kernels: Kernels, shape: MatmulShape, values: &[f32], with_bias: bool, seed: u64) {
        let MatmulShape { rows, inner, cols, out_offset, out_stride, .. } = shape;
        let description = describe("forward", &shape, &format!("bias={with_bias} {kernels:?}"));
        let packed = pack(values, inner, cols).unwrap();
        let inp = random_vec(rows * inner, seed);
        let bias = random_vec(cols, seed + 1);
        let initial = random_vec(rows * out_stride, seed + 2);
        let (packed_buffer, inp_buffer) = (upload(gpu, "weight", &packed), upload(gpu, "inp", &inp));
        let (bias_buffer, out_buffer) = (upload(gpu, "bias", &bias), upload(gpu, "out", &initial));
        let bias_binding = with_bias.then(|| (&bias_buffer).into());
        let packed_weight = weight(&packed_buffer, inner, cols);
        let dispatch = forward_with(gpu, &description, kernels, shape, (&inp_buffer).into(), packed_weight, bias_binding, (&out_buffer).into()).unwrap();
        gpu.run("matmul_f16 test", &[dispatch]).expect("the test dispatch runs");
        let got = read(gpu, &out_buffer, rows * out_stride);

        let bias64 = to_f64(&bias);
        let want = reference::matmul_forward(&to_f64(&inp), &to_f64(&unpack(&packed)), with_bias.then_some(&bias64[..]), dims(&shape));
        let range: Vec<f32> = got.chunks(out_stride).flat_map(|row| row[out_offset..out_offset + cols].iter().copied()).collect();
        assert_close(&description, &range, &want, ATOL, RTOL);
        for (index, (&after, &before)) in got.iter().zip(&initial).enumerate() {
            let col = index % out_stride;
            if col < out_offset || col >= out_offset + cols {
                assert_eq!(after.to_bits(), before.to_bits(), "{description}: wrote outside its columns at ({}, {col})", index / out_stride);
            }
        }
    }

    /// Runs the input gradient into a dinp that contains random values and compares it with the
    /// f64 product of the f16 weight, plus the old values when accumulating.
    fn check_backward_input(gpu: &Gpu, kernels: Kernels, shape: MatmulShape, values: &[f32], accumulate: bool, seed: u64) {
        let MatmulShape { rows, inner, cols, out_offset, out_stride, .. } = shape;
        let description = describe("backward_input", &shape, &format!("accumulate={accumulate} {kernels:?}"));
        let packed = pack(values, inner, cols).unwrap();
        let dout = random_vec(rows * out_stride, seed);
        let initial = random_vec(rows * inner, seed + 1);
        let (packed_buffer, dout_buffer, dinp_buffer) = (upload(gpu, "weight", &packed), upload(gpu, "dout", &dout), upload(gpu, "dinp", &initial));
        let dispatch = backward_input_with(
            gpu,
            &description,
            kernels,
            shape,
            (&dout_buffer).into(),
            weight(&packed_buffer, inner, cols),
            (&dinp_buffer).into(),
            accumulate,
        )
        .unwrap();
        gpu.run("matmul_f16 test", &[dispatch]).expect("the test dispatch runs");
        let got = read(gpu, &dinp_buffer, rows * inner);

        let range: Vec<f32> = dout.chunks(out_stride).flat_map(|row| row[out_offset..out_offset + cols].iter().copied()).collect();
        let mut want = reference::matmul_backward_input(&to_f64(&range), &to_f64(&unpack(&packed)), dims(&shape));
        if accumulate {
            for (w, &i) in want.iter_mut().zip(&initial) {
                *w += f64::from(i);
            }
        }
        assert_close(&description, &got, &want, ATOL, RTOL);
    }

    #[test]
    fn f16_forward_matches_reference() {
        let Some(gpu) = test_gpu().filter(|gpu| gpu.half_floats()) else { return };
        for (i, &(rows, inner, cols)) in SHAPES.iter().enumerate() {
            let values = random_vec(inner * cols, 1000 + i as u64);
            for (j, shape) in column_ranges(rows, inner, cols).into_iter().enumerate() {
                for (with_bias, kernels) in [(true, Kernels::Any), (false, Kernels::Any), (true, Kernels::Blocked), (false, Kernels::Blocked)] {
                    check_forward(gpu, kernels, shape, &values, with_bias, 1100 + 10 * i as u64 + j as u64);
                }
            }
        }
    }

    #[test]
    fn f16_backward_input_matches_reference() {
        let Some(gpu) = test_gpu().filter(|gpu| gpu.half_floats()) else { return };
        for (i, &(rows, inner, cols)) in SHAPES.iter().enumerate() {
            let values = random_vec(inner * cols, 2000 + i as u64);
            for (j, shape) in column_ranges(rows, inner, cols).into_iter().enumerate() {
                for (accumulate, kernels) in [(false, Kernels::Any), (true, Kernels::Any), (false, Kernels::Blocked), (true, Kernels::Blocked)] {
                    check_backward_input(gpu, kernels, shape, &values, accumulate, 2100 + 10 * i as u64 + j as u64);
                }
            }
        }
    }

    #[test]
    fn f16_results_are_bitwise_reproducible() {
        let Some(gpu) = test_gpu().filter(|gpu| gpu.half_floats()) else { return };
        let shape = MatmulShape::new(37, 128, 192, WeightLayout::InOut);
        let packed = upload(gpu, "weight", &pack(&random_vec(128 * 192, 3000), 128, 192).unwrap());
        let inp = upload(gpu, "inp", &random_vec(37 * 128, 3001));
        let dout = upload(gpu, "dout", &random_vec(37 * 192, 3002));
        let mut runs = Vec::new();
        for _ in 0..2 {
            let out = gpu.storage_buffer("out", (37 * 192 * 4) as u64).unwrap();
            let dinp = gpu.storage_buffer("dinp", (37 * 128 * 4) as u64).unwrap();
            let dispatches = [
                forward(gpu, "forward", shape, (&inp).into(), weight(&packed, 128, 192), None, (&out).into()).unwrap(),
                backward_input(gpu, "backward_input", shape, (&dout).into(), weight(&packed, 128, 192), (&dinp).into(), false).unwrap(),
            ];
            gpu.run("matmul_f16 reproducibility", &dispatches).unwrap();
            let bits = |values: Vec<f32>| values.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            runs.push((bits(read(gpu, &out, 37 * 192)), bits(read(gpu, &dinp, 37 * 128))));
        }
        assert_eq!(runs[0].0.iter().zip(&runs[1].0).position(|(a, b)| a != b), None, "forward differs between two runs at that index");
        assert_eq!(runs[0].1.iter().zip(&runs[1].1).position(|(a, b)| a != b), None, "backward_input differs between two runs at that index");
    }

    /// The f16 tests above exercise the subgroup products only if the launchers pick them: on an
    /// adapter whose subgroups fit, aligned products (including a column range of a wider output)
    /// must use them, and unaligned ones must not.
    #[test]
    fn f16_subgroup_chosen_where_it_applies() {
        use crate::kernels::matmul::encoded_subgroup;
        let Some(gpu) = test_gpu().filter(|gpu| gpu.half_floats()) else { return };
        let expected = crate::kernels::matmul::subgroup_products_chosen(gpu, false).unwrap();
        let packed = upload(gpu, "weight", &pack(&random_vec(128 * 192, 4000), 128, 192).unwrap());
        let act = upload(gpu, "activations", &random_vec(40 * 384, 4001));
        let result = gpu.storage_buffer("result", (40 * 384 * 4) as u64).unwrap();
        let aligned = MatmulShape { out_offset: 192, out_stride: 384, ..MatmulShape::new(40, 128, 192, WeightLayout::InOut) };
        let chosen = encoded_subgroup(gpu, "aligned", aligned, false, (&act).into(), encoded(&weight(&packed, 128, 192)), None, (&result).into(), false).unwrap();
        assert_eq!(chosen.is_some(), expected, "aligned forward on {}", gpu.describe());
        let odd = MatmulShape::new(40, 7, 8, WeightLayout::InOut);
        let chosen = encoded_subgroup(gpu, "odd K", odd, false, (&act).into(), encoded(&weight(&packed, 7, 8)), None, (&result).into(), false).unwrap();
        assert!(chosen.is_none(), "K=7 cannot use vec4 loads");
    }
}
