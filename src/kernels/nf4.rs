//! 4-bit NormalFloat (NF4) weights for QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning
//! of Quantized LLMs"): host-side quantisation and the products of a frozen linear layer whose
//! weight the kernels (`shaders/matmul_nf4.wgsl`) dequantise while they multiply.
//!
//! # Format
//! A weight (K, N), stored (in, out) as GPT-2's Conv1D weights, is flattened in storage order and
//! cut into blocks of [`BLOCK_SIZE`] consecutive elements, one f32 scale (the block's absmax)
//! each. N must be a multiple of [`BLOCK_SIZE`], so every block is 64 columns of one row. Each
//! element v becomes the index of the code in [`NF4_CODES`] nearest to `v / absmax`. An element
//! exactly at the f32 midpoint of two neighbouring codes takes the lower code (the one nearer
//! -1). A block whose absmax is 0 gets code 7 (exactly 0) everywhere. Dequantisation is
//! `NF4_CODES[code] * scale`.
//!
//! Packing: element e is bits `4 * (e % 8) .. 4 * (e % 8) + 3` of `packed[e / 8]`, so in the
//! little-endian bytes of a word the low nibble of each byte comes first.
//!
//! # Double quantisation
//! Optionally the block scales are quantised too, as the QLoRA paper does with 8-bit floats; this
//! module uses symmetric 8-bit integers instead: the mean of all block scales of the weight is
//! subtracted, and each group of [`GROUP_BLOCKS`] blocks stores one f32 step (the group's largest
//! `|scale - mean|` divided by 127) and one i8 code per block,
//! `scale = mean + code * step`. The codes are chosen against the exact absmax, as without double
//! quantisation, so the two modes store the same 4-bit codes.
//!
//! Memory per weight: 4 bits of code plus 32 / 64 = 0.5 bits of scale (4.5 bits), or with double
//! quantisation 8 / 64 + 32 / (64 * 256) = 0.127 bits of scale (about 4.127 bits), plus one f32
//! mean per matrix.

use super::matmul::{sized_binding, EncodedWeight, Kernels, MatmulShape, WeightLayout};
use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "matmul_nf4", source: include_str!("../../shaders/matmul_nf4.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 64;
/// Weights per quantisation block, each with one scale; must match `BLOCK_SIZE` in the shader.
pub(crate) const BLOCK_SIZE: usize = 64;
/// Block scales per double-quantisation group, each group with one f32 step; must match
/// `GROUP_BLOCKS` in the shader.
pub(crate) const GROUP_BLOCKS: usize = 256;
/// 4-bit codes in one packed u32.
const WORD_CODES: usize = 8;
/// Result rows per invocation of the forward, whose columns are one packed word; must match
/// `FORWARD_ROWS` in the shader.
const FORWARD_ROWS: usize = 16;
/// Result rows and columns per invocation of the input gradient; must match `BACKWARD_ROWS` and
/// `BACKWARD_COLS` in the shader.
const BACKWARD_ROWS: usize = 32;
const BACKWARD_COLS: usize = 8;
/// Index of the code 0.0 in [`NF4_CODES`].
const ZERO_CODE: u8 = 7;
/// Largest magnitude of an 8-bit code of a double-quantised scale.
const SCALE_CODE_MAX: f64 = 127.0;
const F32_BYTES: u64 = 4;

/// The 16 NF4 code values in code order: quantiles of the standard normal distribution scaled to
/// [-1, 1], 7 below zero, an exact zero and 8 above, as defined in the QLoRA paper. These are the
/// f32 values of the bitsandbytes table. `shaders/matmul_nf4.wgsl` has the same table, which a
/// test checks.
pub(crate) const NF4_CODES: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Bindings: params, result, activations (inp or dout), packed codes, scales, scale steps, bias.
static FORWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "matmul_nf4_forward",
    bindings: &[
        BindingKind::Uniform,
        BindingKind::ReadWrite,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
    ],
};
static BACKWARD_INPUT: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "matmul_nf4_backward_input",
    bindings: &[
        BindingKind::Uniform,
        BindingKind::ReadWrite,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
    ],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&FORWARD, WORKGROUP_SIZE), (&BACKWARD_INPUT, WORKGROUP_SIZE)];

/// Errors from quantising a weight to NF4.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum Nf4Error {
    /// The value count does not match the shape.
    #[error("cannot quantise a weight of shape ({rows}, {cols}) to NF4: it has {len} values, expected {rows} * {cols}")]
    LengthMismatch {
        /// Rows of the requested shape.
        rows: usize,
        /// Columns of the requested shape.
        cols: usize,
        /// Values given.
        len: usize,
    },
    /// The shape has no elements, or its column count is not a multiple of the block size.
    #[error(
        "cannot quantise a weight of shape ({rows}, {cols}) to NF4: the column count must be a non-zero multiple \
         of {BLOCK_SIZE}, so that every {BLOCK_SIZE}-element block lies in one row. GPT-2's Conv1D weights \
         qualify; keep this weight in f32"
    )]
    UnsupportedShape {
        /// Rows of the weight.
        rows: usize,
        /// Columns of the weight.
        cols: usize,
    },
    /// The weight has more elements than the kernels can index with u32.
    #[error("cannot quantise a weight of shape ({rows}, {cols}) to NF4: its {rows} * {cols} elements exceed the u32 indexing of the kernels ({max} elements)")]
    TooLarge {
        /// Rows of the weight.
        rows: usize,
        /// Columns of the weight.
        cols: usize,
        /// The largest element count.
        max: u64,
    },
    /// An element is NaN or infinite.
    #[error("cannot quantise a weight of shape ({rows}, {cols}) to NF4: element ({row}, {col}) is {value}, and NF4 needs finite values")]
    NonFinite {
        /// Rows of the weight.
        rows: usize,
        /// Columns of the weight.
        cols: usize,
        /// Row of the element.
        row: usize,
        /// Column of the element.
        col: usize,
        /// The value.
        value: f32,
    },
}

