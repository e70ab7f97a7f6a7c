//! Linear-layer matrix products: forward, input gradient, weight gradient and bias gradient, for
//! weights stored (K, N) or (N, K), in three shader variants.
//!
//! `shaders/matmul.wgsl`, the generic variant, has three GEMM forms (`matmul_nn`, `matmul_nt`,
//! `matmul_tn`) and a column sum. Each launcher below picks the form that its operation and
//! weight layout need, and whether the reduction can use vec4 loads.
//!
//! `shaders/matmul_subgroup.wgsl` has the same three forms for adapters whose subgroups have
//! exactly 8 lanes (lavapipe): lanes share the loads of one operand through `subgroupBroadcast`.
//! It can run a product when the device has the SUBGROUP feature, the adapter's smallest and
//! largest subgroup sizes are both 8, and the product can use vec4 loads.
//!
//! `shaders/matmul_tiled.wgsl` has the three forms again for GPUs: a workgroup stages slices of
//! both operands in workgroup memory and computes a 64 x 64 block. It runs every product, aligned
//! or not.
//!
//! With autotuning off, products use the subgroup variant where subgroups fit, else the tiled one
//! on adapters that are not CPUs, else the generic one. With autotuning on, a timed trial chooses
//! among the variants that fit. A product that the chosen variant cannot run uses the generic
//! one, which is also the reference for the tests. `SHADERTUNE_MATMUL=generic` or `=tiled` makes
//! every product use that variant, to compare them.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "matmul", source: include_str!("../../shaders/matmul.wgsl") };

pub(crate) static SUBGROUP_FAMILY: ShaderFamily =
    ShaderFamily { name: "matmul_subgroup", source: include_str!("../../shaders/matmul_subgroup.wgsl") };

/// The subgroup products with an f16 weight as rhs, derived from `shaders/matmul_subgroup.wgsl`
/// by build.rs.
pub(crate) static F16_SUBGROUP_FAMILY: ShaderFamily = ShaderFamily {
    name: "matmul_f16_subgroup",
    source: include_str!(concat!(env!("OUT_DIR"), "/matmul_f16_subgroup.wgsl")),
};

/// The subgroup products with an NF4 weight as rhs, derived from `shaders/matmul_subgroup.wgsl`
/// by build.rs.
pub(crate) static NF4_SUBGROUP_FAMILY: ShaderFamily = ShaderFamily {
    name: "matmul_nf4_subgroup",
    source: include_str!(concat!(env!("OUT_DIR"), "/matmul_nf4_subgroup.wgsl")),
};

/// The f32 subgroup products with 32-column blocks, derived from `shaders/matmul_subgroup.wgsl`
/// by build.rs, for batched products with few result columns (attention).
pub(crate) static NARROW_SUBGROUP_FAMILY: ShaderFamily = ShaderFamily {
    name: "matmul_narrow_subgroup",
    source: include_str!(concat!(env!("OUT_DIR"), "/matmul_narrow_subgroup.wgsl")),
};

pub(crate) static TILED_FAMILY: ShaderFamily =
    ShaderFamily { name: "matmul_tiled", source: include_str!("../../shaders/matmul_tiled.wgsl") };

/// Must match `WORKGROUP_SIZE` in `shaders/matmul.wgsl`.
pub(crate) const WORKGROUP_SIZE: u32 = 64;
/// Must match `WORKGROUP_SIZE` in `shaders/matmul_subgroup.wgsl`. A workgroup is one subgroup, so
/// that a product with few blocks still spreads them evenly over the driver's threads.
const SUBGROUP_WORKGROUP_SIZE: u32 = 8;
/// Subgroup size that `shaders/matmul_subgroup.wgsl` assumes; must match `LANES` there.
const SUBGROUP_LANES: u32 = 8;
/// Result rows and columns of one subgroup's block in the subgroup variant. They must match
/// `BLOCK_ROWS` and `BLOCK_COLS` there.
const BLOCK_ROWS: usize = 96;
const BLOCK_COLS: usize = 128;
/// Result columns of one subgroup's block in the narrow module (one column quad per lane).
const NARROW_BLOCK_COLS: usize = 32;
/// Invocations along each side of a tiled workgroup; must match `SIDE` in
/// `shaders/matmul_tiled.wgsl`.
const TILED_SIDE: u32 = 16;
/// Result rows and columns of one tiled workgroup; must match `BLOCK` there.
const TILED_BLOCK: usize = 64;
/// Workgroup memory of the tiled variant: two slices of 256 vec4s.
const TILED_WORKGROUP_BYTES: u32 = 2 * 256 * 16;
/// Environment variable that selects the matmul kernels: `generic` forces `shaders/matmul.wgsl`,
/// `tiled` forces `shaders/matmul_tiled.wgsl` where the adapter can run it.
const KERNEL_VARIABLE: &str = "SHADERTUNE_MATMUL";
/// Result rows per invocation; must match `TILE_ROWS` in the shader.
const TILE_ROWS: usize = 16;
/// Result columns per invocation; must match `TILE_COLS` in the shader.
const TILE_COLS: usize = 16;
/// Columns summed by one invocation of `matmul_backward_bias`.
const BIAS_COLS_PER_INVOCATION: usize = 4;
/// Floats in one vec4, the unit of the vectorized loads.
const VEC4: usize = 4;
/// Bytes in one vec4. Bindings read as `array<vec4<f32>>` are rounded up to a multiple of this.
const VEC4_BYTES: u64 = 16;
const F32_BYTES: u64 = 4;

/// Bindings of the three product forms: result, lhs, rhs, bias.
const PRODUCT_BINDINGS: &[BindingKind] = &[
    BindingKind::Uniform,
    BindingKind::ReadWrite,
    BindingKind::ReadOnly,
    BindingKind::ReadOnly,
    BindingKind::ReadOnly,
];

static NN: KernelEntry = KernelEntry { family: &FAMILY, entry: "matmul_nn", bindings: PRODUCT_BINDINGS };
static NT: KernelEntry = KernelEntry { family: &FAMILY, entry: "matmul_nt", bindings: PRODUCT_BINDINGS };
static TN: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "matmul_tn",
    bindings: &[BindingKind::Uniform, BindingKind::ReadWrite, BindingKind::ReadOnly, BindingKind::ReadOnly],
};
static SUBGROUP_NN: KernelEntry =
    KernelEntry { family: &SUBGROUP_FAMILY, entry: "matmul_nn", bindings: PRODUCT_BINDINGS };
static SUBGROUP_NT: KernelEntry =
    KernelEntry { family: &SUBGROUP_FAMILY, entry: "matmul_nt", bindings: PRODUCT_BINDINGS };
static SUBGROUP_TN: KernelEntry = KernelEntry {
    family: &SUBGROUP_FAMILY,
    entry: "matmul_tn",
    bindings: &[BindingKind::Uniform, BindingKind::ReadWrite, BindingKind::ReadOnly, BindingKind::ReadOnly],
};
static NARROW_NN: KernelEntry =
    KernelEntry { family: &NARROW_SUBGROUP_FAMILY, entry: "matmul_nn", bindings: PRODUCT_BINDINGS };
static NARROW_NT: KernelEntry =
    KernelEntry { family: &NARROW_SUBGROUP_FAMILY, entry: "matmul_nt", bindings: PRODUCT_BINDINGS };
static NARROW_TN: KernelEntry = KernelEntry {
    family: &NARROW_SUBGROUP_FAMILY,
    entry: "matmul_tn",
    bindings: &[BindingKind::Uniform, BindingKind::ReadWrite, BindingKind::ReadOnly, BindingKind::ReadOnly],
};
static F16_SUBGROUP_NN: KernelEntry =
    KernelEntry { family: &F16_SUBGROUP_FAMILY, entry: "matmul_nn", bindings: PRODUCT_BINDINGS };
static F16_SUBGROUP_NT: KernelEntry =
    KernelEntry { family: &F16_SUBGROUP_FAMILY, entry: "matmul_nt", bindings: PRODUCT_BINDINGS };
/// Bindings of the NF4 subgroup products: result, lhs, codes, bias, scales, scale steps.
const NF4_PRODUCT_BINDINGS: &[BindingKind] = &[
    BindingKind::Uniform,
    BindingKind::ReadWrite,
    BindingKind::ReadOnly,
    BindingKind::ReadOnly,
    BindingKind::ReadOnly,
    BindingKind::ReadOnly,
    BindingKind::ReadOnly,
];
static NF4_SUBGROUP_NN: KernelEntry =
    KernelEntry { family: &NF4_SUBGROUP_FAMILY, entry: "matmul_nn", bindings: NF4_PRODUCT_BINDINGS };
static NF4_SUBGROUP_NT: KernelEntry =
    KernelEntry { family: &NF4_SUBGROUP_FAMILY, entry: "matmul_nt", bindings: NF4_PRODUCT_BINDINGS };
// The tiled forms share one body, which reads the bias binding, so matmul_tn binds it too.
static TILED_NN: KernelEntry = KernelEntry { family: &TILED_FAMILY, entry: "matmul_nn", bindings: PRODUCT_BINDINGS };
static TILED_NT: KernelEntry = KernelEntry { family: &TILED_FAMILY, entry: "matmul_nt", bindings: PRODUCT_BINDINGS };
static TILED_TN: KernelEntry = KernelEntry { family: &TILED_FAMILY, entry: "matmul_tn", bindings: PRODUCT_BINDINGS };
static BACKWARD_BIAS: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "matmul_backward_bias",
    bindings: &[BindingKind::Uniform, BindingKind::ReadWrite, BindingKind::ReadOnly],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[
    (&NN, WORKGROUP_SIZE),
    (&NT, WORKGROUP_SIZE),
    (&TN, WORKGROUP_SIZE),
    (&BACKWARD_BIAS, WORKGROUP_SIZE),
];

