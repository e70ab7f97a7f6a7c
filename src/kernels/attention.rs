//! Causal multi-head self-attention (`shaders/attention.wgsl`) in the GPT-2 layout.
//!
//! The forward saves the softmax probabilities `att` for the backward. `att` is (B, NH, T, T'),
//! with rows padded to T' = T rounded up to a multiple of 4 ([`AttentionShape::att_stride`]):
//! 5.5 MB for GPT-2 small fine-tuning (B = 8, T = 120), but 400 MB at B = 8, T = 1024, above many
//! adapters' storage binding limit. A caller with long sequences can split the batch and bind
//! each slice of qkv, att, out and their gradients at an offset.
//!
//! Two sets of kernels compute the same six products: scores, weighted sum, and the gradients of
//! the probabilities, queries, keys and values. Where the subgroup matrix products run (8-lane
//! subgroups, chosen by the matmul autotuner) and the head size is a multiple of 4, they are
//! batched subgroup products over the (b, h) pairs ([`Kernels::Products`]). On lavapipe those
//! load far fewer floats per multiply-add than the tile kernels of `shaders/attention.wgsl`,
//! which every other adapter uses ([`Kernels::Tiles`]). The
//! softmax row kernels serve both, and att holds the same probabilities (up to rounding)
//! whichever set wrote it.

use super::matmul::{self, Batched, Form, Operand};
use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "attention", source: include_str!("../../shaders/attention.wgsl") };

/// Must match `TILE_WORKGROUP_SIZE` in the shader: the kernels that compute blocks of outputs.
pub(crate) const TILE_WORKGROUP_SIZE: u32 = 64;
/// Must match `ROW_WORKGROUP_SIZE` in the shader: the kernels with one invocation per row of att.
pub(crate) const ROW_WORKGROUP_SIZE: u32 = 64;
/// Must match `TILE` in the shader: the side of the square block of outputs of one invocation.
const TILE: usize = 8;

/// Bindings after the uniform, shared by all entry points: qkv, att, out or datt, dout, dqkv.
/// Each entry point binds the first `count` of them.
const fn bindings(count: usize) -> &'static [BindingKind] {
    const ALL: [BindingKind; 6] = [
        BindingKind::Uniform,
        BindingKind::ReadOnly,
        BindingKind::ReadWrite,
        BindingKind::ReadWrite,
        BindingKind::ReadOnly,
        BindingKind::ReadWrite,
    ];
    ALL.split_at(count + 1).0
}

const fn entry(name: &'static str, bound: usize) -> KernelEntry {
    KernelEntry { family: &FAMILY, entry: name, bindings: bindings(bound) }
}

static FORWARD_SCORES: KernelEntry = entry("attention_forward_scores", 2);
static FORWARD_SOFTMAX: KernelEntry = entry("attention_forward_softmax", 2);
static FORWARD_VALUES: KernelEntry = entry("attention_forward_values", 3);
static BACKWARD_DATT: KernelEntry = entry("attention_backward_datt", 4);
static BACKWARD_SOFTMAX: KernelEntry = entry("attention_backward_softmax", 3);
static BACKWARD_QUERY: KernelEntry = entry("attention_backward_query", 5);
static BACKWARD_KEY_VALUE: KernelEntry = entry("attention_backward_key_value", 5);

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[
    (&FORWARD_SCORES, TILE_WORKGROUP_SIZE),
    (&FORWARD_SOFTMAX, ROW_WORKGROUP_SIZE),
    (&FORWARD_VALUES, TILE_WORKGROUP_SIZE),
    (&BACKWARD_DATT, TILE_WORKGROUP_SIZE),
    (&BACKWARD_SOFTMAX, ROW_WORKGROUP_SIZE),
    (&BACKWARD_QUERY, TILE_WORKGROUP_SIZE),
    (&BACKWARD_KEY_VALUE, TILE_WORKGROUP_SIZE),
];

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AttentionShape {
    pub batch: usize,
    pub seq_len: usize,
    pub channels: usize,
    pub num_heads: usize,
}

impl AttentionShape {
    fn qkv_floats(&self) -> usize {
        self.batch * self.seq_len * 3 * self.channels
    }

    fn out_floats(&self) -> usize {
        self.batch * self.seq_len * self.channels
    }

    /// Floats between two rows of att and datt: T rounded up to a multiple of 4, so that the
    /// batched products can read rows as vec4s. The padding contains zeros.
    pub(crate) fn att_stride(&self) -> usize {
        self.seq_len.next_multiple_of(4)
    }