/// Block scales of an [`Nf4Matrix`].
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Nf4Scales {
    /// One f32 absmax per block.
    Full(Vec<f32>),
    /// Scales quantised to 8 bits.
    Double(DoubleQuantScales),
}

/// Double-quantised block scales: block b has the scale `mean + codes[b] * steps[b / GROUP_BLOCKS]`.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct DoubleQuantScales {
    /// Mean of the absmax of every block of the matrix.
    pub mean: f32,
    /// One code per block, in -127..=127.
    pub codes: Vec<i8>,
    /// Step of each group of [`GROUP_BLOCKS`] blocks: the group's largest `|absmax - mean|` / 127,
    /// or 0 when every block of the group has the scale `mean`.
    pub steps: Vec<f32>,
}

impl DoubleQuantScales {
    /// Returns the dequantised scale of `block`, computed as the kernels compute it (up to the
    /// fusion of the multiply-add, which a GPU compiler may do).
    #[allow(dead_code)]
    fn scale(&self, block: usize) -> f32 {
        self.mean + f32::from(self.codes[block]) * self.steps[block / GROUP_BLOCKS]
    }

    /// Packs the codes four per u32 as the kernels read them: code b is byte `b % 4` (bits
    /// `8 * (b % 4)` up) of word `b / 4`.
    pub(crate) fn packed_codes(&self) -> Vec<u32> {
        self.codes
            .chunks(4)
            .map(|chunk| {
                chunk.iter().enumerate().fold(0u32, |word, (i, &code)| word | (u32::from(code as u8) << (8 * i)))
            })
            .collect()
    }
}

/// A weight (rows, cols) = (K, N) in NF4, laid out as the module documentation describes.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Nf4Matrix {
    /// K, rows of the weight: its input features.
    pub rows: usize,
    /// N, columns of the weight: its output features, a multiple of [`BLOCK_SIZE`].
    pub cols: usize,
    /// (rows * cols / 8) words of eight 4-bit codes.
    pub packed: Vec<u32>,
    /// (rows * cols / 64) block scales.
    pub scales: Nf4Scales,
}

impl Nf4Matrix {
    /// Number of quantisation blocks.
    #[allow(dead_code)]
    pub fn blocks(&self) -> usize {
        self.rows * self.cols / BLOCK_SIZE
    }

    /// Returns the 4-bit code of element `index` in storage order.
    #[allow(dead_code)]
    pub fn code(&self, index: usize) -> u8 {
        ((self.packed[index / WORD_CODES] >> (4 * (index % WORD_CODES))) & 0xf) as u8
    }

    /// Returns the scale of block `block`, dequantised when the scales are double-quantised.
    #[allow(dead_code)]
    pub fn block_scale(&self, block: usize) -> f32 {
        match &self.scales {
            Nf4Scales::Full(scales) => scales[block],
            Nf4Scales::Double(double) => double.scale(block),
        }
    }

    /// Bytes of the device buffers that [`Nf4Matrix::upload`] creates, before their padding to 16
    /// bytes. The double-quantisation mean travels in the kernels' uniform parameters.
    pub fn device_bytes(&self) -> u64 {
        let packed = self.packed.len() as u64 * F32_BYTES;
        let scales = match &self.scales {
            Nf4Scales::Full(scales) => scales.len() as u64 * F32_BYTES,
            Nf4Scales::Double(double) => {
                double.codes.len().div_ceil(4) as u64 * F32_BYTES + double.steps.len() as u64 * F32_BYTES
            }
        };
        packed + scales
    }

    /// Device bits per weight element: codes and scales.
    #[allow(dead_code)]
    pub fn bits_per_weight(&self) -> f64 {
        (self.device_bytes() * 8) as f64 / (self.rows * self.cols) as f64
    }

    /// Creates the device buffers of the weight, labelled `label` plus the part's name.
    pub fn upload(&self, gpu: &Gpu, label: &str) -> Result<Nf4Buffers, GpuError> {
        let packed = gpu.upload(&format!("{label} nf4 codes"), &self.packed)?;
        let (scales, scale_steps, scale_mean) = match &self.scales {
            Nf4Scales::Full(scales) => (gpu.upload(&format!("{label} nf4 scales"), scales)?, None, 0.0),
            Nf4Scales::Double(double) => (
                gpu.upload(&format!("{label} nf4 scale codes"), &double.packed_codes())?,
                Some(gpu.upload(&format!("{label} nf4 scale steps"), &double.steps)?),
                double.mean,
            ),
        };
        Ok(Nf4Buffers { rows: self.rows, cols: self.cols, packed, scales, scale_steps, scale_mean })
    }
}

/// Device buffers of an [`Nf4Matrix`].
pub(crate) struct Nf4Buffers {
    /// K.
    pub rows: usize,
    /// N.
    pub cols: usize,
    /// (K * N / 8) u32 of codes.
    pub packed: wgpu::Buffer,
    /// (K * N / 64) f32 scales, or (ceil(K * N / 64 / 4)) u32 of 8-bit scale codes.
    pub scales: wgpu::Buffer,
    /// (ceil(K * N / 64 / 256)) f32 steps when the scales are double-quantised.
    pub scale_steps: Option<wgpu::Buffer>,
    /// The mean added back to double-quantised scales; 0 otherwise.
    pub scale_mean: f32,
}

impl Nf4Buffers {
    /// Binds the whole buffers.
    pub fn weight(&self) -> Nf4Weight<'_> {
        Nf4Weight {
            rows: self.rows,
            cols: self.cols,
            packed: (&self.packed).into(),
            scales: (&self.scales).into(),
            double_quant: self
                .scale_steps
                .as_ref()
                .map(|steps| DoubleQuantBinding { steps: steps.into(), mean: self.scale_mean }),
        }
    }
}