/// Entry points of the subgroup variant and their WGSL workgroup sizes. They compile only on
/// devices with the SUBGROUP feature.
pub(crate) const SUBGROUP_ENTRIES: &[(&KernelEntry, u32)] = &[
    (&SUBGROUP_NN, SUBGROUP_WORKGROUP_SIZE),
    (&SUBGROUP_NT, SUBGROUP_WORKGROUP_SIZE),
    (&SUBGROUP_TN, SUBGROUP_WORKGROUP_SIZE),
];

/// Entry points of the narrow subgroup module and their WGSL workgroup sizes. They compile only on
/// devices with the SUBGROUP feature.
pub(crate) const NARROW_SUBGROUP_ENTRIES: &[(&KernelEntry, u32)] = &[
    (&NARROW_NN, SUBGROUP_WORKGROUP_SIZE),
    (&NARROW_NT, SUBGROUP_WORKGROUP_SIZE),
    (&NARROW_TN, SUBGROUP_WORKGROUP_SIZE),
];

/// Entry points of the subgroup variant with f16 weights and their WGSL workgroup sizes. They
/// compile only on devices with the SUBGROUP feature and wgpu's SHADER_F16_IN_F32 capability.
pub(crate) const F16_SUBGROUP_ENTRIES: &[(&KernelEntry, u32)] =
    &[(&F16_SUBGROUP_NN, SUBGROUP_WORKGROUP_SIZE), (&F16_SUBGROUP_NT, SUBGROUP_WORKGROUP_SIZE)];

/// Entry points of the subgroup variant with NF4 weights and their WGSL workgroup sizes. They
/// compile only on devices with the SUBGROUP feature.
pub(crate) const NF4_SUBGROUP_ENTRIES: &[(&KernelEntry, u32)] =
    &[(&NF4_SUBGROUP_NN, SUBGROUP_WORKGROUP_SIZE), (&NF4_SUBGROUP_NT, SUBGROUP_WORKGROUP_SIZE)];

/// Entry points of the tiled variant and their WGSL workgroup sizes (16 x 16).
pub(crate) const TILED_ENTRIES: &[(&KernelEntry, u32)] = &[
    (&TILED_NN, TILED_SIDE * TILED_SIDE),
    (&TILED_NT, TILED_SIDE * TILED_SIDE),
    (&TILED_TN, TILED_SIDE * TILED_SIDE),
];

/// The shader family that runs a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// `shaders/matmul.wgsl`, for every adapter and shape.
    Generic,
    /// `shaders/matmul_subgroup.wgsl`.
    Subgroup,
    /// `shaders/matmul_tiled.wgsl`.
    Tiled,
}

/// The variant that a launcher requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Preference {
    /// The variant that `SHADERTUNE_MATMUL` forces, else the autotuned or default choice for
    /// the product's form.
    Auto,
    /// Always `shaders/matmul.wgsl`.
    Generic,
    /// The subgroup variant where it applies, even when `SHADERTUNE_MATMUL` is set.
    Subgroup,
    /// The tiled variant where the adapter can run it, even when `SHADERTUNE_MATMUL` is set.
    Tiled,
}

/// Returns the variant that `SHADERTUNE_MATMUL` forces (`generic` or `tiled`), read once per
/// process.
fn forced_variant() -> Option<Variant> {
    static FORCED: std::sync::OnceLock<Option<Variant>> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| match std::env::var(KERNEL_VARIABLE).as_deref().map(str::trim) {
        Ok("generic") => Some(Variant::Generic),
        Ok("tiled") => Some(Variant::Tiled),
        Ok(other) => {
            log::warn!("ignoring {KERNEL_VARIABLE}={other}: expected `generic` or `tiled`; unset it to let the autotuner choose");
            None
        }
        Err(_) => None,
    })
}

/// True when the device can run `shaders/matmul_subgroup.wgsl` as written: subgroup operations
/// are enabled and every subgroup has exactly SUBGROUP_LANES lanes.
pub(crate) fn subgroups_fit(gpu: &Gpu) -> bool {
    let info = gpu.info();
    gpu.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size == SUBGROUP_LANES
        && info.subgroup_max_size == SUBGROUP_LANES
}

/// True when the adapter's limits allow the tiled variant's 16 x 16 workgroups and 8 KiB of
/// workgroup memory (wgpu's default and downlevel limits do).
fn tiled_fits(gpu: &Gpu) -> bool {
    let limits = gpu.limits();
    limits.max_compute_invocations_per_workgroup >= TILED_SIDE * TILED_SIDE
        && limits.max_compute_workgroup_size_x >= TILED_SIDE
        && limits.max_compute_workgroup_size_y >= TILED_SIDE
        && limits.max_compute_workgroup_storage_size >= TILED_WORKGROUP_BYTES
}

const VARIANTS: [Variant; 3] = [Variant::Generic, Variant::Subgroup, Variant::Tiled];

/// Name of a variant in the autotune cache and in logs.
fn variant_name(variant: Variant) -> &'static str {
    match variant {
        Variant::Generic => "generic",
        Variant::Subgroup => "subgroup",
        Variant::Tiled => "tiled",
    }
}

/// Lists the variants that can run aligned products on this device: generic always, subgroup
/// where subgroups fit, tiled where the limits allow.
fn candidates(gpu: &Gpu) -> Vec<Variant> {
    let mut variants = vec![Variant::Generic];
    if subgroups_fit(gpu) {
        variants.push(Variant::Subgroup);
    }
    if tiled_fits(gpu) {
        variants.push(Variant::Tiled);
    }
    variants
}

/// Returns the variant used with autotuning off: subgroup where subgroups fit, else tiled on
/// adapters that are not CPUs, else generic.
fn default_variant(gpu: &Gpu) -> Variant {
    if subgroups_fit(gpu) {
        Variant::Subgroup
    } else if tiled_fits(gpu) && gpu.info().device_type != wgpu::DeviceType::Cpu {
        Variant::Tiled
    } else {
        Variant::Generic
    }
}

/// Returns the variant that an aligned product of `form` uses without an explicit preference.
/// That is the one `SHADERTUNE_MATMUL` forces, else the fixed default with autotuning off, else
/// the fastest candidate on a trial product, cached per adapter and driver (see
/// `crate::gpu::autotune`).
fn automatic_variant(gpu: &Gpu, form: Form) -> Result<Variant, GpuError> {
    if let Some(forced) = forced_variant() {
        return Ok(forced);
    }
    let family = match form {
        Form::Nn => "matmul_nn",
        Form::Nt => "matmul_nt",
        Form::Tn => "matmul_tn",
    };
    let candidates = candidates(gpu);
    let names: Vec<&'static str> = candidates.iter().map(|&v| variant_name(v)).collect();
    let sources = [FAMILY.source, SUBGROUP_FAMILY.source, TILED_FAMILY.source];
    let by_name = |name: &str| VARIANTS.into_iter().find(|&v| variant_name(v) == name);
    let choice = gpu.tuned(family, &sources, &names, variant_name(default_variant(gpu)), |name| {
        trial(gpu, form, by_name(name).unwrap_or(Variant::Generic))
    })?;
    // A cache entry written by another build may name a variant this one does not have.
    Ok(by_name(&choice).unwrap_or(Variant::Generic))
}

/// Rows, inner size and columns of the autotune trial: a quarter of GPT-2 small's c_fc product
/// at batch 8 x 48 tokens, a multiple of the subgroup variant's 96 x 128 blocks.
const TRIAL: (usize, usize, usize) = (384, 768, 768);

/// Median milliseconds of one trial product of `form` on `variant` (one untimed run, three timed).
fn trial(gpu: &Gpu, form: Form, variant: Variant) -> Result<f64, GpuError> {
    let (rows, inner, cols) = TRIAL;
    let preference = match variant {
        Variant::Generic => Preference::Generic,
        Variant::Subgroup => Preference::Subgroup,
        Variant::Tiled => Preference::Tiled,
    };
    let bytes = |floats: usize| (floats * F32_BYTES as usize) as u64;
    let lhs = gpu.storage_buffer("autotune lhs", bytes(rows * inner))?;
    let rhs = gpu.storage_buffer("autotune rhs", bytes(inner * cols))?;
    let out = gpu.storage_buffer("autotune out", bytes(rows.max(inner) * cols))?;
    let label = format!("autotune {} {}", variant_name(variant), format!("{form:?}").to_lowercase());
    let (l, r, o) = (TensorBinding::whole(&lhs), TensorBinding::whole(&rhs), TensorBinding::whole(&out));
    let dispatch = match form {
        Form::Nn => forward_with(gpu, &label, preference, MatmulShape::new(rows, inner, cols, WeightLayout::InOut), l, r, None, o)?,
        Form::Nt => forward_with(gpu, &label, preference, MatmulShape::new(rows, inner, cols, WeightLayout::OutIn), l, r, None, o)?,
        Form::Tn => backward_weight_with(gpu, &label, preference, MatmulShape::new(rows, inner, cols, WeightLayout::InOut), l, r, o)?,
    };
    let times = gpu.time_dispatches(&label, &[dispatch], 1, 3)?;
    Ok(crate::gpu::median(&times))
}

/// Returns the variant each product form uses on this device, as (form, variant) names, for
/// reports. Runs the autotune trial where it has not run yet.
pub(crate) fn chosen_variants(gpu: &Gpu) -> Result<Vec<(&'static str, &'static str)>, GpuError> {
    [("nn", Form::Nn), ("nt", Form::Nt), ("tn", Form::Tn)]
        .into_iter()
        .map(|(name, form)| Ok((name, variant_name(automatic_variant(gpu, form)?))))
        .collect()
}