    /// Returns the shape of att and datt: (B, NH, T, att_stride).
    pub(crate) fn att_dims(&self) -> [usize; 4] {
        [self.batch, self.num_heads, self.seq_len, self.att_stride()]
    }

    pub(crate) fn att_floats(&self) -> usize {
        self.att_dims().iter().product()
    }

    fn head_size(&self) -> usize {
        self.channels / self.num_heads
    }

    /// Rows of att, one per (b, h, t): the work items of the row kernels.
    fn rows(&self) -> u64 {
        (self.batch * self.num_heads * self.seq_len) as u64
    }

    /// Blocks of (query, key) on or below the diagonal, for each (b, h).
    fn triangle_blocks(&self) -> u64 {
        let tiles = self.seq_len.div_ceil(TILE);
        (self.batch * self.num_heads * tiles * (tiles + 1) / 2) as u64
    }

    /// Blocks of (token, head channel), for each (b, h).
    fn channel_blocks(&self) -> u64 {
        (self.batch * self.num_heads * self.seq_len.div_ceil(TILE) * self.head_size().div_ceil(TILE)) as u64
    }
}

/// Uniform parameters, laid out as `AttentionParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AttentionParams {
    pub batch_size: u32,
    pub seq_len: u32,
    pub channels: u32,
    pub num_heads: u32,
    /// HS = channels / num_heads.
    pub head_size: u32,
    /// 1: the backward adds into dqkv; 0: it overwrites dqkv.
    pub accumulate: u32,
    /// 1 / sqrt(HS), the scaled dot-product factor.
    pub scale: f32,
    /// Floats between two rows of att and datt.
    pub att_stride: u32,
    /// Factor on the scores in the forward softmax: 1 after the tile kernels, `scale` after the
    /// batched products.
    pub softmax_scale: f32,
    /// Factor on dscores in the backward softmax: 1 for the tile kernels, `scale` for the batched
    /// products.
    pub dscores_scale: f32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// The kernels that compute the attention products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernels {
    /// The tile kernels of `shaders/attention.wgsl`: one 8 x 8 block of outputs per invocation,
    /// causal blocks only. They run on every adapter.
    Tiles,
    /// Batched products of the subgroup matmul over the (b, h) pairs, for 8-lane subgroups. They
    /// compute the masked half of the scores too, and need a head size that is a multiple of 4.
    Products,
}

/// Result columns up to which the batched products use 32-column blocks rather than 128-column
/// ones.
const NARROW_MAX_COLS: usize = 64;

/// Environment variable that forces the tile kernels (`tiles`) where the products would run.
const ATTENTION_VARIABLE: &str = "SHADERTUNE_ATTENTION";

/// Selects the kernels for `shape`: the batched products where the subgroup matmul runs the
/// product forms they use and the head size is a multiple of 4, unless
/// SHADERTUNE_ATTENTION=tiles. The forward uses nt and nn, the backward (`backward`) tn as well.
/// Either set of kernels reads the att that the other wrote, so the two directions may differ
/// where the autotuner chose another kernel for tn.
pub(crate) fn select_kernels(gpu: &Gpu, shape: &AttentionShape, backward: bool) -> Result<Kernels, GpuError> {
    static FORCED_TILES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let forced = *FORCED_TILES.get_or_init(|| match std::env::var(ATTENTION_VARIABLE).as_deref().map(str::trim) {
        Ok("tiles") => true,
        Ok(other) => {
            log::warn!("ignoring {ATTENTION_VARIABLE}={other}: expected `tiles`; unset it to follow the matmul's choice");
            false
        }
        Err(_) => false,
    });
    let forms: &[Form] = if backward { &[Form::Nn, Form::Nt, Form::Tn] } else { &[Form::Nn, Form::Nt] };
    let products = !forced && shape.head_size().is_multiple_of(4) && matmul::batched_subgroup_chosen(gpu, forms)?;
    Ok(if products { Kernels::Products } else { Kernels::Tiles })
}