/// The weight argument of the NF4 launchers: the bindings of an [`Nf4Matrix`] (K, N).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Nf4Weight<'a> {
    /// K.
    pub rows: usize,
    /// N, a multiple of [`BLOCK_SIZE`].
    pub cols: usize,
    /// (K * N / 8) u32 of codes.
    pub packed: TensorBinding<'a>,
    /// (K * N / 64) f32 scales, or with double quantisation (ceil(K * N / 64 / 4)) u32 of codes.
    pub scales: TensorBinding<'a>,
    /// Present when the scales are double-quantised.
    pub double_quant: Option<DoubleQuantBinding<'a>>,
}

/// The data that decodes double-quantised scales.
#[derive(Clone, Copy, Debug)]
pub(crate) struct DoubleQuantBinding<'a> {
    /// (ceil(K * N / 64 / 256)) f32 steps, one per group of [`GROUP_BLOCKS`] blocks.
    pub steps: TensorBinding<'a>,
    /// Mean of all block scales.
    pub mean: f32,
}

/// Index of the code in [`NF4_CODES`] nearest to `x` in [-1, 1]. `x` exactly at the f32 midpoint
/// of two neighbouring codes takes the lower one.
fn nearest_code(x: f32) -> u8 {
    let above = NF4_CODES.windows(2).filter(|pair| 0.5 * (pair[0] + pair[1]) < x).count();
    above as u8
}

/// Quantises a weight (rows, cols), given row-major in storage order, to NF4, with 8-bit block
/// scales when `double_quant` is true. The module documentation describes the format.
///
/// # Errors
/// [`Nf4Error`] when `values` does not hold rows * cols values, when cols is not a non-zero
/// multiple of [`BLOCK_SIZE`] or rows is 0, when the element count exceeds u32, or when a value
/// is not finite.
pub(crate) fn quantize(values: &[f32], rows: usize, cols: usize, double_quant: bool) -> Result<Nf4Matrix, Nf4Error> {
    if rows == 0 || cols == 0 || !cols.is_multiple_of(BLOCK_SIZE) {
        return Err(Nf4Error::UnsupportedShape { rows, cols });
    }
    let elements = rows.checked_mul(cols).filter(|&n| u32::try_from(n).is_ok());
    let Some(elements) = elements else {
        return Err(Nf4Error::TooLarge { rows, cols, max: u64::from(u32::MAX) });
    };
    if values.len() != elements {
        return Err(Nf4Error::LengthMismatch { rows, cols, len: values.len() });
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        return Err(Nf4Error::NonFinite { rows, cols, row: index / cols, col: index % cols, value: values[index] });
    }

    let mut packed = vec![0u32; elements / WORD_CODES];
    let mut absmax = Vec::with_capacity(elements / BLOCK_SIZE);
    for (block, chunk) in values.chunks_exact(BLOCK_SIZE).enumerate() {
        let scale = chunk.iter().fold(0.0f32, |max, v| max.max(v.abs()));
        absmax.push(scale);
        for (i, &value) in chunk.iter().enumerate() {
            let code = if scale == 0.0 { ZERO_CODE } else { nearest_code(value / scale) };
            let index = block * BLOCK_SIZE + i;
            packed[index / WORD_CODES] |= u32::from(code) << (4 * (index % WORD_CODES));
        }
    }
    let scales = if double_quant { Nf4Scales::Double(quantize_scales(&absmax)) } else { Nf4Scales::Full(absmax) };
    Ok(Nf4Matrix { rows, cols, packed, scales })
}

/// Quantises block scales to 8 bits: subtract the mean of all scales, then one symmetric step per
/// group of [`GROUP_BLOCKS`] scales. Codes round half away from zero.
fn quantize_scales(scales: &[f32]) -> DoubleQuantScales {
    let mean = (scales.iter().map(|&s| f64::from(s)).sum::<f64>() / scales.len() as f64) as f32;
    let mut codes = Vec::with_capacity(scales.len());
    let mut steps = Vec::with_capacity(scales.len().div_ceil(GROUP_BLOCKS));
    for group in scales.chunks(GROUP_BLOCKS) {
        let deviation = group.iter().fold(0.0f64, |max, &s| max.max((f64::from(s) - f64::from(mean)).abs()));
        let step = (deviation / SCALE_CODE_MAX) as f32;
        steps.push(step);
        for &scale in group {
            let code = if step == 0.0 {
                0.0
            } else {
                ((f64::from(scale) - f64::from(mean)) / f64::from(step)).round().clamp(-SCALE_CODE_MAX, SCALE_CODE_MAX)
            };
            codes.push(code as i8);
        }
    }
    DoubleQuantScales { mean, codes, steps }
}

/// Returns the f32 weight (rows, cols) that `matrix` encodes, element by element as the kernels
/// compute it: `NF4_CODES[code] * scale`.
// NOTE: outside the tests only the QLoRA merge reads NF4 weights back, with full scales; the
// inspection methods above keep their allows for that reason.
pub(crate) fn dequantize(matrix: &Nf4Matrix) -> Vec<f32> {
    (0..matrix.rows * matrix.cols)
        .map(|index| NF4_CODES[usize::from(matrix.code(index))] * matrix.block_scale(index / BLOCK_SIZE))
        .collect()
}

/// Uniform parameters, with the field names and order of `Nf4Params` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Nf4Params {
    pub rows: u32,
    pub cols: u32,
    pub inner: u32,
    pub out_stride: u32,
    pub out_offset: u32,
    pub accumulate: u32,
    pub has_bias: u32,
    pub vec4_loads: u32,
    pub double_quant: u32,
    pub scale_mean: f32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// Checks a product against its NF4 weight. Every failure is a programming error, as for