/// Storage order of a linear layer's weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WeightLayout {
    /// (K, N), input index first: GPT-2's Conv1D weights.
    InOut,
    /// (N, K), output index first: `nn.Linear`, as the classifier head `score.weight` and the
    /// tied LM head `wte` store it.
    OutIn,
}

/// Sizes of one linear-layer product `(M, K) @ (K, N)` and where its N columns sit in the
/// output (and output-gradient) tensor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatmulShape {
    /// M, rows of the input and of the output.
    pub rows: usize,
    /// K, input features.
    pub inner: usize,
    /// N, output columns computed by this product.
    pub cols: usize,
    /// Storage order of the weight.
    pub layout: WeightLayout,
    /// First column of `out`/`dout` that this product covers. It is 0 unless the weight is
    /// split into row chunks that each produce a column range of one output.
    pub out_offset: usize,
    /// Row stride of `out`/`dout` in floats, which is `cols` unless the output is wider than this
    /// product.
    pub out_stride: usize,
}

impl MatmulShape {
    /// Creates the shape of a product that covers its whole output (offset 0, stride `cols`).
    pub fn new(rows: usize, inner: usize, cols: usize, layout: WeightLayout) -> Self {
        MatmulShape { rows, inner, cols, layout, out_offset: 0, out_stride: cols }
    }

    /// Floats that `out`/`dout` must hold: the last row ends at column `out_offset + cols`.
    fn out_floats(&self) -> usize {
        (self.rows - 1) * self.out_stride + self.out_offset + self.cols
    }

    fn check(&self, label: &str) {
        assert!(
            self.rows > 0 && self.inner > 0 && self.cols > 0,
            "matmul `{label}`: every dimension must be non-zero, got M={} K={} N={}",
            self.rows,
            self.inner,
            self.cols
        );
        assert!(
            self.out_offset + self.cols <= self.out_stride,
            "matmul `{label}`: columns {}..{} do not fit in an output row of stride {}",
            self.out_offset,
            self.out_offset + self.cols,
            self.out_stride
        );
        // Every flat index the shader computes must fit in u32.
        let largest = self.out_floats().max(self.rows * self.inner).max(self.inner * self.cols);
        assert!(u32::try_from(largest).is_ok(), "matmul `{label}`: {largest} floats exceed u32 indexing");
    }
}

/// Uniform parameters, with the field names and order of `MatmulParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct MatmulParams {
    pub rows: u32,
    pub cols: u32,
    pub inner: u32,
    pub lhs_stride: u32,
    pub lhs_offset: u32,
    pub rhs_stride: u32,
    pub rhs_offset: u32,
    pub out_stride: u32,
    pub out_offset: u32,
    pub accumulate: u32,
    pub has_bias: u32,
    pub vec4_loads: u32,
    /// Number of batched products, read by the subgroup module only (shaders/matmul.wgsl and
    /// matmul_tiled.wgsl declare the fields above and ignore these). Product z is batch
    /// z / heads and head z % heads, and each operand's offset grows by its batch and head strides.
    pub products: u32,
    pub heads: u32,
    pub lhs_batch_stride: u32,
    pub lhs_head_stride: u32,
    pub rhs_batch_stride: u32,
    pub rhs_head_stride: u32,
    pub out_batch_stride: u32,
    pub out_head_stride: u32,
}

/// A row-major operand as the shader addresses it: element (row, column) of batch b and head h
/// at `b * batch_stride + h * head_stride + offset + row * stride + column`. The batch strides
/// are zero except in [`batched_subgroup`] products.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand {
    pub stride: usize,
    pub offset: usize,
    pub batch_stride: usize,
    pub head_stride: usize,
}

impl Operand {
    fn dense(cols: usize) -> Self {
        Operand::at(cols, 0)
    }

    /// Creates an operand of one product: rows `stride` floats apart, from `offset` on.
    fn at(stride: usize, offset: usize) -> Self {
        Operand { stride, offset, batch_stride: 0, head_stride: 0 }
    }

    /// True when every row of every batch and head starts on a vec4 boundary.
    fn rows_aligned(&self) -> bool {
        [self.stride, self.offset, self.batch_stride, self.head_stride].iter().all(|n| n.is_multiple_of(VEC4))
    }
}

/// The GEMM forms of the shader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Form {
    /// `result[r, c] = sum_i lhs[r, i] * rhs[i, c]`
    Nn,
    /// `result[r, c] = sum_i lhs[r, i] * rhs[c, i]`
    Nt,
    /// `result[r, c] = sum_i lhs[i, r] * rhs[i, c]`
    Tn,
}

/// One GEMM: the result is (rows, cols) and the reduction has length `inner`.
struct Product {
    form: Form,
    rows: usize,
    cols: usize,
    inner: usize,
    lhs: Operand,
    rhs: Operand,
    out: Operand,
    accumulate: bool,
    has_bias: bool,
    /// Products in the dispatch, product z at batch z / heads and head z % heads (1 and 1 for a
    /// single product).
    products: usize,
    heads: usize,
}

impl Product {
    /// Creates the forward product of a linear layer: `out = inp @ W (+ bias)`.
    fn forward(shape: &MatmulShape, has_bias: bool) -> Product {
        let MatmulShape { rows, inner, cols, layout, .. } = *shape;
        let (form, weight_operand) = match layout {
            WeightLayout::InOut => (Form::Nn, Operand::dense(cols)),
            WeightLayout::OutIn => (Form::Nt, Operand::dense(inner)),
        };
        Product {
            form,
            rows,
            cols,
            inner,
            lhs: Operand::dense(inner),
            rhs: weight_operand,
            out: Operand::at(shape.out_stride, shape.out_offset),
            accumulate: false,
            has_bias,
            products: 1,
            heads: 1,
        }
    }

    /// Creates the input-gradient product of a linear layer: `dinp (+)= dout @ W^T`.
    fn input_grad(shape: &MatmulShape, accumulate: bool) -> Product {
        let MatmulShape { rows, inner, cols, layout, .. } = *shape;
        // The reduction runs over N and the result has K columns. W^T[n, k] is W[k, n], which is
        // in row k of a weight stored (K, N) (nt form) and in row n of a weight stored (N, K) (nn
        // form).
        let (form, weight_operand) = match layout {
            WeightLayout::InOut => (Form::Nt, Operand::dense(cols)),
            WeightLayout::OutIn => (Form::Nn, Operand::dense(inner)),
        };
        Product {
            form,
            rows,
            cols: inner,
            inner: cols,
            lhs: Operand::at(shape.out_stride, shape.out_offset),
            rhs: weight_operand,
            out: Operand::dense(inner),
            accumulate,
            has_bias: false,
            products: 1,
            heads: 1,
        }
    }

    /// True when every vec4 that the reduction loads lies inside one operand row, aligned:
    /// strides and offsets are multiples of 4, and so is the length read along each row.
    fn vec4_loads(&self) -> bool {
        let aligned = self.lhs.rows_aligned() && self.rhs.rows_aligned();
        aligned
            && match self.form {
                Form::Nn => self.inner.is_multiple_of(VEC4) && self.cols.is_multiple_of(VEC4),
                Form::Nt => self.inner.is_multiple_of(VEC4),
                Form::Tn => self.rows.is_multiple_of(VEC4) && self.cols.is_multiple_of(VEC4),
            }
    }

    fn params(&self) -> MatmulParams {
        MatmulParams {
            rows: self.rows as u32,
            cols: self.cols as u32,
            inner: self.inner as u32,
            lhs_stride: self.lhs.stride as u32,
            lhs_offset: self.lhs.offset as u32,
            rhs_stride: self.rhs.stride as u32,
            rhs_offset: self.rhs.offset as u32,
            out_stride: self.out.stride as u32,
            out_offset: self.out.offset as u32,
            accumulate: u32::from(self.accumulate),
            has_bias: u32::from(self.has_bias),
            vec4_loads: u32::from(self.vec4_loads()),
            products: self.products as u32,
            heads: self.heads as u32,
            lhs_batch_stride: self.lhs.batch_stride as u32,
            lhs_head_stride: self.lhs.head_stride as u32,
            rhs_batch_stride: self.rhs.batch_stride as u32,
            rhs_head_stride: self.rhs.head_stride as u32,
            out_batch_stride: self.out.batch_stride as u32,
            out_head_stride: self.out.head_stride as u32,
        }
    }

    /// Selects the shader that runs this product. The subgroup variant needs a fitting device and
    /// the alignment of vec4 loads, because it reads every operand as vec4s. The tiled variant
    /// needs the adapter's workgroup limits and a grid of blocks within the per-dimension limit.
    /// `Preference::Auto` takes the forced, default or autotuned choice for the product's form.
    /// A product that the requested variant cannot run uses the generic shader.
    fn variant(&self, gpu: &Gpu, preference: Preference) -> Result<Variant, GpuError> {
        let requested = match preference {
            Preference::Auto => automatic_variant(gpu, self.form)?,
            Preference::Generic => Variant::Generic,
            Preference::Subgroup => Variant::Subgroup,
            Preference::Tiled => Variant::Tiled,
        };
        let possible = match requested {
            Variant::Generic => true,
            Variant::Subgroup => self.vec4_loads() && subgroups_fit(gpu),
            Variant::Tiled => {
                let max = gpu.limits().max_compute_workgroups_per_dimension as usize;
                tiled_fits(gpu) && self.rows.div_ceil(TILED_BLOCK) <= max && self.cols.div_ceil(TILED_BLOCK) <= max
            }
        };
        Ok(if possible { requested } else { Variant::Generic })
    }