fn params(shape: &AttentionShape, accumulate: bool, kernels: Kernels) -> AttentionParams {
    assert!(shape.batch > 0, "attention: B must be at least 1");
    assert!(shape.seq_len > 0, "attention: T must be at least 1");
    assert!(shape.num_heads > 0, "attention: NH must be at least 1");
    assert!(
        shape.channels > 0 && shape.channels.is_multiple_of(shape.num_heads),
        "attention: C = {} must be a positive multiple of NH = {} (the model config validates this)",
        shape.channels,
        shape.num_heads
    );
    let head_size = shape.head_size();
    let scale = 1.0 / (head_size as f32).sqrt();
    let row_scale = match kernels {
        Kernels::Tiles => 1.0,
        Kernels::Products => scale,
    };
    AttentionParams {
        batch_size: shape.batch as u32,
        seq_len: shape.seq_len as u32,
        channels: shape.channels as u32,
        num_heads: shape.num_heads as u32,
        head_size: head_size as u32,
        accumulate: u32::from(accumulate),
        scale,
        att_stride: shape.att_stride() as u32,
        softmax_scale: row_scale,
        dscores_scale: row_scale,
        _pad0: 0,
        _pad1: 0,
    }
}

/// Panics unless `binding` contains at least `elements` 4-byte values. Shapes come from the
/// model, not from user input, and a smaller binding would make the shader read or write the
/// wrong elements without any error.
fn check_binding(label: &str, name: &str, binding: &TensorBinding<'_>, elements: usize) {
    let needed = elements as u64 * 4;
    assert!(binding.size >= needed, "`{label}`: binding `{name}` is {} bytes, but its shape needs {needed}", binding.size);
}

/// Runs causal self-attention: `att = softmax(q k^T / sqrt(HS))` with keys after the query
/// masked out, then `out = att v`, heads concatenated, with the kernels [`select_kernels`] selects.
/// Returns the dispatches to record in order.
///
/// # Shapes
/// - `qkv`: (B, T, 3C), q | k | v along the last axis; head h uses channels h*HS..(h+1)*HS of each
/// - `att`: (B, NH, T, T') ([`AttentionShape::att_dims`]), assigned: the probabilities, exactly 0
///   where the key follows the query and in the padding, saved for [`backward`]
/// - `out`: (B, T, C), assigned
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    shape: AttentionShape,
    qkv: TensorBinding<'_>,
    att: TensorBinding<'_>,
    out: TensorBinding<'_>,
) -> Result<Vec<Dispatch>, GpuError> {
    forward_with(gpu, label, shape, select_kernels(gpu, &shape, false)?, qkv, att, out)
}

/// [`forward`] with the choice of kernels.
fn forward_with(
    gpu: &Gpu,
    label: &str,
    shape: AttentionShape,
    kernels: Kernels,
    qkv: TensorBinding<'_>,
    att: TensorBinding<'_>,
    out: TensorBinding<'_>,
) -> Result<Vec<Dispatch>, GpuError> {
    let p = params(&shape, false, kernels);
    check_binding(label, "qkv", &qkv, shape.qkv_floats());
    check_binding(label, "att", &att, shape.att_floats());
    check_binding(label, "out", &out, shape.out_floats());
    let bytes = Some(bytemuck::bytes_of(&p));
    let rows = super::grid_1d(gpu, shape.rows(), ROW_WORKGROUP_SIZE);
    let softmax = gpu.dispatch(&FORWARD_SOFTMAX, format!("{label} softmax"), bytes, &[qkv, att], rows)?;
    Ok(match kernels {
        Kernels::Tiles => {
            let tiles = super::grid_1d(gpu, shape.triangle_blocks(), TILE_WORKGROUP_SIZE);
            let channels = super::grid_1d(gpu, shape.channel_blocks(), TILE_WORKGROUP_SIZE);
            vec![
                gpu.dispatch(&FORWARD_SCORES, format!("{label} scores"), bytes, &[qkv, att], tiles)?,
                softmax,
                gpu.dispatch(&FORWARD_VALUES, format!("{label} values"), bytes, &[qkv, att, out], channels)?,
            ]
        }
        Kernels::Products => {
            let (t, hs) = (shape.seq_len, shape.head_size());
            let scores = shape.product(Form::Nt, [t, t, hs], [shape.qkv_part(0), shape.qkv_part(1), shape.att_operand()], false);
            let values = shape.product(Form::Nn, [t, hs, t], [shape.att_operand(), shape.qkv_part(2), shape.btc_operand()], false);
            vec![
                matmul::batched_subgroup(gpu, &format!("{label} scores"), &scores, att, qkv, qkv)?,
                softmax,
                matmul::batched_subgroup(gpu, &format!("{label} values"), &values, out, att, qkv)?,
            ]
        }
    })
}

