//! Causal multi-head self-attention (`shaders/attention.wgsl`) in the GPT-2 layout.
//!
//! The forward saves the softmax probabilities `att` for the backward. `att` is (B, NH, T, T):
//! 5.5 MB for GPT-2 small fine-tuning (B = 8, T = 120), but 400 MB at B = 8, T = 1024, above many
//! adapters' storage binding limit. A caller with long sequences can split the batch and bind
//! each slice of qkv, att, out and their gradients at an offset.

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

    fn att_floats(&self) -> usize {
        self.batch * self.num_heads * self.seq_len * self.seq_len
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
    pub _pad0: u32,
}

fn params(shape: &AttentionShape, accumulate: bool) -> AttentionParams {
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
    AttentionParams {
        batch_size: shape.batch as u32,
        seq_len: shape.seq_len as u32,
        channels: shape.channels as u32,
        num_heads: shape.num_heads as u32,
        head_size: head_size as u32,
        accumulate: u32::from(accumulate),
        scale: 1.0 / (head_size as f32).sqrt(),
        _pad0: 0,
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
/// masked out, then `out = att v`, heads concatenated. Returns three dispatches to record in
/// order.
///
/// # Shapes
/// - `qkv`: (B, T, 3C), q | k | v along the last axis; head h uses channels h*HS..(h+1)*HS of each
/// - `att`: (B, NH, T, T), assigned: the probabilities, exactly 0 where the key follows the query,
///   saved for [`backward`]
/// - `out`: (B, T, C), assigned
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    shape: AttentionShape,
    qkv: TensorBinding<'_>,
    att: TensorBinding<'_>,
    out: TensorBinding<'_>,
) -> Result<Vec<Dispatch>, GpuError> {
    let p = params(&shape, false);
    check_binding(label, "qkv", &qkv, shape.qkv_floats());
    check_binding(label, "att", &att, shape.att_floats());
    check_binding(label, "out", &out, shape.out_floats());
    let bytes = Some(bytemuck::bytes_of(&p));
    let tiles = super::grid_1d(gpu, shape.triangle_blocks(), TILE_WORKGROUP_SIZE);
    let rows = super::grid_1d(gpu, shape.rows(), ROW_WORKGROUP_SIZE);
    let channels = super::grid_1d(gpu, shape.channel_blocks(), TILE_WORKGROUP_SIZE);
    Ok(vec![
        gpu.dispatch(&FORWARD_SCORES, format!("{label} scores"), bytes, &[qkv, att], tiles)?,
        gpu.dispatch(&FORWARD_SOFTMAX, format!("{label} softmax"), bytes, &[qkv, att], rows)?,
        gpu.dispatch(&FORWARD_VALUES, format!("{label} values"), bytes, &[qkv, att, out], channels)?,
    ])
}

/// Backpropagates through [`forward`] into `dqkv` (assigned, or accumulated when `accumulate`).
/// `datt` is scratch: it ends up holding the gradient of the pre-softmax scores. Returns four
/// dispatches to record in order.
///
/// # Shapes
/// - `dout`: (B, T, C)
/// - `qkv`: (B, T, 3C), the forward input
/// - `att`: (B, NH, T, T), from [`forward`]
/// - `datt`: (B, NH, T, T), scratch, assigned
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
    let p = params(&shape, accumulate);
    check_binding(label, "dout", &dout, shape.out_floats());
    check_binding(label, "qkv", &qkv, shape.qkv_floats());
    check_binding(label, "att", &att, shape.att_floats());
    check_binding(label, "datt", &datt, shape.att_floats());
    check_binding(label, "dqkv", &dqkv, shape.qkv_floats());
    let bytes = Some(bytemuck::bytes_of(&p));
    let tiles = super::grid_1d(gpu, shape.triangle_blocks(), TILE_WORKGROUP_SIZE);
    let rows = super::grid_1d(gpu, shape.rows(), ROW_WORKGROUP_SIZE);
    let channels = super::grid_1d(gpu, shape.channel_blocks(), TILE_WORKGROUP_SIZE);
    let all = [qkv, att, datt, dout, dqkv];
    Ok(vec![
        gpu.dispatch(&BACKWARD_DATT, format!("{label} datt"), bytes, &all[..4], tiles)?,
        gpu.dispatch(&BACKWARD_SOFTMAX, format!("{label} softmax"), bytes, &all[..3], rows)?,
        gpu.dispatch(&BACKWARD_QUERY, format!("{label} query"), bytes, &all, channels)?,
        gpu.dispatch(&BACKWARD_KEY_VALUE, format!("{label} key value"), bytes, &all, channels)?,
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::attention as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// Every output is an f32 sum of up to 64 (head size) or 120 (keys) products of values below
    /// about 1. Its rounding error is therefore a few units of f32 rounding (6e-8) times at most
    /// the term count. Measured on lavapipe with these inputs, the largest absolute errors at
    /// GPT-2 small were 1.0e-7 (att), 1.6e-7 (out) and 1.4e-6 (dqkv, values up to 2.3). The
    /// tolerances leave about three times that.
    const ATOL: f64 = 5e-6;
    const RTOL: f64 = 1e-4;

    /// T = 1, T and HS equal to the tile side (8), sizes that are not multiples of the tile or the
    /// workgroup size (T = 7, 17, 67; HS = 3, 5, 9), and GPT-2 small.
    fn shapes() -> Vec<AttentionShape> {
        vec![
            AttentionShape { batch: 1, seq_len: 1, channels: 8, num_heads: 2 },
            AttentionShape { batch: 1, seq_len: 8, channels: 16, num_heads: 2 },
            AttentionShape { batch: 1, seq_len: 17, channels: 9, num_heads: 1 },
            AttentionShape { batch: 2, seq_len: 1, channels: 6, num_heads: 2 },
            AttentionShape { batch: 3, seq_len: 7, channels: 15, num_heads: 3 },
            AttentionShape { batch: 2, seq_len: 67, channels: 20, num_heads: 4 },
            AttentionShape { batch: 8, seq_len: 120, channels: 768, num_heads: 12 },
        ]
    }

    fn describe(shape: &AttentionShape) -> String {
        format!("B={} T={} C={} NH={}", shape.batch, shape.seq_len, shape.channels, shape.num_heads)
    }

    fn att_len(shape: &AttentionShape) -> usize {
        shape.batch * shape.num_heads * shape.seq_len * shape.seq_len
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<AttentionParams>() % 16, 0);
    }

    #[test]
    fn attention_forward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (seed, shape) in shapes().iter().enumerate() {
            let (b, t, c, nh) = (shape.batch, shape.seq_len, shape.channels, shape.num_heads);
            let qkv = random_vec(b * t * 3 * c, seed as u64);
            let dqkv = gpu.upload("qkv", &qkv).unwrap();
            // NaN marks any element the kernels fail to write.
            let datt = gpu.upload("att", &vec![f32::NAN; att_len(shape)]).unwrap();
            let dout = gpu.upload("out", &vec![f32::NAN; b * t * c]).unwrap();
            let dispatches = forward(gpu, "attention", *shape, (&dqkv).into(), (&datt).into(), (&dout).into()).unwrap();
            gpu.run("attention test", &dispatches).unwrap();

            let (want_att, want_out) = reference::attention_forward(&to_f64(&qkv), b, t, c, nh);
            let got_att: Vec<f32> = gpu.read(&datt, 0, att_len(shape)).unwrap();
            assert_close(&format!("attention_forward att {}", describe(shape)), &got_att, &want_att, ATOL, RTOL);
            for (i, (&g, &w)) in got_att.iter().zip(&want_att).enumerate() {
                if w == 0.0 {
                    assert_eq!(g, 0.0, "attention_forward {}: masked att[{i}] is {g}, expected exactly 0", describe(shape));
                }
            }
            let got_out: Vec<f32> = gpu.read(&dout, 0, b * t * c).unwrap();
            assert_close(&format!("attention_forward out {}", describe(shape)), &got_out, &want_out, ATOL, RTOL);
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

            let d_qkv = gpu.upload("qkv", &qkv).unwrap();
            let d_dout = gpu.upload("dout", &dout).unwrap();
            let d_att = gpu.storage_buffer("att", (att_len(shape) * 4) as u64).unwrap();
            let d_out = gpu.storage_buffer("out", (b * t * c * 4) as u64).unwrap();
            let d_datt = gpu.upload("datt", &vec![f32::NAN; att_len(shape)]).unwrap();
            let dispatches =
                forward(gpu, "attention", *shape, (&d_qkv).into(), (&d_att).into(), (&d_out).into()).unwrap();
            gpu.run("attention test forward", &dispatches).unwrap();

            for (accumulate, want) in [(false, &want), (true, &want_accumulated)] {
                let d_dqkv = gpu.upload("dqkv", &initial).unwrap();
                let dispatches = backward(
                    gpu,
                    "attention backward",
                    *shape,
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
                let what = format!("attention_backward dqkv {} accumulate={accumulate}", describe(shape));
                assert_close(&what, &got, want, ATOL, RTOL);
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
        let run = || -> Vec<u32> {
            let att = gpu.storage_buffer("att", (att_len(&shape) * 4) as u64).unwrap();
            let out = gpu.storage_buffer("out", (b * t * c * 4) as u64).unwrap();
            let datt = gpu.storage_buffer("datt", (att_len(&shape) * 4) as u64).unwrap();
            let dqkv = gpu.storage_buffer("dqkv", (b * t * 3 * c * 4) as u64).unwrap();
            let mut dispatches = forward(gpu, "attention", shape, (&qkv).into(), (&att).into(), (&out).into()).unwrap();
            dispatches.extend(
                backward(gpu, "attention backward", shape, (&dout).into(), (&qkv).into(), (&att).into(), (&datt).into(), (&dqkv).into(), false)
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
            assert_eq!(x, y, "attention out then dqkv element {i} differs between runs: bits {x:#x} vs {y:#x}");
        }
    }
}