    fn workgroups(&self, gpu: &Gpu, variant: Variant) -> [u32; 3] {
        match variant {
            Variant::Generic => {
                let invocations = self.rows.div_ceil(TILE_ROWS) * self.cols.div_ceil(TILE_COLS);
                super::grid_1d(gpu, invocations as u64, WORKGROUP_SIZE)
            }
            Variant::Subgroup => {
                let blocks = self.rows.div_ceil(BLOCK_ROWS) * self.cols.div_ceil(BLOCK_COLS) * self.products;
                let invocations = blocks * SUBGROUP_LANES as usize;
                super::grid_1d(gpu, invocations as u64, SUBGROUP_WORKGROUP_SIZE)
            }
            // One workgroup per 64 x 64 block: x along columns, y along rows. `variant` checked
            // both counts against the per-dimension limit.
            Variant::Tiled => [self.cols.div_ceil(TILED_BLOCK) as u32, self.rows.div_ceil(TILED_BLOCK) as u32, 1],
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        gpu: &Gpu,
        label: &str,
        preference: Preference,
        result: TensorBinding<'_>,
        lhs: TensorBinding<'_>,
        rhs: TensorBinding<'_>,
        bias: Option<TensorBinding<'_>>,
    ) -> Result<Dispatch, GpuError> {
        let params = self.params();
        let variant = self.variant(gpu, preference)?;
        let groups = self.workgroups(gpu, variant);
        let kernel = match (variant, self.form) {
            (Variant::Generic, Form::Nn) => &NN,
            (Variant::Generic, Form::Nt) => &NT,
            (Variant::Generic, Form::Tn) => &TN,
            (Variant::Subgroup, Form::Nn) => &SUBGROUP_NN,
            (Variant::Subgroup, Form::Nt) => &SUBGROUP_NT,
            (Variant::Subgroup, Form::Tn) => &SUBGROUP_TN,
            (Variant::Tiled, Form::Nn) => &TILED_NN,
            (Variant::Tiled, Form::Nt) => &TILED_NT,
            (Variant::Tiled, Form::Tn) => &TILED_TN,
        };
        match (variant, self.form) {
            (Variant::Tiled, _) | (_, Form::Nn | Form::Nt) => {
                let bias = bias.unwrap_or_else(|| gpu.placeholder());
                gpu.dispatch(kernel, label, Some(bytemuck::bytes_of(&params)), &[result, lhs, rhs, bias], groups)
            }
            (_, Form::Tn) => gpu.dispatch(kernel, label, Some(bytemuck::bytes_of(&params)), &[result, lhs, rhs], groups),
        }
    }
}

/// Checks that `binding` contains at least `floats` values and, for a binding that the shader
/// declares as `array<vec4<f32>>` (`vec4_array`), rounds its size up to a multiple of 16 bytes.
/// Without that, the last partial vec4 would be out of range and bounds checks would redirect
/// its reads; the floats past `floats` are never used or written.
///
/// # Panics
/// If the binding is too small for its shape, or if its buffer ends before the rounded size;
/// buffers from [`Gpu::storage_buffer`] are padded to 16 bytes, so a 16-byte-aligned binding of
/// one always rounds up.
pub(crate) fn sized_binding<'a>(
    label: &str,
    name: &str,
    binding: TensorBinding<'a>,
    floats: usize,
    vec4_array: bool,
) -> TensorBinding<'a> {
    let needed = floats as u64 * F32_BYTES;
    assert!(
        binding.size >= needed,
        "`{label}`: binding `{name}` holds {} bytes, its shape needs {needed} ({floats} floats)",
        binding.size
    );
    if !vec4_array || binding.size.is_multiple_of(VEC4_BYTES) {
        return binding;
    }
    let size = binding.size.div_ceil(VEC4_BYTES) * VEC4_BYTES;
    assert!(
        binding.offset + size <= binding.buffer.size(),
        "`{label}`: binding `{name}` ({} bytes at offset {}) is declared as vec4s but cannot be rounded up to \
         {size} bytes inside its {}-byte buffer; allocate it with Gpu::storage_buffer, which pads to 16 bytes",
        binding.size,
        binding.offset,
        binding.buffer.size()
    );
    TensorBinding { size, ..binding }
}

/// Creates the dispatch of the forward product
/// `out[m, out_offset + n] = sum_k inp[m, k] * W[k, n] + bias[n]`, which assigns `out`.
///
/// # Shapes
/// - `inp`: (M, K)
/// - `weight`: (K, N) for [`WeightLayout::InOut`], (N, K) for [`WeightLayout::OutIn`]
/// - `bias`: (N), or `None`
/// - `out`: (M, out_stride), of which columns `out_offset..out_offset + N` are written
///
/// # Panics
/// If a dimension is zero, the columns do not fit in `out_stride`, or a binding is smaller than
/// its shape.
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    inp: TensorBinding<'_>,
    weight: TensorBinding<'_>,
    bias: Option<TensorBinding<'_>>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    forward_with(gpu, label, Preference::Auto, shape, inp, weight, bias, out)
}

/// [`forward`] with the choice of variant.
#[allow(clippy::too_many_arguments)]
fn forward_with(
    gpu: &Gpu,
    label: &str,
    preference: Preference,
    shape: MatmulShape,
    inp: TensorBinding<'_>,
    weight: TensorBinding<'_>,
    bias: Option<TensorBinding<'_>>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    shape.check(label);
    let MatmulShape { rows, inner, cols, .. } = shape;
    let product = Product::forward(&shape, bias.is_some());
    let inp = sized_binding(label, "inp", inp, rows * inner, true);
    let weight = sized_binding(label, "weight", weight, inner * cols, true);
    let bias = bias.map(|b| sized_binding(label, "bias", b, cols, false));
    let out = sized_binding(label, "out", out, shape.out_floats(), false);
    product.dispatch(gpu, label, preference, out, inp, weight, bias)
}

/// Creates the dispatch of the input gradient
/// `dinp[m, k] (+)= sum_n dout[m, out_offset + n] * W[k, n]`, that is `dout @ W^T`. It assigns
/// `dinp`, or adds to it when `accumulate` is true.
///
/// # Shapes
/// - `dout`: (M, out_stride), of which columns `out_offset..out_offset + N` are read
/// - `weight`: (K, N) for [`WeightLayout::InOut`], (N, K) for [`WeightLayout::OutIn`]
/// - `dinp`: (M, K)
///
/// # Panics
/// As [`forward`].
pub(crate) fn backward_input(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    dout: TensorBinding<'_>,
    weight: TensorBinding<'_>,
    dinp: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Dispatch, GpuError> {
    backward_input_with(gpu, label, Preference::Auto, shape, dout, weight, dinp, accumulate)
}

/// [`backward_input`] with the choice of variant.
#[allow(clippy::too_many_arguments)]
fn backward_input_with(
    gpu: &Gpu,
    label: &str,
    preference: Preference,
    shape: MatmulShape,
    dout: TensorBinding<'_>,
    weight: TensorBinding<'_>,
    dinp: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Dispatch, GpuError> {
    shape.check(label);
    let MatmulShape { rows, inner, cols, .. } = shape;
    let product = Product::input_grad(&shape, accumulate);
    let dout = sized_binding(label, "dout", dout, shape.out_floats(), true);
    let weight = sized_binding(label, "weight", weight, inner * cols, true);
    let dinp = sized_binding(label, "dinp", dinp, rows * inner, false);
    product.dispatch(gpu, label, preference, dinp, dout, weight, None)
}

/// The shaders that a launcher of a product with a compressed frozen weight may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernels {
    /// The subgroup products derived from `shaders/matmul_subgroup.wgsl`, where the f32 product
    /// of the same form would use the subgroup variant (see [`encoded_subgroup`]), else the
    /// register-blocked kernel of the encoding.
    Any,
    /// Always the register-blocked kernel of the encoding.
    Blocked,
}

/// Returns whether aligned products with a compressed weight (K, N) run on the subgroup variant
/// here: where subgroups fit and the f32 products of the same form use that variant. The input
/// gradient (`input_grad`) is an nt product, the forward an nn product.
pub(crate) fn subgroup_products_chosen(gpu: &Gpu, input_grad: bool) -> Result<bool, GpuError> {
    let form = if input_grad { Form::Nt } else { Form::Nn };
    Ok(subgroups_fit(gpu) && automatic_variant(gpu, form)? == Variant::Subgroup)
}

/// Products of one shape, batched over (batch, head) pairs at regular operand strides, for the
/// subgroup variant: the attention products of `super::attention`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Batched {
    pub form: Form,
    pub rows: usize,
    pub cols: usize,
    pub inner: usize,
    /// Products in all: product z is batch z / heads, head z % heads.
    pub products: usize,
    pub heads: usize,
    pub lhs: Operand,
    pub rhs: Operand,
    pub out: Operand,
    pub accumulate: bool,
    /// Blocks of 32 result columns (the narrow module) instead of 128.
    pub narrow: bool,
}