/// Backpropagates through [`forward`] into `dqkv` (assigned, or accumulated when `accumulate`),
/// with the kernels [`select_kernels`] selects. `datt` is scratch:
/// it ends up holding the gradient of the pre-softmax scores. Returns the dispatches to record
/// in order.
///
/// # Shapes
/// - `dout`: (B, T, C)
/// - `qkv`: (B, T, 3C), the forward input
/// - `att`: (B, NH, T, T'), from [`forward`]
/// - `datt`: (B, NH, T, T'), scratch, assigned
/// - `dqkv`: (B, T, 3C), assigned or accumulated
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    gpu: &Gpu,
    label: &str,
    shape: AttentionShape,
    dout: TensorBinding<'_>,
    qkv: TensorBinding<'_>,
    att: TensorBinding<'_>,
    datt: TensorBinding<'_>,
    dqkv: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Vec<Dispatch>, GpuError> {
    backward_with(gpu, label, shape, select_kernels(gpu, &shape, true)?, dout, qkv, att, datt, dqkv, accumulate)
}

/// [`backward`] with the choice of kernels.
#[allow(clippy::too_many_arguments)]
fn backward_with(
    gpu: &Gpu,
    label: &str,
    shape: AttentionShape,
    kernels: Kernels,
    dout: TensorBinding<'_>,
    qkv: TensorBinding<'_>,
    att: TensorBinding<'_>,
    datt: TensorBinding<'_>,
    dqkv: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Vec<Dispatch>, GpuError> {
    let p = params(&shape, accumulate, kernels);
    check_binding(label, "dout", &dout, shape.out_floats());
    check_binding(label, "qkv", &qkv, shape.qkv_floats());
    check_binding(label, "att", &att, shape.att_floats());
    check_binding(label, "datt", &datt, shape.att_floats());
    check_binding(label, "dqkv", &dqkv, shape.qkv_floats());
    let bytes = Some(bytemuck::bytes_of(&p));
    let rows = super::grid_1d(gpu, shape.rows(), ROW_WORKGROUP_SIZE);
    let all = [qkv, att, datt, dout, dqkv];
    let softmax = gpu.dispatch(&BACKWARD_SOFTMAX, format!("{label} softmax"), bytes, &all[..3], rows)?;
    Ok(match kernels {
        Kernels::Tiles => {
            let tiles = super::grid_1d(gpu, shape.triangle_blocks(), TILE_WORKGROUP_SIZE);
            let channels = super::grid_1d(gpu, shape.channel_blocks(), TILE_WORKGROUP_SIZE);
            vec![
                gpu.dispatch(&BACKWARD_DATT, format!("{label} datt"), bytes, &all[..4], tiles)?,
                softmax,
                gpu.dispatch(&BACKWARD_QUERY, format!("{label} query"), bytes, &all, channels)?,
                gpu.dispatch(&BACKWARD_KEY_VALUE, format!("{label} key value"), bytes, &all, channels)?,
            ]
        }
        Kernels::Products => {
            // With dscores already scaled by the backward softmax:
            //   datt = dout v^T, dq = dscores k, dk = dscores^T q, dv = att^T dout.
            let (t, hs) = (shape.seq_len, shape.head_size());
            let (q, k, v) = (shape.qkv_part(0), shape.qkv_part(1), shape.qkv_part(2));
            let (att_layout, grad) = (shape.att_operand(), shape.btc_operand());
            let datt_product = shape.product(Form::Nt, [t, t, hs], [grad, v, att_layout], false);
            let dq = shape.product(Form::Nn, [t, hs, t], [att_layout, k, q], accumulate);
            let dk = shape.product(Form::Tn, [t, hs, t], [att_layout, q, k], accumulate);
            let dv = shape.product(Form::Tn, [t, hs, t], [att_layout, grad, v], accumulate);
            vec![
                matmul::batched_subgroup(gpu, &format!("{label} datt"), &datt_product, datt, dout, qkv)?,
                softmax,
                matmul::batched_subgroup(gpu, &format!("{label} query"), &dq, dqkv, datt, qkv)?,
                matmul::batched_subgroup(gpu, &format!("{label} key"), &dk, dqkv, datt, qkv)?,
                matmul::batched_subgroup(gpu, &format!("{label} value"), &dv, dqkv, att, dout)?,
            ]
        }
    })
}

impl AttentionShape {
    /// Describes part `part` (0 q, 1 k, 2 v) of qkv as a (T, HS) operand per (b, h).
    fn qkv_part(&self, part: usize) -> Operand {
        let c = self.channels;
        Operand { stride: 3 * c, offset: part * c, batch_stride: self.seq_len * 3 * c, head_stride: self.head_size() }
    }

    /// Describes a (B, T, C) tensor (out, dout) as a (T, HS) operand per (b, h).
    fn btc_operand(&self) -> Operand {
        let c = self.channels;
        Operand { stride: c, offset: 0, batch_stride: self.seq_len * c, head_stride: self.head_size() }
    }

    /// Describes att or datt as a (T, T) operand per (b, h), rows att_stride apart.
    fn att_operand(&self) -> Operand {
        let rows = self.seq_len * self.att_stride();
        Operand { stride: self.att_stride(), offset: 0, batch_stride: self.num_heads * rows, head_stride: rows }
    }

    /// Builds the batched product of `form` with `[rows, cols, inner]` over every (b, h), on operands
    /// `[lhs, rhs, out]`.
    /// Results with at most 64 columns use the narrow module's 32-column blocks: the products
    /// over a head's channels in GPT-2 models, and the scores when T is at most 64.
    fn product(&self, form: Form, [rows, cols, inner]: [usize; 3], [lhs, rhs, out]: [Operand; 3], accumulate: bool) -> Batched {
        let narrow = cols <= NARROW_MAX_COLS;
        Batched { form, rows, cols, inner, products: self.batch * self.num_heads, heads: self.num_heads, lhs, rhs, out, accumulate, narrow }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::attention as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// Every output is an f32 sum of up to 80 (head size) or 130 (keys) products of values below
    /// about 1. Its rounding error is therefore a few units of f32 rounding (6e-8) times at most
    /// the term count. Measured on lavapipe with these inputs and the tile kernels, the largest
    /// absolute errors at GPT-2 small were 1.0e-7 (att), 1.6e-7 (out) and 1.4e-6 (dqkv, values up
    /// to 2.3). The tolerances leave about three times that, and the batched products pass them
    /// too.
    const ATOL: f64 = 5e-6;
    const RTOL: f64 = 1e-4;

    /// T = 1, T and HS equal to the tile side (8), sizes that are not multiples of the tile or the
    /// workgroup size (T = 7, 17, 67; HS = 3, 5, 9), and GPT-2 small. For the batched products
    /// (head sizes that are multiples of 4): T with each remainder modulo 4 (padded att rows),
    /// the bundled model's classifier shape (T = 82, HS = 32), T past one product block
    /// (96 rows, 128 columns), a head size above 64, whose products use the wide blocks, 64
    /// channels over padded rows (two narrow column blocks), and a single head.
    fn shapes() -> Vec<AttentionShape> {
        vec![
            AttentionShape { batch: 1, seq_len: 1, channels: 8, num_heads: 2 },
            AttentionShape { batch: 1, seq_len: 8, channels: 16, num_heads: 2 },
            AttentionShape { batch: 1, seq_len: 17, channels: 9, num_heads: 1 },
            AttentionShape { batch: 2, seq_len: 1, channels: 6, num_heads: 2 },
            AttentionShape { batch: 3, seq_len: 7, channels: 15, num_heads: 3 },
            AttentionShape { batch: 2, seq_len: 67, channels: 20, num_heads: 4 },
            AttentionShape { batch: 2, seq_len: 5, channels: 24, num_heads: 2 },
            AttentionShape { batch: 3, seq_len: 103, channels: 24, num_heads: 2 },
            AttentionShape { batch: 1, seq_len: 130, channels: 8, num_heads: 2 },
            AttentionShape { batch: 2, seq_len: 82, channels: 128, num_heads: 4 },
            AttentionShape { batch: 2, seq_len: 37, channels: 160, num_heads: 2 },
            AttentionShape { batch: 2, seq_len: 83, channels: 128, num_heads: 2 },
            AttentionShape { batch: 3, seq_len: 10, channels: 16, num_heads: 1 },
            AttentionShape { batch: 8, seq_len: 120, channels: 768, num_heads: 12 },
        ]
    }

    /// Lists the kernel sets that can run `shape` here: the tile kernels always, the batched
    /// products where 8-lane subgroups exist and the head size allows them (whatever kernels the
    /// autotuner or a variable chose).
    fn kernel_sets(gpu: &Gpu, shape: &AttentionShape) -> Vec<Kernels> {
        let mut sets = vec![Kernels::Tiles];
        if shape.head_size().is_multiple_of(4) && matmul::subgroups_fit(gpu) {
            sets.push(Kernels::Products);
        }
        sets
    }

    /// Splits att as read back, (B, NH, T, T'), into the (B, NH, T, T) values and the padding,
    /// which must be exactly zero.
    fn unpadded(what: &str, shape: &AttentionShape, att: &[f32]) -> Vec<f32> {
        let (t, stride) = (shape.seq_len, shape.att_stride());
        let mut values = Vec::with_capacity(att.len() / stride * t);
        for (r, row) in att.chunks(stride).enumerate() {
            values.extend_from_slice(&row[..t]);
            for (u, &x) in row[t..].iter().enumerate() {
                assert_eq!(x.to_bits(), 0, "{what}: padding att[row {r}][{}] is {x}, expected +0", t + u);
            }
        }
        values
    }

    fn describe(shape: &AttentionShape) -> String {
        format!("B={} T={} C={} NH={}", shape.batch, shape.seq_len, shape.channels, shape.num_heads)
    }

    fn att_len(shape: &AttentionShape) -> usize {
        shape.att_floats()
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<AttentionParams>() % 16, 0);
    }

    /// On an adapter with 8-lane subgroups (lavapipe) `select_kernels` must pick the batched
    /// products in both directions, unless a variable forces other kernels, and a head size that
    /// is not a multiple of 4 must keep the tiles everywhere.
    #[test]
    fn products_are_chosen_where_subgroups_fit() {
        let Some(gpu) = test_gpu() else { return };
        let forced = std::env::var_os(ATTENTION_VARIABLE).is_some() || std::env::var_os("SHADERTUNE_MATMUL").is_some();
        let bundled = AttentionShape { batch: 8, seq_len: 82, channels: 128, num_heads: 4 };
        let odd_heads = AttentionShape { batch: 1, seq_len: 17, channels: 9, num_heads: 1 };
        for backward in [false, true] {
            assert_eq!(select_kernels(gpu, &odd_heads, backward).unwrap(), Kernels::Tiles, "a head size of 9 cannot use vec4 loads");
        }
        if matmul::subgroups_fit(gpu) && !forced {
            assert_eq!(select_kernels(gpu, &bundled, false).unwrap(), Kernels::Products);
            assert_eq!(select_kernels(gpu, &bundled, true).unwrap(), Kernels::Products);
        }
    }

    #[test]
    fn attention_forward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (seed, shape) in shapes().iter().enumerate() {
            let (b, t, c, nh) = (shape.batch, shape.seq_len, shape.channels, shape.num_heads);
            let qkv = random_vec(b * t * 3 * c, seed as u64);
            let (want_att, want_out) = reference::attention_forward(&to_f64(&qkv), b, t, c, nh);
            for kernels in kernel_sets(gpu, shape) {
                let what = format!("{} {kernels:?}", describe(shape));
                let dqkv = gpu.upload("qkv", &qkv).unwrap();
                // NaN marks any element the kernels fail to write.
                let datt = gpu.upload("att", &vec![f32::NAN; att_len(shape)]).unwrap();
                let dout = gpu.upload("out", &vec![f32::NAN; b * t * c]).unwrap();
                let dispatches =
                    forward_with(gpu, "attention", *shape, kernels, (&dqkv).into(), (&datt).into(), (&dout).into()).unwrap();
                gpu.run("attention test", &dispatches).unwrap();

                let got_att = unpadded(&what, shape, &gpu.read::<f32>(&datt, 0, att_len(shape)).unwrap());
                assert_close(&format!("attention_forward att {what}"), &got_att, &want_att, ATOL, RTOL);
                for (i, (&g, &w)) in got_att.iter().zip(&want_att).enumerate() {
                    if w == 0.0 {
                        assert_eq!(g, 0.0, "attention_forward {what}: masked att[{i}] is {g}, expected exactly 0");
                    }
                }
                let got_out: Vec<f32> = gpu.read(&dout, 0, b * t * c).unwrap();
                assert_close(&format!("attention_forward out {what}"), &got_out, &want_out, ATOL, RTOL);
            }
        }
    }

    #[test]
    fn attention_backward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (seed, shape) in shapes().iter().enumerate() {
            let (b, t, c, nh) = (shape.batch, shape.seq_len, shape.channels, shape.num_heads);
            let seed = 100 + seed as u64;
            let qkv = random_vec(b * t * 3 * c, seed);
            let dout = random_vec(b * t * c, seed + 1);
            let initial = random_vec(b * t * 3 * c, seed + 2);
            let (att, _) = reference::attention_forward(&to_f64(&qkv), b, t, c, nh);
            let want = reference::attention_backward(&to_f64(&dout), &to_f64(&qkv), &att, b, t, c, nh);
            let want_accumulated: Vec<f64> = want.iter().zip(&initial).map(|(g, i)| g + f64::from(*i)).collect();

            for kernels in kernel_sets(gpu, shape) {
                let d_qkv = gpu.upload("qkv", &qkv).unwrap();
                let d_dout = gpu.upload("dout", &dout).unwrap();
                let d_att = gpu.storage_buffer("att", (att_len(shape) * 4) as u64).unwrap();
                let d_out = gpu.storage_buffer("out", (b * t * c * 4) as u64).unwrap();
                let d_datt = gpu.upload("datt", &vec![f32::NAN; att_len(shape)]).unwrap();
                let dispatches =
                    forward_with(gpu, "attention", *shape, kernels, (&d_qkv).into(), (&d_att).into(), (&d_out).into()).unwrap();
                gpu.run("attention test forward", &dispatches).unwrap();

                for (accumulate, want) in [(false, &want), (true, &want_accumulated)] {
                    let d_dqkv = gpu.upload("dqkv", &initial).unwrap();
                    let dispatches = backward_with(
                        gpu,
                        "attention backward",
                        *shape,
                        kernels,
                        (&d_dout).into(),
                        (&d_qkv).into(),
                        (&d_att).into(),
                        (&d_datt).into(),
                        (&d_dqkv).into(),
                        accumulate,
                    )
                    .unwrap();
                    gpu.run("attention test backward", &dispatches).unwrap();
                    let got: Vec<f32> = gpu.read(&d_dqkv, 0, b * t * 3 * c).unwrap();
                    let what = format!("attention_backward dqkv {} {kernels:?} accumulate={accumulate}", describe(shape));
                    assert_close(&what, &got, want, ATOL, RTOL);
                }
            }
        }
    }

    #[test]
    fn attention_is_bitwise_repeatable() {
        let Some(gpu) = test_gpu() else { return };
        let shape = AttentionShape { batch: 2, seq_len: 33, channels: 24, num_heads: 3 };
        let (b, t, c) = (shape.batch, shape.seq_len, shape.channels);
        let qkv = gpu.upload("qkv", &random_vec(b * t * 3 * c, 9)).unwrap();
        let dout = gpu.upload("dout", &random_vec(b * t * c, 10)).unwrap();
        for kernels in kernel_sets(gpu, &shape) {
            let run = || -> Vec<u32> {
                let att = gpu.storage_buffer("att", (att_len(&shape) * 4) as u64).unwrap();
                let out = gpu.storage_buffer("out", (b * t * c * 4) as u64).unwrap();
                let datt = gpu.storage_buffer("datt", (att_len(&shape) * 4) as u64).unwrap();
                let dqkv = gpu.storage_buffer("dqkv", (b * t * 3 * c * 4) as u64).unwrap();
                let mut dispatches =
                    forward_with(gpu, "attention", shape, kernels, (&qkv).into(), (&att).into(), (&out).into()).unwrap();
                dispatches.extend(
                    backward_with(
                        gpu,
                        "attention backward",
                        shape,
                        kernels,
                        (&dout).into(),
                        (&qkv).into(),
                        (&att).into(),
                        (&datt).into(),
                        (&dqkv).into(),
                        false,
                    )
                    .unwrap(),
                );
                gpu.run("attention test", &dispatches).unwrap();
                let mut bits: Vec<u32> = gpu.read(&out, 0, b * t * c).unwrap();
                bits.extend(gpu.read::<u32>(&dqkv, 0, b * t * 3 * c).unwrap());
                bits
            };
            let first = run();
            let second = run();
            for (i, (x, y)) in first.iter().zip(&second).enumerate() {
                assert_eq!(x, y, "attention {kernels:?}: out then dqkv element {i} differs between runs: bits {x:#x} vs {y:#x}");
            }
        }
    }
}