/// [`MatmulShape`] in the f32 launchers.
fn check_shape(label: &str, shape: &MatmulShape, weight_rows: usize, weight_cols: usize) {
    assert!(
        shape.layout == WeightLayout::InOut,
        "matmul_nf4 `{label}`: NF4 weights are stored (K, N) like GPT-2's Conv1D weights, so WeightLayout::OutIn \
         is not supported"
    );
    let MatmulShape { rows, inner, cols, out_offset, out_stride, .. } = *shape;
    assert!(
        rows > 0 && inner > 0 && cols > 0,
        "matmul_nf4 `{label}`: every dimension must be non-zero, got M={rows} K={inner} N={cols}"
    );
    assert!(
        weight_rows == inner && weight_cols == cols,
        "matmul_nf4 `{label}`: the weight is ({weight_rows}, {weight_cols}), the product needs (K, N) = ({inner}, {cols})"
    );
    assert!(cols.is_multiple_of(BLOCK_SIZE), "matmul_nf4 `{label}`: N={cols} is not a multiple of {BLOCK_SIZE}");
    assert!(
        out_offset + cols <= out_stride,
        "matmul_nf4 `{label}`: columns {out_offset}..{} do not fit in an output row of stride {out_stride}",
        out_offset + cols
    );
    // Every flat index the shader computes must fit in u32.
    let largest = out_floats(shape).max(rows * inner).max(inner * cols);
    assert!(u32::try_from(largest).is_ok(), "matmul_nf4 `{label}`: {largest} floats exceed u32 indexing");
}

/// Floats that `out`/`dout` must hold: the last row ends at column `out_offset + cols`.
pub(crate) fn out_floats(shape: &MatmulShape) -> usize {
    (shape.rows - 1) * shape.out_stride + shape.out_offset + shape.cols
}

/// Checks that a binding read as `array<u32>` or `array<f32>` has room for `words` elements.
fn check_words(label: &str, name: &str, binding: &TensorBinding<'_>, words: usize) {
    let needed = words as u64 * F32_BYTES;
    assert!(
        binding.size >= needed,
        "matmul_nf4 `{label}`: binding `{name}` holds {} bytes, the weight needs {needed} ({words} words)",
        binding.size
    );
}

/// Checks the sizes of the weight's bindings and returns them in shader order: codes, scales,
/// scale steps.
fn weight_bindings<'a>(gpu: &'a Gpu, label: &str, weight: &Nf4Weight<'a>) -> [TensorBinding<'a>; 3] {
    let elements = weight.rows * weight.cols;
    let blocks = elements / BLOCK_SIZE;
    check_words(label, "nf4 codes", &weight.packed, elements / WORD_CODES);
    match &weight.double_quant {
        None => {
            check_words(label, "nf4 scales", &weight.scales, blocks);
            [weight.packed, weight.scales, gpu.placeholder()]
        }
        Some(double) => {
            check_words(label, "nf4 scale codes", &weight.scales, blocks.div_ceil(4));
            check_words(label, "nf4 scale steps", &double.steps, blocks.div_ceil(GROUP_BLOCKS));
            [weight.packed, weight.scales, double.steps]
        }
    }
}

/// Wraps the weight and its checked bindings as the subgroup products take them.
fn encoded<'a>(weight: &Nf4Weight<'a>, [packed, scales, steps]: [TensorBinding<'a>; 3]) -> EncodedWeight<'a> {
    EncodedWeight::Nf4 {
        packed,
        scales,
        steps,
        double_quant: weight.double_quant.is_some(),
        scale_mean: weight.double_quant.map_or(0.0, |double| double.mean),
    }
}

fn params(shape: &MatmulShape, weight: &Nf4Weight<'_>, accumulate: bool, has_bias: bool, vec4_loads: bool) -> Nf4Params {
    Nf4Params {
        rows: shape.rows as u32,
        cols: shape.cols as u32,
        inner: shape.inner as u32,
        out_stride: shape.out_stride as u32,
        out_offset: shape.out_offset as u32,
        accumulate: u32::from(accumulate),
        has_bias: u32::from(has_bias),
        vec4_loads: u32::from(vec4_loads),
        double_quant: u32::from(weight.double_quant.is_some()),
        scale_mean: weight.double_quant.map_or(0.0, |double| double.mean),
        _pad0: 0,
        _pad1: 0,
    }
}

/// Creates the dispatch of the forward product
/// `out[m, out_offset + n] = sum_k inp[m, k] * deq(W)[k, n] + bias[n]`, which assigns `out`.
///
/// # Shapes
/// - `inp`: (M, K)
/// - `weight`: (K, N) in NF4; only [`WeightLayout::InOut`] is supported
/// - `bias`: (N), or `None`
/// - `out`: (M, out_stride), of which columns `out_offset..out_offset + N` are written
///
/// # Panics
/// If the layout is [`WeightLayout::OutIn`], a dimension is zero, the weight's shape is not
/// (K, N), the columns do not fit in `out_stride`, or a binding is smaller than its shape.
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    inp: TensorBinding<'_>,
    weight: Nf4Weight<'_>,
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
    weight: Nf4Weight<'_>,
    bias: Option<TensorBinding<'_>>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_shape(label, &shape, weight.rows, weight.cols);
    let [packed, scales, steps] = weight_bindings(gpu, label, &weight);
    if kernels == Kernels::Any {
        let encoded = encoded(&weight, [packed, scales, steps]);
        if let Some(dispatch) = super::matmul::encoded_subgroup(gpu, label, shape, false, inp, encoded, bias, out, false)? {
            return Ok(dispatch);
        }
    }
    let MatmulShape { rows, inner, cols, .. } = shape;
    // Activation rows start at multiples of K floats.
    let vec4_loads = inner.is_multiple_of(4);
    let params = params(&shape, &weight, false, bias.is_some(), vec4_loads);
    let inp = sized_binding(label, "inp", inp, rows * inner, true);
    let bias = bias.map_or_else(|| gpu.placeholder(), |b| sized_binding(label, "bias", b, cols, false));
    let out = sized_binding(label, "out", out, out_floats(&shape), false);
    let invocations = rows.div_ceil(FORWARD_ROWS) * (cols / WORD_CODES);
    let groups = super::grid_1d(gpu, invocations as u64, WORKGROUP_SIZE);
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&params)), &[out, inp, packed, scales, steps, bias], groups)
}