/// Returns whether [`batched_subgroup`] should run products of `forms` here: subgroups fit and
/// the autotuned (or forced) choice of each of those forms is the subgroup variant. Asking only
/// for the forms a caller runs spares forward-only commands the tn trial on first use.
pub(crate) fn batched_subgroup_chosen(gpu: &Gpu, forms: &[Form]) -> Result<bool, GpuError> {
    if !subgroups_fit(gpu) {
        return Ok(false);
    }
    for &form in forms {
        if automatic_variant(gpu, form)? != Variant::Subgroup {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Creates the dispatch of the products of `batched` on the subgroup variant, which keeps its
/// deterministic order of summation. The reduction length of an nn product may be any length if
/// each lhs row is padded with zeros up to the next multiple of 4: the kernel adds zero times a
/// stored rhs value for each padding float. The row count of a tn product may be any length if
/// each lhs row is padded (with any values) to a multiple of 4: the padding feeds only results
/// that are not stored.
///
/// # Panics
/// If subgroups do not fit this device, or if a row of an operand (in any batch and head) does
/// not start on a 16-byte boundary. Also if the length read along operand rows is not a multiple
/// of 4 (`cols` for nn and tn, `inner` for nt), or if a binding ends before the last float that
/// its products read or write. Shapes come from the model, not from user input.
pub(crate) fn batched_subgroup(
    gpu: &Gpu,
    label: &str,
    batched: &Batched,
    result: TensorBinding<'_>,
    lhs: TensorBinding<'_>,
    rhs: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let Batched { form, rows, cols, inner, products, heads, lhs: lhs_operand, rhs: rhs_operand, out, accumulate, narrow } = *batched;
    assert!(subgroups_fit(gpu), "`{label}`: batched products need 8-lane subgroups");
    assert!(rows.min(cols).min(inner) > 0, "`{label}`: batched product {batched:?} has an empty dimension");
    assert!(heads > 0, "`{label}`: batched product {batched:?} has no heads");
    assert!(products > 0, "`{label}`: batched product {batched:?} has no products");
    assert!(products.is_multiple_of(heads), "`{label}`: {products} products are not whole batches of {heads} heads");
    let along_rows = match form {
        Form::Nn | Form::Tn => cols,
        Form::Nt => inner,
    };
    assert!(
        lhs_operand.rows_aligned() && rhs_operand.rows_aligned() && along_rows.is_multiple_of(VEC4),
        "`{label}`: batched product {batched:?} is not aligned for vec4 loads"
    );
    // Rows read and floats read per row of lhs, rhs and the result, padding included.
    let (lhs_rows, lhs_len, rhs_rows, rhs_len) = match form {
        Form::Nn => (rows, inner.next_multiple_of(VEC4), inner, cols),
        Form::Nt => (rows, inner, cols, inner),
        Form::Tn => (inner, rows.next_multiple_of(VEC4), inner, cols),
    };
    for (name, operand, binding, operand_rows, len) in
        [("lhs", lhs_operand, &lhs, lhs_rows, lhs_len), ("rhs", rhs_operand, &rhs, rhs_rows, rhs_len), ("result", out, &result, rows, cols)]
    {
        let end = operand.offset
            + (products / heads - 1) * operand.batch_stride
            + (heads - 1) * operand.head_stride
            + (operand_rows - 1) * operand.stride
            + len;
        assert!(
            end as u64 * F32_BYTES <= binding.size,
            "`{label}`: the {name} binding holds {} bytes, but batched product {batched:?} reaches float {end}",
            binding.size
        );
    }

    let product = Product {
        form,
        rows,
        cols,
        inner,
        lhs: lhs_operand,
        rhs: rhs_operand,
        out,
        accumulate,
        has_bias: false,
        products,
        heads,
    };
    let lhs = sized_binding(label, "lhs", lhs, (lhs.size / F32_BYTES) as usize, true);
    let rhs = sized_binding(label, "rhs", rhs, (rhs.size / F32_BYTES) as usize, true);
    let params = product.params();

    let groups = if narrow {
        let blocks = rows.div_ceil(BLOCK_ROWS) * cols.div_ceil(NARROW_BLOCK_COLS) * products;
        super::grid_1d(gpu, (blocks * SUBGROUP_LANES as usize) as u64, SUBGROUP_WORKGROUP_SIZE)
    } else {
        product.workgroups(gpu, Variant::Subgroup)
    };
    let bytes = Some(bytemuck::bytes_of(&params));
    let (nn, nt, tn) = if narrow { (&NARROW_NN, &NARROW_NT, &NARROW_TN) } else { (&SUBGROUP_NN, &SUBGROUP_NT, &SUBGROUP_TN) };
    match form {
        Form::Nn => gpu.dispatch(nn, label, bytes, &[result, lhs, rhs, gpu.placeholder()], groups),
        Form::Nt => gpu.dispatch(nt, label, bytes, &[result, lhs, rhs, gpu.placeholder()], groups),
        Form::Tn => gpu.dispatch(tn, label, bytes, &[result, lhs, rhs], groups),
    }
}

/// A frozen weight (K, N) in a compressed storage that a subgroup module derived by build.rs
/// decodes as it loads it.
#[derive(Clone, Copy)]
pub(crate) enum EncodedWeight<'a> {
    /// f16 pairs, as `super::f16_weights::pack` writes them: (K * N / 2) u32.
    F16 { packed: TensorBinding<'a> },
    /// NF4 codes and block scales, as `super::nf4::quantize` writes them.
    Nf4 {
        /// (K * N / 8) u32 of codes.
        packed: TensorBinding<'a>,
        /// f32 block scales, or 8-bit codes of them with `double_quant`.
        scales: TensorBinding<'a>,
        /// f32 steps of the scale codes with `double_quant`, else any binding (not read).
        steps: TensorBinding<'a>,
        double_quant: bool,
        /// Mean of the block scales with `double_quant`.
        scale_mean: f32,
    },
}

/// Uniform parameters of the NF4 subgroup module: those of the f32 module, then the fields that
/// build.rs adds.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Nf4MatmulParams {
    base: MatmulParams,
    double_quant: u32,
    scale_mean: f32,
    _pad0: u32,
    _pad1: u32,
}

/// Creates the dispatch of the product of [`forward`] or [`backward_input`] with a frozen weight
/// (K, N) stored as `weight` describes, on the subgroup variant. Returns `None` where that variant would not run
/// the f32 product of the same form and shape, and the caller then uses its register-blocked
/// kernel (`shaders/matmul_f16.wgsl` or `shaders/matmul_nf4.wgsl`). That is the case when the
/// device's subgroups do not fit, when the operands are not aligned for vec4 loads, and when the
/// autotuned (or forced) choice for the form is another variant. The caller has checked the
/// weight's bindings against its shape.
///
/// # Shapes
/// As [`forward`] (`input_grad` false: `act` is inp, `result` is out) or [`backward_input`]
/// (`input_grad` true: `act` is dout, `result` is dinp).
#[allow(clippy::too_many_arguments)]
pub(crate) fn encoded_subgroup(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    input_grad: bool,
    act: TensorBinding<'_>,
    weight: EncodedWeight<'_>,
    bias: Option<TensorBinding<'_>>,
    result: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Option<Dispatch>, GpuError> {
    shape.check(label);
    assert!(shape.layout == WeightLayout::InOut, "`{label}`: compressed weights are stored (K, N)");
    let MatmulShape { rows, inner, .. } = shape;

    let product = if input_grad { Product::input_grad(&shape, accumulate) } else { Product::forward(&shape, bias.is_some()) };
    let decodes = match weight {
        EncodedWeight::F16 { .. } => gpu.half_floats(),
        EncodedWeight::Nf4 { .. } => true,
    };
    let fits = product.vec4_loads() && subgroups_fit(gpu) && decodes;
    if !fits || automatic_variant(gpu, product.form)? != Variant::Subgroup {
        return Ok(None);
    }

    let (act_floats, result_floats) = if input_grad { (shape.out_floats(), rows * inner) } else { (rows * inner, shape.out_floats()) };
    let act = sized_binding(label, "activations", act, act_floats, true);
    let result = sized_binding(label, "result", result, result_floats, false);
    let bias = bias.map_or_else(|| gpu.placeholder(), |b| sized_binding(label, "bias", b, shape.cols, false));
    let groups = product.workgroups(gpu, Variant::Subgroup);
    let params = product.params();
    match weight {
        EncodedWeight::F16 { packed } => {
            // Two f16 values per u32; the u32 count is rounded up to whole vec4s like a float count.
            let packed = sized_binding(label, "packed weight", packed, shape.inner * shape.cols / 2, true);
            let kernel = if input_grad { &F16_SUBGROUP_NT } else { &F16_SUBGROUP_NN };
            gpu.dispatch(kernel, label, Some(bytemuck::bytes_of(&params)), &[result, act, packed, bias], groups).map(Some)
        }
        EncodedWeight::Nf4 { packed, scales, steps, double_quant, scale_mean } => {
            let params = Nf4MatmulParams { base: params, double_quant: u32::from(double_quant), scale_mean, _pad0: 0, _pad1: 0 };
            let kernel = if input_grad { &NF4_SUBGROUP_NT } else { &NF4_SUBGROUP_NN };
            gpu.dispatch(kernel, label, Some(bytemuck::bytes_of(&params)), &[result, act, packed, bias, scales, steps], groups).map(Some)
        }
    }
}

/// Creates the dispatch of the weight gradient
/// `dW[k, n] += sum_m inp[m, k] * dout[m, out_offset + n]`, stored in the weight's own layout.
/// Always accumulates, because the optimizer zeroes parameter gradients after applying them.
/// Each element is summed over M by one invocation in row order.
///
/// # Shapes
/// - `inp`: (M, K)
/// - `dout`: (M, out_stride), of which columns `out_offset..out_offset + N` are read
/// - `dweight`: (K, N) for [`WeightLayout::InOut`], (N, K) for [`WeightLayout::OutIn`]
///
/// # Panics
/// As [`forward`].
pub(crate) fn backward_weight(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    inp: TensorBinding<'_>,
    dout: TensorBinding<'_>,
    dweight: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    backward_weight_with(gpu, label, Preference::Auto, shape, inp, dout, dweight)
}

/// [`backward_weight`] with the choice of variant.
fn backward_weight_with(
    gpu: &Gpu,
    label: &str,
    preference: Preference,
    shape: MatmulShape,
    inp: TensorBinding<'_>,
    dout: TensorBinding<'_>,
    dweight: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    shape.check(label);
    let MatmulShape { rows, inner, cols, layout, .. } = shape;
    let dout_operand = Operand::at(shape.out_stride, shape.out_offset);
    // tn sums over M: (K, N) = inp^T @ dout, or (N, K) = dout^T @ inp.
    let (result_rows, result_cols, lhs_operand, rhs_operand) = match layout {
        WeightLayout::InOut => (inner, cols, Operand::dense(inner), dout_operand),
        WeightLayout::OutIn => (cols, inner, dout_operand, Operand::dense(inner)),
    };
    let product = Product {
        form: Form::Tn,
        rows: result_rows,
        cols: result_cols,
        inner: rows,
        lhs: lhs_operand,
        rhs: rhs_operand,
        out: Operand::dense(result_cols),
        accumulate: true,
        has_bias: false,
        products: 1,
        heads: 1,
    };
    let inp = sized_binding(label, "inp", inp, rows * inner, true);
    let dout = sized_binding(label, "dout", dout, shape.out_floats(), true);
    let dweight = sized_binding(label, "dweight", dweight, inner * cols, false);
    let (lhs, rhs) = match layout {
        WeightLayout::InOut => (inp, dout),
        WeightLayout::OutIn => (dout, inp),
    };
    product.dispatch(gpu, label, preference, dweight, lhs, rhs, None)
}

/// Creates the dispatch of the bias gradient `dbias[n] += sum_m dout[m, out_offset + n]`.
/// Always accumulates, like [`backward_weight`], and each element is summed over M by one
/// invocation in row order.
///
/// # Shapes
/// - `dout`: (M, out_stride), of which columns `out_offset..out_offset + N` are read
/// - `dbias`: (N)
///
/// # Panics
/// As [`forward`].
pub(crate) fn backward_bias(
    gpu: &Gpu,
    label: &str,
    shape: MatmulShape,
    dout: TensorBinding<'_>,
    dbias: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    shape.check(label);
    let MatmulShape { rows, cols, .. } = shape;
    let dout_operand = Operand::at(shape.out_stride, shape.out_offset);
    let params = MatmulParams {
        rows: rows as u32,
        cols: cols as u32,
        inner: 0,
        lhs_stride: dout_operand.stride as u32,
        lhs_offset: dout_operand.offset as u32,
        rhs_stride: 0,
        rhs_offset: 0,
        out_stride: cols as u32,
        out_offset: 0,
        accumulate: 1,
        has_bias: 0,
        vec4_loads: u32::from(dout_operand.rows_aligned() && cols.is_multiple_of(VEC4)),
        products: 1,
        heads: 1,
        ..bytemuck::Zeroable::zeroed()
    };
    let dout = sized_binding(label, "dout", dout, shape.out_floats(), true);
    let dbias = sized_binding(label, "dbias", dbias, cols, false);
    let invocations = cols.div_ceil(BIAS_COLS_PER_INVOCATION) as u64;
    let groups = super::grid_1d(gpu, invocations, WORKGROUP_SIZE);
    gpu.dispatch(&BACKWARD_BIAS, label, Some(bytemuck::bytes_of(&params)), &[dbias, dout], groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::matmul::{self as reference, MatmulDims};
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// Inputs are uniform in [-1, 1), so a product over K terms has magnitude about sqrt(K) / 3
    /// (18 for K = 3072), and in-order f32 accumulation adds about eps * |partial sum| per term.
    /// On lavapipe the largest error over the GPT-2 shapes was 1.4e-4 (K = 3072). The
    /// tolerances leave a factor of about seven, and a missing or doubled term (~0.1) fails.
    const ATOL: f64 = 3e-4;
    const RTOL: f64 = 1e-4;

    /// (M, K, N) of GPT-2 small's four block products at batch 8 x 120 tokens: attn.c_attn,
    /// attn.c_proj, mlp.c_fc, mlp.c_proj.
    const GPT2_SMALL: [(usize, usize, usize); 4] = [(960, 768, 2304), (960, 768, 768), (960, 768, 3072), (960, 3072, 768)];
    /// Rows (or weight-gradient columns) compared with the f64 reference for the GPT-2 shapes,
    /// so that the reference costs a few million multiply-adds per product, not billions.
    const GPT2_SAMPLES: usize = 10;
    /// Small shapes (M, K, N): single elements, M = 1, sizes below and across the 16 x 16 tile,
    /// and odd sizes that disable vec4 loads next to multiples of 4 that enable them. The last
    /// shape fills the 96 x 128 blocks of the subgroup variant partly in every direction, and its
    /// weight-gradient reduction (M = 101) is not a multiple of 4.
    const SMALL: [(usize, usize, usize); 10] = [
        (1, 1, 1),
        (1, 7, 3),
        (1, 64, 40),
        (7, 36, 20),
        (13, 29, 19),
        (9, 17, 33),
        (16, 32, 48),
        (17, 12, 4),
        (33, 20, 64),
        (101, 20, 132),
    ];
    const LAYOUTS: [WeightLayout; 2] = [WeightLayout::InOut, WeightLayout::OutIn];
    /// Every case runs on every variant. On an adapter without fitting subgroups, and for
    /// products without vec4 alignment, `Subgroup` falls back to the generic shader.
    const PATHS: [Preference; 3] = [Preference::Generic, Preference::Subgroup, Preference::Tiled];

    fn reference_dims(shape: &MatmulShape, rows: usize, cols: usize) -> MatmulDims {
        let layout = match shape.layout {
            WeightLayout::InOut => reference::WeightLayout::InOut,
            WeightLayout::OutIn => reference::WeightLayout::OutIn,
        };
        MatmulDims { rows, inner: shape.inner, cols, layout }
    }

    fn describe(shape: &MatmulShape) -> String {
        format!("M={} K={} N={} {:?}", shape.rows, shape.inner, shape.cols, shape.layout)
    }

    /// Returns every index below `len` when there are at most `count`, else `count` indices
    /// spread from 0 to `len - 1` plus the neighbours of both ends.
    fn sample(len: usize, count: usize) -> Vec<usize> {
        if len <= count {
            return (0..len).collect();
        }
        let mut picked: Vec<usize> = (0..count).map(|i| i * (len - 1) / (count - 1)).collect();
        picked.extend([1, len - 2]);
        picked.sort_unstable();
        picked.dedup();
        picked
    }

    fn take_rows(matrix: &[f32], width: usize, rows: &[usize]) -> Vec<f32> {
        rows.iter().flat_map(|&r| matrix[r * width..(r + 1) * width].iter().copied()).collect()
    }

    fn take_cols(matrix: &[f32], width: usize, cols: &[usize]) -> Vec<f32> {
        matrix.chunks(width).flat_map(|row| cols.iter().map(move |&c| row[c])).collect()
    }

    /// Returns the weight of `shape` restricted to output columns `cols`, in its own layout.
    fn weight_cols(weight: &[f32], shape: &MatmulShape, cols: &[usize]) -> Vec<f32> {
        match shape.layout {
            WeightLayout::InOut => take_cols(weight, shape.cols, cols),
            WeightLayout::OutIn => take_rows(weight, shape.inner, cols),
        }
    }

    fn upload(gpu: &Gpu, label: &str, data: &[f32]) -> wgpu::Buffer {
        gpu.upload(label, data).expect("test buffers fit the adapter's limits")
    }

    fn run(gpu: &Gpu, dispatch: Dispatch) {
        gpu.run("matmul test", &[dispatch]).expect("the test dispatch runs");
    }

    fn read(gpu: &Gpu, buffer: &wgpu::Buffer, len: usize) -> Vec<f32> {
        gpu.read(buffer, 0, len).expect("read-back succeeds")
    }

    /// Runs `forward` and compares rows `sample(M, samples)` with the reference.
    fn check_forward(gpu: &Gpu, path: Preference, shape: MatmulShape, with_bias: bool, samples: usize, seed: u64) {
        let MatmulShape { rows, inner, cols, .. } = shape;
        let inp = random_vec(rows * inner, seed);
        let weight = random_vec(inner * cols, seed + 1);
        let bias = random_vec(cols, seed + 2);
        let inp_buffer = upload(gpu, "inp", &inp);
        let weight_buffer = upload(gpu, "weight", &weight);
        let bias_buffer = upload(gpu, "bias", &bias);
        let out_buffer = upload(gpu, "out", &random_vec(rows * cols, seed + 3));
        let bias_binding = with_bias.then(|| (&bias_buffer).into());
        let dispatch = forward_with(
            gpu,
            "matmul forward",
            path,
            shape,
            (&inp_buffer).into(),
            (&weight_buffer).into(),
            bias_binding,
            (&out_buffer).into(),
        )
        .unwrap();
        run(gpu, dispatch);
        let got = read(gpu, &out_buffer, rows * cols);

        let checked = sample(rows, samples);
        let bias64 = to_f64(&bias);
        let want = reference::matmul_forward(
            &to_f64(&take_rows(&inp, inner, &checked)),
            &to_f64(&weight),
            with_bias.then_some(bias64.as_slice()),
            reference_dims(&shape, checked.len(), cols),
        );
        let description = format!("matmul forward {path:?} {} bias={with_bias} rows {checked:?}", describe(&shape));
        assert_close(&description, &take_rows(&got, cols, &checked), &want, ATOL, RTOL);
    }

    /// Runs `backward_input` into a dinp that contains random values, and compares rows
    /// `sample(M, samples)` with the reference (plus those values when accumulating).
    fn check_backward_input(gpu: &Gpu, path: Preference, shape: MatmulShape, accumulate: bool, samples: usize, seed: u64) {
        let MatmulShape { rows, inner, cols, .. } = shape;
        let dout = random_vec(rows * cols, seed);
        let weight = random_vec(inner * cols, seed + 1);
        let initial = random_vec(rows * inner, seed + 2);
        let dout_buffer = upload(gpu, "dout", &dout);
        let weight_buffer = upload(gpu, "weight", &weight);
        let dinp_buffer = upload(gpu, "dinp", &initial);
        let dispatch = backward_input_with(
            gpu,
            "matmul backward_input",
            path,
            shape,
            (&dout_buffer).into(),
            (&weight_buffer).into(),
            (&dinp_buffer).into(),
            accumulate,
        )
        .unwrap();
        run(gpu, dispatch);
        let got = read(gpu, &dinp_buffer, rows * inner);

        let checked = sample(rows, samples);
        let mut want = reference::matmul_backward_input(
            &to_f64(&take_rows(&dout, cols, &checked)),
            &to_f64(&weight),
            reference_dims(&shape, checked.len(), cols),
        );
        if accumulate {
            for (w, i) in want.iter_mut().zip(take_rows(&initial, inner, &checked)) {
                *w += f64::from(i);
            }
        }
        let description =
            format!("matmul backward_input {path:?} {} accumulate={accumulate} rows {checked:?}", describe(&shape));
        assert_close(&description, &take_rows(&got, inner, &checked), &want, ATOL, RTOL);
    }

    /// Runs `backward_weight` into a dweight that contains random values, and compares the
    /// gradient of output columns `sample(N, samples)` with the reference plus those values.
    fn check_backward_weight(gpu: &Gpu, path: Preference, shape: MatmulShape, samples: usize, seed: u64) {
        let MatmulShape { rows, inner, cols, .. } = shape;
        let inp = random_vec(rows * inner, seed);
        let dout = random_vec(rows * cols, seed + 1);
        let initial = random_vec(inner * cols, seed + 2);
        let inp_buffer = upload(gpu, "inp", &inp);
        let dout_buffer = upload(gpu, "dout", &dout);
        let dweight_buffer = upload(gpu, "dweight", &initial);
        let dispatch = backward_weight_with(
            gpu,
            "matmul backward_weight",
            path,
            shape,
            (&inp_buffer).into(),
            (&dout_buffer).into(),
            (&dweight_buffer).into(),
        )
        .unwrap();
        run(gpu, dispatch);
        let got = read(gpu, &dweight_buffer, inner * cols);

        let checked = sample(cols, samples);
        let mut want = reference::matmul_backward_weight(
            &to_f64(&inp),
            &to_f64(&take_cols(&dout, cols, &checked)),
            reference_dims(&shape, rows, checked.len()),
        );
        for (w, i) in want.iter_mut().zip(weight_cols(&initial, &shape, &checked)) {
            *w += f64::from(i);
        }
        let description = format!("matmul backward_weight {path:?} {} columns {checked:?}", describe(&shape));
        assert_close(&description, &weight_cols(&got, &shape, &checked), &want, ATOL, RTOL);
    }

    /// Runs `backward_bias` into a dbias that contains random values and compares every element.
    fn check_backward_bias(gpu: &Gpu, shape: MatmulShape, seed: u64) {
        let MatmulShape { rows, cols, .. } = shape;
        let dout = random_vec(rows * cols, seed);
        let initial = random_vec(cols, seed + 1);
        let dout_buffer = upload(gpu, "dout", &dout);
        let dbias_buffer = upload(gpu, "dbias", &initial);
        let dispatch =
            backward_bias(gpu, "matmul backward_bias", shape, (&dout_buffer).into(), (&dbias_buffer).into()).unwrap();
        run(gpu, dispatch);
        let got = read(gpu, &dbias_buffer, cols);
        let mut want = reference::matmul_backward_bias(&to_f64(&dout), rows, cols);
        for (w, i) in want.iter_mut().zip(&initial) {
            *w += f64::from(*i);
        }
        assert_close(&format!("matmul backward_bias {}", describe(&shape)), &got, &want, ATOL, RTOL);
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<MatmulParams>() % 16, 0);
    }

    #[test]
    fn vec4_loads_follow_alignment() {
        let aligned = MatmulShape::new(8, 768, 2304, WeightLayout::InOut);
        let odd_inner = MatmulShape::new(8, 29, 2304, WeightLayout::InOut);
        let product = |shape: MatmulShape, form: Form| Product {
            form,
            rows: shape.rows,
            cols: shape.cols,
            inner: shape.inner,
            lhs: Operand::dense(shape.inner),
            rhs: Operand::dense(shape.cols),
            out: Operand::dense(shape.cols),
            accumulate: false,
            has_bias: false,
            products: 1,
            heads: 1,
        };
        assert!(product(aligned, Form::Nn).vec4_loads(), "nn 8x768x2304 should use vec4 loads");
        assert!(!product(odd_inner, Form::Nn).vec4_loads(), "nn with K=29 must not use vec4 loads");
        let mut offset = product(aligned, Form::Nt);
        offset.lhs.offset = 2;
        assert!(!offset.vec4_loads(), "nt with lhs offset 2 must not use vec4 loads");
    }

    /// The subgroup cases exercise the subgroup shader only if the launchers pick it. On an
    /// adapter with 8-lane subgroups, aligned products of every form must use it. Products
    /// without vec4 alignment and `Preference::Generic` must not.
    #[test]
    fn subgroup_variant_is_chosen_where_it_applies() {
        let Some(gpu) = test_gpu() else { return };
        let fits = subgroups_fit(gpu);
        let product = |form: Form, inner: usize| Product {
            form,
            rows: 960,
            cols: 768,
            inner,
            lhs: Operand::dense(768),
            rhs: Operand::dense(768),
            out: Operand::dense(768),
            accumulate: false,
            has_bias: false,
            products: 1,
            heads: 1,
        };
        let expected = if fits { Variant::Subgroup } else { Variant::Generic };
        let tiled = if tiled_fits(gpu) { Variant::Tiled } else { Variant::Generic };
        for form in [Form::Nn, Form::Nt, Form::Tn] {
            let chosen = product(form, 768).variant(gpu, Preference::Subgroup).unwrap();
            assert_eq!(chosen, expected, "{form:?} 960x768x768 on {} (subgroups fit: {fits})", gpu.describe());
            let generic = product(form, 768).variant(gpu, Preference::Generic).unwrap();
            assert_eq!(generic, Variant::Generic, "{form:?} with Preference::Generic");
            // The tiled variant has no alignment requirement.
            assert_eq!(product(form, 29).variant(gpu, Preference::Tiled).unwrap(), tiled, "{form:?} tiled with K=29");
        }
        // The shared test device has autotuning off, so an automatic product takes the default.
        if forced_variant().is_none() {
            let default = default_variant(gpu);
            let on_cpu = gpu.info().device_type == wgpu::DeviceType::Cpu;
            match default {
                Variant::Subgroup => assert!(fits),
                Variant::Tiled => assert!(!fits && !on_cpu),
                Variant::Generic => assert!(!fits && (on_cpu || !tiled_fits(gpu))),
            }
            for form in [Form::Nn, Form::Nt, Form::Tn] {
                assert_eq!(product(form, 768).variant(gpu, Preference::Auto).unwrap(), default, "{form:?} with autotuning off");
            }
        }
        let mut odd = product(Form::Nt, 768);
        odd.lhs.offset = 2;
        assert_eq!(odd.variant(gpu, Preference::Subgroup).unwrap(), Variant::Generic, "nt with lhs offset 2");
        assert_eq!(product(Form::Nn, 29).variant(gpu, Preference::Subgroup).unwrap(), Variant::Generic, "nn with K=29");
    }

    /// A device with autotuning on measures each form once, writes its choices to the cache and
    /// computes the same products as the reference with whatever it chose.
    #[test]
    fn autotune_caches_choices_and_stays_correct() {
        let Some(shared) = test_gpu() else { return };
        let Ok(mut gpu) = Gpu::new(&crate::gpu::GpuOptions { autotune: crate::gpu::Autotune::On, ..Default::default() }) else {
            panic!("a second device on {} could not be opened", shared.describe());
        };
        let dir = std::env::temp_dir().join(format!("shadertune-matmul-autotune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        gpu.autotune_cache = Some(dir.join("autotune.json"));
        let chosen = chosen_variants(&gpu).unwrap();
        assert_eq!(chosen.len(), 3);
        let names: Vec<&str> = candidates(&gpu).into_iter().map(variant_name).collect();
        let tuned = names.len() > 1 && forced_variant().is_none();
        for (form, variant) in &chosen {
            assert!(names.contains(variant) || !tuned, "{form} chose {variant}, not one of the candidates {names:?}");
        }
        let cached = std::fs::read_to_string(dir.join("autotune.json")).unwrap_or_default();
        for family in ["matmul_nn", "matmul_nt", "matmul_tn"] {
            assert_eq!(cached.contains(family), tuned, "cache entry for {family} (candidates {names:?}):\n{cached}");
            for name in &names {
                assert!(!tuned || cached.contains(&format!("\"{name}\"")), "no {name} timing for {family}:\n{cached}");
            }
        }
        // The choices stay for the rest of the device's life, so a second request measures nothing.
        assert_eq!(chosen_variants(&gpu).unwrap(), chosen);
        for (i, layout) in LAYOUTS.into_iter().enumerate() {
            let shape = MatmulShape::new(96, 64, 128, layout);
            let seed = 500 + 10 * i as u64;
            check_forward(&gpu, Preference::Auto, shape, true, usize::MAX, seed);
            check_backward_input(&gpu, Preference::Auto, shape, false, usize::MAX, seed + 1);
            check_backward_weight(&gpu, Preference::Auto, shape, usize::MAX, seed + 2);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn matmul_forward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for path in PATHS {
            for (i, &(rows, inner, cols)) in SMALL.iter().enumerate() {
                for layout in LAYOUTS {
                    for with_bias in [true, false] {
                        let shape = MatmulShape::new(rows, inner, cols, layout);
                        check_forward(gpu, path, shape, with_bias, usize::MAX, 10 * i as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_backward_input_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for path in PATHS {
            for (i, &(rows, inner, cols)) in SMALL.iter().enumerate() {
                for layout in LAYOUTS {
                    for accumulate in [false, true] {
                        let shape = MatmulShape::new(rows, inner, cols, layout);
                        check_backward_input(gpu, path, shape, accumulate, usize::MAX, 100 + 10 * i as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn matmul_backward_weight_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for path in PATHS {
            for (i, &(rows, inner, cols)) in SMALL.iter().enumerate() {
                for layout in LAYOUTS {
                    let shape = MatmulShape::new(rows, inner, cols, layout);
                    check_backward_weight(gpu, path, shape, usize::MAX, 200 + 10 * i as u64);
                }
            }
        }
    }

    #[test]
    fn matmul_backward_bias_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (i, &(rows, inner, cols)) in SMALL.iter().enumerate() {
            check_backward_bias(gpu, MatmulShape::new(rows, inner, cols, WeightLayout::InOut), 300 + 10 * i as u64);
        }
        check_backward_bias(gpu, MatmulShape::new(960, 768, 3072, WeightLayout::InOut), 390);
    }

    #[test]
    fn matmul_forward_gpt2_small_shapes() {
        let Some(gpu) = test_gpu() else { return };
        for path in PATHS {
            for (i, &(rows, inner, cols)) in GPT2_SMALL.iter().enumerate() {
                // Conv1D weights (K, N) come with a bias, and the nn.Linear heads (N, K) have none.
                let conv = MatmulShape::new(rows, inner, cols, WeightLayout::InOut);
                check_forward(gpu, path, conv, true, GPT2_SAMPLES, 400 + 10 * i as u64);
                let linear = MatmulShape::new(rows, inner, cols, WeightLayout::OutIn);
                check_forward(gpu, path, linear, false, GPT2_SAMPLES, 405 + 10 * i as u64);
            }
        }
    }

    #[test]
    fn matmul_backward_input_gpt2_small_shapes() {
        let Some(gpu) = test_gpu() else { return };
        for path in PATHS {
            for (i, &(rows, inner, cols)) in GPT2_SMALL.iter().enumerate() {
                for (j, layout) in LAYOUTS.into_iter().enumerate() {
                    // Half of the cases accumulate, as every input gradient after the first does.
                    let accumulate = (i + j) % 2 == 1;
                    let shape = MatmulShape::new(rows, inner, cols, layout);
                    check_backward_input(gpu, path, shape, accumulate, GPT2_SAMPLES, 500 + 10 * i as u64 + j as u64);
                }
            }
        }
    }

    #[test]
    fn matmul_backward_weight_gpt2_small_shapes() {
        let Some(gpu) = test_gpu() else { return };
        for path in PATHS {
            for (i, &(rows, inner, cols)) in GPT2_SMALL.iter().enumerate() {
                for (j, layout) in LAYOUTS.into_iter().enumerate() {
                    let shape = MatmulShape::new(rows, inner, cols, layout);
                    check_backward_weight(gpu, path, shape, GPT2_SAMPLES, 600 + 10 * i as u64 + j as u64);
                }
            }
        }
    }

    /// Splits the weight into chunks of at most `chunk` output columns, as a weight larger than
    /// the storage binding limit (the tied LM head) must be split, and checks every launcher
    /// against the unsplit reference.
    #[allow(clippy::too_many_arguments)]
    fn check_chunked(
        gpu: &Gpu,
        path: Preference,
        rows: usize,
        inner: usize,
        vocab: usize,
        chunk: usize,
        layout: WeightLayout,
        seed: u64,
    ) {
        let full = MatmulShape::new(rows, inner, vocab, layout);
        let description = format!("matmul chunked {path:?} {} chunk={chunk}", describe(&full));
        let inp = random_vec(rows * inner, seed);
        let weight = random_vec(inner * vocab, seed + 1);
        let bias = random_vec(vocab, seed + 2);
        let dout = random_vec(rows * vocab, seed + 3);
        let inp_buffer = upload(gpu, "inp", &inp);
        let dout_buffer = upload(gpu, "dout", &dout);
        let out_buffer = gpu.storage_buffer("out", (rows * vocab * 4) as u64).unwrap();
        let dinp_buffer = gpu.storage_buffer("dinp", (rows * inner * 4) as u64).unwrap();

        let starts: Vec<usize> = (0..vocab).step_by(chunk).collect();
        let mut dweight_buffers = Vec::new();
        for (index, &start) in starts.iter().enumerate() {
            let end = (start + chunk).min(vocab);
            let columns: Vec<usize> = (start..end).collect();
            let shape = MatmulShape { cols: end - start, out_offset: start, out_stride: vocab, ..full };
            let weight_buffer = upload(gpu, "weight chunk", &weight_cols(&weight, &full, &columns));
            let bias_buffer = upload(gpu, "bias chunk", &bias[start..end]);
            let dweight_buffer = gpu.storage_buffer("dweight chunk", (inner * (end - start) * 4) as u64).unwrap();
            let dispatches = vec![
                forward_with(
                    gpu,
                    "chunk forward",
                    path,
                    shape,
                    (&inp_buffer).into(),
                    (&weight_buffer).into(),
                    Some((&bias_buffer).into()),
                    (&out_buffer).into(),
                )
                .unwrap(),
                backward_input_with(
                    gpu,
                    "chunk backward_input",
                    path,
                    shape,
                    (&dout_buffer).into(),
                    (&weight_buffer).into(),
                    (&dinp_buffer).into(),
                    index > 0,
                )
                .unwrap(),
                backward_weight_with(
                    gpu,
                    "chunk backward_weight",
                    path,
                    shape,
                    (&inp_buffer).into(),
                    (&dout_buffer).into(),
                    (&dweight_buffer).into(),
                )
                .unwrap(),
            ];
            gpu.run("matmul chunk test", &dispatches).unwrap();
            // The bias is split like the weight, so each chunk's bias gradient has its own buffer.
            let dbias_chunk = upload(gpu, "dbias chunk", &vec![0.0f32; end - start]);
            run(gpu, backward_bias(gpu, "chunk backward_bias", shape, (&dout_buffer).into(), (&dbias_chunk).into()).unwrap());
            let got = read(gpu, &dbias_chunk, end - start);
            let want = reference::matmul_backward_bias(&to_f64(&take_cols(&dout, vocab, &columns)), rows, end - start);
            assert_close(&format!("{description} backward_bias columns {start}..{end}"), &got, &want, ATOL, RTOL);
            dweight_buffers.push((start, end, dweight_buffer));
        }

        let dims = reference_dims(&full, rows, vocab);
        let want = reference::matmul_forward(&to_f64(&inp), &to_f64(&weight), Some(&to_f64(&bias)), dims);
        assert_close(&format!("{description} forward"), &read(gpu, &out_buffer, rows * vocab), &want, ATOL, RTOL);
        let want = reference::matmul_backward_input(&to_f64(&dout), &to_f64(&weight), dims);
        assert_close(&format!("{description} backward_input"), &read(gpu, &dinp_buffer, rows * inner), &want, ATOL, RTOL);
        let want_dweight = reference::matmul_backward_weight(&to_f64(&inp), &to_f64(&dout), dims);
        let want_dweight: Vec<f32> = want_dweight.iter().map(|&x| x as f32).collect();
        for (start, end, buffer) in dweight_buffers {
            let columns: Vec<usize> = (start..end).collect();
            let want = to_f64(&weight_cols(&want_dweight, &full, &columns));
            let got = read(gpu, &buffer, inner * (end - start));
            assert_close(&format!("{description} backward_weight columns {start}..{end}"), &got, &want, ATOL, RTOL);
        }
    }

    #[test]
    fn matmul_chunked_columns_match_reference() {
        let Some(gpu) = test_gpu() else { return };
        for path in PATHS {
            for layout in LAYOUTS {
                // 37 columns: odd stride and offsets, scalar loads of dout.
                check_chunked(gpu, path, 11, 24, 37, 16, layout, 700);
                // 40 columns in chunks of 16, 16 and 8: aligned offsets, vec4 loads of dout.
                check_chunked(gpu, path, 9, 20, 40, 16, layout, 710);
                // M = 1, as when generating one token.
                check_chunked(gpu, path, 1, 32, 23, 10, layout, 720);
                // 136 columns in chunks of 72 and 64: aligned, wider than one subgroup's 64
                // columns, and 40 rows, more than one 32-row block.
                check_chunked(gpu, path, 40, 36, 136, 72, layout, 730);
            }
        }
    }

    #[test]
    fn matmul_results_are_bitwise_reproducible() {
        let Some(gpu) = test_gpu() else { return };
        let shape = MatmulShape::new(37, 64, 52, WeightLayout::InOut);
        let inp = upload(gpu, "inp", &random_vec(37 * 64, 800));
        let dout = upload(gpu, "dout", &random_vec(37 * 52, 801));
        for path in PATHS {
            let mut results = Vec::new();
            for _ in 0..2 {
                let dweight = gpu.storage_buffer("dweight", (64 * 52 * 4) as u64).unwrap();
                let dispatch =
                    backward_weight_with(gpu, "dweight", path, shape, (&inp).into(), (&dout).into(), (&dweight).into())
                        .unwrap();
                run(gpu, dispatch);
                let bits: Vec<u32> = read(gpu, &dweight, 64 * 52).iter().map(|x| x.to_bits()).collect();
                results.push(bits);
            }
            let first_difference = results[0].iter().zip(&results[1]).position(|(a, b)| a != b);
            assert_eq!(first_difference, None, "matmul backward_weight {path:?} differs between two runs at that index");
        }
    }
}
