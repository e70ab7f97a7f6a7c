//! Pooling at the last real token (`shaders/pooling.wgsl`), the input of the classification head.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "pooling", source: include_str!("../../shaders/pooling.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;

static FORWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "pooling_forward",
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadOnly, BindingKind::ReadWrite],
};
static BACKWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "pooling_backward",
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadOnly, BindingKind::ReadWrite],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&FORWARD, WORKGROUP_SIZE), (&BACKWARD, WORKGROUP_SIZE)];

/// Uniform parameters, laid out as `PoolingParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct PoolingParams {
    pub batch_size: u32,
    pub seq_len: u32,
    pub channels: u32,
    /// 1: add into `dhidden` at the pooled positions; 0: assign all of `dhidden`.
    pub accumulate: u32,
}

fn params(batch: usize, seq_len: usize, channels: usize, accumulate: bool) -> PoolingParams {
    PoolingParams {
        batch_size: batch as u32,
        seq_len: seq_len as u32,
        channels: channels as u32,
        accumulate: u32::from(accumulate),
    }
}

/// Panics unless `binding` contains at least `elements` 4-byte values. Shapes come from the
/// model, not from user input, and a smaller binding would make the shader read or write the
/// wrong elements without any error.
fn check_binding(label: &str, name: &str, binding: &TensorBinding<'_>, elements: usize) {
    let needed = elements as u64 * 4;
    assert!(binding.size >= needed, "`{label}`: binding `{name}` is {} bytes, but its shape needs {needed}", binding.size);
}

/// Copies the hidden state at the last real token of each sequence:
/// `pooled[b] = hidden[b, lengths[b] - 1]` (assigned).
///
/// A length outside `1..=T` is clamped into that range on the device.
///
/// # Shapes
/// - `hidden`: (B, T, C)
/// - `lengths`: (B) u32, each in `1..=T`
/// - `pooled`: (B, C), assigned
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    batch: usize,
    seq_len: usize,
    channels: usize,
    hidden: TensorBinding<'_>,
    lengths: TensorBinding<'_>,
    pooled: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "hidden", &hidden, batch * seq_len * channels);
    check_binding(label, "lengths", &lengths, batch);
    check_binding(label, "pooled", &pooled, batch * channels);
    let p = params(batch, seq_len, channels, false);
    let groups = super::grid_1d(gpu, (batch * channels) as u64, WORKGROUP_SIZE);
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&p)), &[hidden, lengths, pooled], groups)
}

/// Sends the gradient of the pooled states back to the last real tokens:
/// `dhidden[b, lengths[b] - 1] (+)= dpooled[b]`.
///
/// With `accumulate` false every other position of `dhidden` is set to 0 (the whole tensor is
/// assigned); with `accumulate` true only the pooled positions change.
///
/// # Shapes
/// - `dpooled`: (B, C)
/// - `lengths`: (B) u32, each in `1..=T`
/// - `dhidden`: (B, T, C), assigned or accumulated
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    gpu: &Gpu,
    label: &str,
    batch: usize,
    seq_len: usize,
    channels: usize,
    dpooled: TensorBinding<'_>,
    lengths: TensorBinding<'_>,
    dhidden: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "dpooled", &dpooled, batch * channels);
    check_binding(label, "lengths", &lengths, batch);
    check_binding(label, "dhidden", &dhidden, batch * seq_len * channels);
    let p = params(batch, seq_len, channels, accumulate);
    // Accumulating touches only the (B, C) pooled elements; assigning writes all of (B, T, C).
    let items = if accumulate { batch * channels } else { batch * seq_len * channels };
    let groups = super::grid_1d(gpu, items as u64, WORKGROUP_SIZE);
    gpu.dispatch(&BACKWARD, label, Some(bytemuck::bytes_of(&p)), &[dpooled, lengths, dhidden], groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::pooling as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// Pooling only copies and adds once per element, so the results are exact up to one f32
    /// rounding of the addition.
    const ATOL: f64 = 1e-6;
    const RTOL: f64 = 1e-6;

    /// (B, T, C, lengths): T = 1, odd sizes, and the GPT-2 small classifier batch.
    fn cases() -> Vec<(usize, usize, usize, Vec<u32>)> {
        vec![
            (1, 1, 3, vec![1]),
            (3, 5, 7, vec![5, 1, 3]),
            (8, 120, 768, vec![120, 1, 17, 64, 119, 2, 100, 120]),
        ]
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<PoolingParams>() % 16, 0);
    }

    #[test]
    fn pooling_forward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (batch, seq_len, channels, lengths) in cases() {
            let hidden = random_vec(batch * seq_len * channels, 1);
            let dhidden = gpu.upload("hidden", &hidden).unwrap();
            let dlengths = gpu.upload("lengths", &lengths).unwrap();
            let dpooled = gpu.storage_buffer("pooled", (batch * channels * 4) as u64).unwrap();
            let d = forward(gpu, "pooling", batch, seq_len, channels, (&dhidden).into(), (&dlengths).into(), (&dpooled).into())
                .unwrap();
            gpu.run("pooling test", &[d]).unwrap();
            let got: Vec<f32> = gpu.read(&dpooled, 0, batch * channels).unwrap();
            let want = reference::pooling_forward(&to_f64(&hidden), &lengths, batch, seq_len, channels);
            assert_close(&format!("pooling_forward B={batch} T={seq_len} C={channels}"), &got, &want, ATOL, RTOL);
        }
    }

    #[test]
    fn pooling_backward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (batch, seq_len, channels, lengths) in cases() {
            let n = batch * seq_len * channels;
            let dpooled = random_vec(batch * channels, 2);
            let initial = random_vec(n, 3);
            let want_assign = reference::pooling_backward(&to_f64(&dpooled), &lengths, batch, seq_len, channels);
            let want_accumulate: Vec<f64> =
                want_assign.iter().zip(&initial).map(|(g, i)| g + f64::from(*i)).collect();
            for (accumulate, want) in [(false, &want_assign), (true, &want_accumulate)] {
                let ddpooled = gpu.upload("dpooled", &dpooled).unwrap();
                let dlengths = gpu.upload("lengths", &lengths).unwrap();
                // Start from non-zero values so that assigning must overwrite every position.
                let ddhidden = gpu.upload("dhidden", &initial).unwrap();
                let d = backward(
                    gpu,
                    "pooling backward",
                    batch,
                    seq_len,
                    channels,
                    (&ddpooled).into(),
                    (&dlengths).into(),
                    (&ddhidden).into(),
                    accumulate,
                )
                .unwrap();
                gpu.run("pooling test", &[d]).unwrap();
                let got: Vec<f32> = gpu.read(&ddhidden, 0, n).unwrap();
                let what = format!("pooling_backward B={batch} T={seq_len} C={channels} accumulate={accumulate}");
                assert_close(&what, &got, want, ATOL, RTOL);
            }
        }
    }
}