/// Creates the dispatch of the input gradient
/// `dinp[m, k] (+)= sum_n dout[m, out_offset + n] * deq(W)[k, n]`, that is `dout @ deq(W)^T`.
/// It assigns `dinp`, or adds to it when `accumulate` is true.
///
/// # Shapes
/// - `dout`: (M, out_stride), of which columns `out_offset..out_offset + N` are read
/// - `weight`: (K, N) in NF4; only [`WeightLayout::InOut`] is supported
/// - `dinp`: (M, K)
///
/// # Panics
/// As [`forward`].
pub(crate) fn backward_input(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    dout: TensorBinding<'_>,
    weight: Nf4Weight<'_>,
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
    weight: Nf4Weight<'_>,
    dinp: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Dispatch, GpuError> {
    check_shape(label, &shape, weight.rows, weight.cols);
    let [packed, scales, steps] = weight_bindings(gpu, label, &weight);
    if kernels == Kernels::Any {
        let encoded = encoded(&weight, [packed, scales, steps]);
        if let Some(dispatch) = super::matmul::encoded_subgroup(gpu, label, shape, true, dout, encoded, None, dinp, accumulate)? {
            return Ok(dispatch);
        }
    }
    let MatmulShape { rows, inner, .. } = shape;
    // The kernel reads dout in runs of 8 floats from out_offset + a multiple of 8.
    let vec4_loads = shape.out_stride.is_multiple_of(4) && shape.out_offset.is_multiple_of(4);
    let params = params(&shape, &weight, accumulate, false, vec4_loads);
    let dout = sized_binding(label, "dout", dout, out_floats(&shape), true);
    let dinp = sized_binding(label, "dinp", dinp, rows * inner, false);
    let invocations = rows.div_ceil(BACKWARD_ROWS) * inner.div_ceil(BACKWARD_COLS);
    let groups = super::grid_1d(gpu, invocations as u64, WORKGROUP_SIZE);
    gpu.dispatch(&BACKWARD_INPUT, label, Some(bytemuck::bytes_of(&params)), &[dinp, dout, packed, scales, steps], groups)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::reference::matmul::{self as reference, MatmulDims};
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// The basis of the f32 matmul tests applies here: inputs are uniform in [-1, 1), the
    /// dequantised weights lie in [-absmax, absmax] with absmax below 1, and each result is an
    /// in-order f32 sum over at most 3072 terms. A missing or doubled term (~0.1) fails.
    const ATOL: f64 = 3e-4;
    const RTOL: f64 = 1e-4;

    /// (M, K, N): M = 1, odd M, GPT-2 tiny's (128 -> 384) and (512 -> 128), K = 7 (scalar
    /// activation loads in the forward, a partial k tile in the input gradient) and GPT-2 small's
    /// mlp.c_fc (768 -> 3072).
    const SHAPES: [(usize, usize, usize); 6] =
        [(1, 128, 384), (7, 128, 384), (33, 512, 128), (17, 128, 128), (5, 7, 64), (16, 768, 3072)];

    /// Half the largest gap between neighbouring codes: the largest error of one element,
    /// relative to its block's absmax.
    fn half_max_gap() -> f32 {
        NF4_CODES.windows(2).map(|pair| pair[1] - pair[0]).fold(0.0, f32::max) / 2.0
    }

    /// Random values whose blocks span four orders of magnitude.
    fn spread_values(len: usize, seed: u64) -> Vec<f32> {
        let mut values = random_vec(len, seed);
        for (block, chunk) in values.chunks_mut(BLOCK_SIZE).enumerate() {
            let factor = 10f32.powi((block % 5) as i32 - 3) * (1.0 + (block % 7) as f32);
            chunk.iter_mut().for_each(|v| *v *= factor);
        }
        values
    }

    fn absmax(chunk: &[f32]) -> f32 {
        chunk.iter().fold(0.0f32, |max, v| max.max(v.abs()))
    }

    #[test]
    fn code_table_is_sorted_with_exact_zero() {
        for (i, pair) in NF4_CODES.windows(2).enumerate() {
            assert!(pair[0] < pair[1], "NF4_CODES[{i}] = {} is not below NF4_CODES[{}] = {}", pair[0], i + 1, pair[1]);
        }
        assert_eq!(NF4_CODES[0], -1.0, "lowest code");
        assert_eq!(NF4_CODES[15], 1.0, "highest code");
        assert_eq!(NF4_CODES[usize::from(ZERO_CODE)], 0.0, "code {ZERO_CODE}");
    }

    #[test]
    fn code_table_matches_shader() {
        let source = FAMILY.source;
        let start = source.find("const NF4_CODES = array<f32, 16>(").expect("the shader declares NF4_CODES");
        let body = &source[start..];
        let open = body.find('(').expect("the declaration has an opening bracket") + 1;
        let close = body.find(");").expect("the declaration ends with `);`");
        let values: Vec<f32> = body[open..close]
            .split(',')
            .map(str::trim)
            .filter(|text| !text.is_empty())
            .map(|text| text.parse().unwrap_or_else(|e| panic!("shader code value `{text}`: {e}")))
            .collect();
        assert_eq!(values.len(), NF4_CODES.len(), "code count in shaders/matmul_nf4.wgsl");
        for (i, (&shader, &host)) in values.iter().zip(&NF4_CODES).enumerate() {
            assert_eq!(shader.to_bits(), host.to_bits(), "code {i}: shader {shader}, NF4_CODES {host}");
        }
    }

    #[test]
    fn quantize_exact_multiples_of_codes() {
        let scales = [0.37f32, 3.0, 1e-3, 1.0];
        // Row r contains code (7 * i) % 16 times scales[r] at column i, which includes the codes
        // -1 and 1, so the block's absmax is scales[r].
        let cols = BLOCK_SIZE;
        let expected_code = |i: usize| ((7 * i) % 16) as u8;
        let values: Vec<f32> = scales
            .iter()
            .flat_map(|&scale| (0..cols).map(move |i| NF4_CODES[usize::from(expected_code(i))] * scale))
            .collect();
        for double_quant in [false, true] {
            let matrix = quantize(&values, scales.len(), cols, double_quant).unwrap();
            let restored = dequantize(&matrix);
            for (index, &value) in values.iter().enumerate() {
                let code = matrix.code(index);
                assert_eq!(code, expected_code(index % cols), "double_quant={double_quant} element {index} ({value})");
                if !double_quant {
                    assert_eq!(
                        restored[index].to_bits(),
                        value.to_bits(),
                        "element {index}: dequantised {} but quantised {value}",
                        restored[index]
                    );
                }
            }
            if let Nf4Scales::Full(stored) = &matrix.scales {
                assert_eq!(stored.as_slice(), &scales, "block scales");
            }
        }
    }

    #[test]
    fn quantize_error_within_half_gap() {
        let (rows, cols) = (24, 192);
        let values = spread_values(rows * cols, 1);
        let matrix = quantize(&values, rows, cols, false).unwrap();
        let restored = dequantize(&matrix);
        let half_gap = half_max_gap();
        for (index, (&value, &got)) in values.iter().zip(&restored).enumerate() {
            let block = index / BLOCK_SIZE;
            let scale = absmax(&values[block * BLOCK_SIZE..(block + 1) * BLOCK_SIZE]);
            assert_eq!(matrix.block_scale(block), scale, "block {block} scale");
            // One rounding of the division and one of the product on top of the code spacing.
            let bound = half_gap * scale * (1.0 + 4.0 * f32::EPSILON);
            assert!(
                (got - value).abs() <= bound,
                "element {index}: quantised {value}, dequantised {got}, error {} above {bound}",
                (got - value).abs()
            );
            // The chosen code is the nearest one to value / absmax.
            let x = value / scale;
            let chosen = (x - NF4_CODES[usize::from(matrix.code(index))]).abs();
            let best = NF4_CODES.iter().map(|&c| (x - c).abs()).fold(f32::INFINITY, f32::min);
            assert_eq!(chosen, best, "element {index}: x = {x} took code {}", matrix.code(index));
        }
    }

    #[test]
    fn quantize_zero_block_is_exact() {
        let (rows, cols) = (2, 128);
        let mut values = random_vec(rows * cols, 2);
        values[BLOCK_SIZE..2 * BLOCK_SIZE].fill(0.0);
        for double_quant in [false, true] {
            let matrix = quantize(&values, rows, cols, double_quant).unwrap();
            let restored = dequantize(&matrix);
            for index in BLOCK_SIZE..2 * BLOCK_SIZE {
                assert_eq!(matrix.code(index), ZERO_CODE, "double_quant={double_quant} element {index}");
                assert_eq!(restored[index], 0.0, "double_quant={double_quant} element {index}");
            }
            if !double_quant {
                assert_eq!(matrix.block_scale(1), 0.0, "scale of the zero block");
            }
        }
    }

    #[test]
    fn packing_puts_low_nibble_first() {
        // Element e of the first row has code e % 16 (the block contains -1 and 1, so absmax is 1).
        let values: Vec<f32> = (0..BLOCK_SIZE).map(|e| NF4_CODES[e % 16]).collect();
        let matrix = quantize(&values, 1, BLOCK_SIZE, false).unwrap();
        assert_eq!(matrix.packed.len(), BLOCK_SIZE / WORD_CODES, "packed words");
        assert_eq!(matrix.packed[0], 0x7654_3210, "word 0: {:#010x}", matrix.packed[0]);
        assert_eq!(matrix.packed[1], 0xfedc_ba98, "word 1: {:#010x}", matrix.packed[1]);
        assert_eq!(matrix.packed[0].to_le_bytes(), [0x10, 0x32, 0x54, 0x76], "bytes of word 0");
    }

    #[test]
    fn ties_take_the_lower_code() {
        for i in 0..NF4_CODES.len() - 1 {
            let midpoint = 0.5 * (NF4_CODES[i] + NF4_CODES[i + 1]);
            let mut values = vec![0.0f32; BLOCK_SIZE];
            values[0] = 1.0;
            values[1] = midpoint;
            values[2] = midpoint.next_up();
            let matrix = quantize(&values, 1, BLOCK_SIZE, false).unwrap();
            assert_eq!(usize::from(matrix.code(1)), i, "midpoint {midpoint} of codes {i} and {}", i + 1);
            assert_eq!(usize::from(matrix.code(2)), i + 1, "{} just above the midpoint of codes {i} and {}", values[2], i + 1);
        }
    }

    #[test]
    fn double_quant_round_trip_within_bound() {
        // 960 blocks: three full groups of 256 and a partial one.
        let (rows, cols) = (20, 3072);
        let values = spread_values(rows * cols, 3);
        let full = quantize(&values, rows, cols, false).unwrap();
        let double = quantize(&values, rows, cols, true).unwrap();
        assert_eq!(full.packed, double.packed, "double quantisation must not change the 4-bit codes");
        let Nf4Scales::Double(scales) = &double.scales else { panic!("double_quant=true stored full scales") };
        assert_eq!(scales.codes.len(), 960, "scale codes");
        assert_eq!(scales.steps.len(), 4, "groups");

        let restored = dequantize(&double);
        let half_gap = half_max_gap();
        for block in 0..double.blocks() {
            let exact = full.block_scale(block);
            let stored = double.block_scale(block);
            let step = scales.steps[block / GROUP_BLOCKS];
            let slack = 4.0 * f32::EPSILON * exact.abs().max(scales.mean.abs());
            let scale_bound = 0.5 * step + slack;
            assert!(
                (stored - exact).abs() <= scale_bound,
                "block {block}: scale {exact}, double-quantised {stored}, error above {scale_bound} (step {step})"
            );
            for index in block * BLOCK_SIZE..(block + 1) * BLOCK_SIZE {
                let bound = half_gap * exact * (1.0 + 4.0 * f32::EPSILON) + scale_bound;
                let error = (restored[index] - values[index]).abs();
                assert!(error <= bound, "element {index}: {} restored as {}, error {error} above {bound}", values[index], restored[index]);
            }
        }

        assert_eq!(full.bits_per_weight(), 4.5, "bits per weight with f32 scales");
        let expected = 4.0 + 8.0 / 64.0 + 32.0 * 4.0 / (rows * cols) as f64;
        assert!((double.bits_per_weight() - expected).abs() < 1e-12, "bits per weight {} with 8-bit scales, expected {expected}", double.bits_per_weight());
    }

    #[test]
    fn quantize_rejects_invalid_input() {
        let error = quantize(&[0.0; 300], 3, 100, false).unwrap_err();
        assert!(matches!(error, Nf4Error::UnsupportedShape { rows: 3, cols: 100 }), "cols 100: {error:?}");
        assert!(error.to_string().contains("(3, 100)"), "message does not name the shape: {error}");
        let error = quantize(&[], 0, 64, false).unwrap_err();
        assert!(matches!(error, Nf4Error::UnsupportedShape { rows: 0, cols: 64 }), "rows 0: {error:?}");
        let error = quantize(&[0.0; 100], 2, 64, false).unwrap_err();
        assert!(matches!(error, Nf4Error::LengthMismatch { rows: 2, cols: 64, len: 100 }), "100 values: {error:?}");
        let mut values = vec![0.5; 128];
        values[64 + 5] = f32::NAN;
        let error = quantize(&values, 2, 64, true).unwrap_err();
        assert!(matches!(error, Nf4Error::NonFinite { row: 1, col: 5, .. }), "NaN at (1, 5): {error:?}");
        assert!(error.to_string().contains("(1, 5)"), "message does not name the element: {error}");
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<Nf4Params>() % 16, 0);
    }

    #[test]
    #[should_panic(expected = "WeightLayout::OutIn is not supported")]
    fn out_in_layout_is_rejected() {
        check_shape("test", &MatmulShape::new(4, 64, 128, WeightLayout::OutIn), 64, 128);
    }

    #[test]
    #[should_panic(expected = "the weight is (128, 64)")]
    fn transposed_weight_is_rejected() {
        check_shape("test", &MatmulShape::new(4, 64, 128, WeightLayout::InOut), 128, 64);
    }

    fn upload(gpu: &Gpu, label: &str, data: &[f32]) -> wgpu::Buffer {
        gpu.upload(label, data).expect("test buffers fit the adapter's limits")
    }

    fn run(gpu: &Gpu, dispatch: Dispatch) {
        gpu.run("matmul_nf4 test", &[dispatch]).expect("the test dispatch runs");
    }

    fn read(gpu: &Gpu, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
        gpu.read(buffer, 0, len).expect("read-back succeeds")
    }

    fn describe(shape: &MatmulShape, double_quant: bool) -> String {
        format!(
            "M={} K={} N={} columns {}..{} of {} double_quant={double_quant}",
            shape.rows,
            shape.inner,
            shape.cols,
            shape.out_offset,
            shape.out_offset + shape.cols,
            shape.out_stride
        )
    }

    /// Returns the column ranges that each case runs with: the whole output, an unaligned range (scalar dout
    /// loads) and an aligned range of a wider output.
    pub(crate) fn column_ranges(rows: usize, inner: usize, cols: usize) -> [MatmulShape; 3] {
        let whole = MatmulShape::new(rows, inner, cols, WeightLayout::InOut);
        [
            whole,
            MatmulShape { out_offset: 3, out_stride: cols + 5, ..whole },
            MatmulShape { out_offset: 64, out_stride: cols + 128, ..whole },
        ]
    }

    pub(crate) fn dims(shape: &MatmulShape) -> MatmulDims {
        MatmulDims { rows: shape.rows, inner: shape.inner, cols: shape.cols, layout: reference::WeightLayout::InOut }
    }

    /// Runs the forward into an output that holds random values and compares its column range
    /// with the f64 product of `dequantize`, and every other column with its old value.
    fn check_forward(gpu: &Gpu, kernels: Kernels, shape: MatmulShape, matrix: &Nf4Matrix, with_bias: bool, seed: u64) {
        let MatmulShape { rows, inner, cols, out_offset, out_stride, .. } = shape;
        let double = matches!(matrix.scales, Nf4Scales::Double(_));
        let description = format!("matmul_nf4 forward {} bias={with_bias} {kernels:?}", describe(&shape, double));
        let inp = random_vec(rows * inner, seed);
        let bias = random_vec(cols, seed + 1);
        let initial = random_vec(rows * out_stride, seed + 2);
        let weight = matrix.upload(gpu, "weight").expect("the weight fits the adapter's limits");
        let inp_buffer = upload(gpu, "inp", &inp);
        let bias_buffer = upload(gpu, "bias", &bias);
        let out_buffer = upload(gpu, "out", &initial);
        let dispatch = forward_with(
            gpu,
            &description,
            kernels,
            shape,
            (&inp_buffer).into(),
            weight.weight(),
            with_bias.then(|| (&bias_buffer).into()),
            (&out_buffer).into(),
        )
        .unwrap();
        run(gpu, dispatch);
        let got = read(gpu, &out_buffer, rows * out_stride);

        let bias64 = to_f64(&bias);
        let want = reference::matmul_forward(&to_f64(&inp), &to_f64(&dequantize(matrix)), with_bias.then_some(&bias64[..]), dims(&shape));
        let range: Vec<f32> = got.chunks(out_stride).flat_map(|row| row[out_offset..out_offset + cols].iter().copied()).collect();
        assert_close(&description, &range, &want, ATOL, RTOL);
        for (index, (&after, &before)) in got.iter().zip(&initial).enumerate() {
            let col = index % out_stride;
            if col < out_offset || col >= out_offset + cols {
                assert_eq!(after.to_bits(), before.to_bits(), "{description}: wrote outside its columns at ({}, {col}): {before} became {after}", index / out_stride);
            }
        }
    }

    /// Runs the input gradient into a dinp that holds random values and compares it with the
    /// f64 product of `dequantize`, plus the old values when accumulating.
    fn check_backward_input(gpu: &Gpu, kernels: Kernels, shape: MatmulShape, matrix: &Nf4Matrix, accumulate: bool, seed: u64) {
        let MatmulShape { rows, inner, cols, out_offset, out_stride, .. } = shape;
        let double = matches!(matrix.scales, Nf4Scales::Double(_));
        let description = format!("matmul_nf4 backward_input {} accumulate={accumulate} {kernels:?}", describe(&shape, double));
        let dout = random_vec(rows * out_stride, seed);
        let initial = random_vec(rows * inner, seed + 1);
        let weight = matrix.upload(gpu, "weight").expect("the weight fits the adapter's limits");
        let dout_buffer = upload(gpu, "dout", &dout);
        let dinp_buffer = upload(gpu, "dinp", &initial);
        let dispatch =
            backward_input_with(gpu, &description, kernels, shape, (&dout_buffer).into(), weight.weight(), (&dinp_buffer).into(), accumulate)
                .unwrap();
        run(gpu, dispatch);
        let got = read(gpu, &dinp_buffer, rows * inner);

        let range: Vec<f32> = dout.chunks(out_stride).flat_map(|row| row[out_offset..out_offset + cols].iter().copied()).collect();
        let mut want = reference::matmul_backward_input(&to_f64(&range), &to_f64(&dequantize(matrix)), dims(&shape));
        if accumulate {
            for (w, &i) in want.iter_mut().zip(&initial) {
                *w += f64::from(i);
            }
        }
        assert_close(&description, &got, &want, ATOL, RTOL);
    }

    #[test]
    fn nf4_forward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (i, &(rows, inner, cols)) in SHAPES.iter().enumerate() {
            let values = random_vec(inner * cols, 1000 + i as u64);
            for double_quant in [false, true] {
                let matrix = quantize(&values, inner, cols, double_quant).unwrap();
                for (j, shape) in column_ranges(rows, inner, cols).into_iter().enumerate() {
                    for (with_bias, kernels) in [(true, Kernels::Any), (false, Kernels::Any), (true, Kernels::Blocked), (false, Kernels::Blocked)] {
                        check_forward(gpu, kernels, shape, &matrix, with_bias, 1100 + 10 * i as u64 + j as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn nf4_backward_input_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (i, &(rows, inner, cols)) in SHAPES.iter().enumerate() {
            let values = random_vec(inner * cols, 2000 + i as u64);
            for double_quant in [false, true] {
                let matrix = quantize(&values, inner, cols, double_quant).unwrap();
                for (j, shape) in column_ranges(rows, inner, cols).into_iter().enumerate() {
                    for (accumulate, kernels) in [(false, Kernels::Any), (true, Kernels::Any), (false, Kernels::Blocked), (true, Kernels::Blocked)] {
                        check_backward_input(gpu, kernels, shape, &matrix, accumulate, 2100 + 10 * i as u64 + j as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn nf4_results_are_bitwise_reproducible() {
        let Some(gpu) = test_gpu() else { return };
        let shape = MatmulShape::new(37, 128, 192, WeightLayout::InOut);
        let matrix = quantize(&random_vec(128 * 192, 3000), 128, 192, true).unwrap();
        let weight = matrix.upload(gpu, "weight").unwrap();
        let inp = upload(gpu, "inp", &random_vec(37 * 128, 3001));
        let dout = upload(gpu, "dout", &random_vec(37 * 192, 3002));
        let mut runs = Vec::new();
        for _ in 0..2 {
            let out = gpu.storage_buffer("out", (37 * 192 * 4) as u64).unwrap();
            let dinp = gpu.storage_buffer("dinp", (37 * 128 * 4) as u64).unwrap();
            let dispatches = [
                forward(gpu, "forward", shape, (&inp).into(), weight.weight(), None, (&out).into()).unwrap(),
                backward_input(gpu, "backward_input", shape, (&dout).into(), weight.weight(), (&dinp).into(), false).unwrap(),
            ];
            gpu.run("matmul_nf4 reproducibility", &dispatches).unwrap();
            let bits = |values: Vec<f32>| values.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
            runs.push((bits(read(gpu, &out, 37 * 192)), bits(read(gpu, &dinp, 37 * 128))));
        }
        let forward_difference = runs[0].0.iter().zip(&runs[1].0).position(|(a, b)| a != b);
        assert_eq!(forward_difference, None, "matmul_nf4 forward differs between two runs at that index");
        let backward_difference = runs[0].1.iter().zip(&runs[1].1).position(|(a, b)| a != b);
        assert_eq!(backward_difference, None, "matmul_nf4 backward_input differs between two runs at that index");
    }

    /// The NF4 tests above exercise the subgroup products only if the launchers pick them: on an
    /// adapter where the f32 products use subgroups, aligned NF4 products must use them too, and
    /// unaligned ones must not.
    #[test]
    fn nf4_subgroup_chosen_where_it_applies() {
        use crate::kernels::matmul::{encoded_subgroup, subgroup_products_chosen};
        let Some(gpu) = test_gpu() else { return };
        let expected = subgroup_products_chosen(gpu, true).unwrap();
        let matrix = quantize(&random_vec(128 * 192, 4000), 128, 192, true).unwrap();
        let weight = matrix.upload(gpu, "weight").unwrap();
        let act = upload(gpu, "activations", &random_vec(40 * 384, 4001));
        let result = gpu.storage_buffer("result", (40 * 384 * 4) as u64).unwrap();
        let bound = weight.weight();
        let encoded = encoded(&bound, weight_bindings(gpu, "weight", &bound));
        let aligned = MatmulShape { out_offset: 192, out_stride: 384, ..MatmulShape::new(40, 128, 192, WeightLayout::InOut) };
        let chosen = encoded_subgroup(gpu, "aligned", aligned, true, (&act).into(), encoded, None, (&result).into(), true).unwrap();
        assert_eq!(chosen.is_some(), expected, "aligned input gradient on {}", gpu.describe());
        let odd = MatmulShape::new(40, 7, 64, WeightLayout::InOut);
        let chosen = encoded_subgroup(gpu, "odd K", odd, false, (&act).into(), encoded, None, (&result).into(), false).unwrap();
        assert!(chosen.is_none(), "K=7 cannot use vec4 loads");
    }
}
