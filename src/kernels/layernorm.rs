//! Layer normalization (`shaders/layernorm.wgsl`): forward, input gradient and the gradients of
//! the weight and bias.

use super::matmul::sized_binding;
use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "layernorm", source: include_str!("../../shaders/layernorm.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 64;
/// Channels handled by one invocation of `layernorm_backward_params`.
const CHANNELS_PER_INVOCATION: usize = 4;

use BindingKind::{ReadOnly, ReadWrite, Uniform};

static FORWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "layernorm_forward",
    // out, mean, rstd, inp, weight, bias
    bindings: &[Uniform, ReadWrite, ReadWrite, ReadWrite, ReadOnly, ReadOnly, ReadOnly],
};
static BACKWARD_INPUT: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "layernorm_backward_input",
    // dinp, mean, rstd, inp, weight, dout. Mean and rstd are only read here, but they share the
    // read_write slots that the forward writes.
    bindings: &[Uniform, ReadWrite, ReadWrite, ReadWrite, ReadOnly, ReadOnly, ReadOnly],
};
static BACKWARD_PARAMS: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "layernorm_backward_params",
    // dweight, mean, rstd, inp, (weight slot, unused), dout, dbias
    bindings: &[Uniform, ReadWrite, ReadWrite, ReadWrite, ReadOnly, ReadOnly, ReadOnly, ReadWrite],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[
    (&FORWARD, WORKGROUP_SIZE),
    (&BACKWARD_INPUT, WORKGROUP_SIZE),
    (&BACKWARD_PARAMS, WORKGROUP_SIZE),
];

/// Uniform parameters, with the field names and order of `LayernormParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LayernormParams {
    pub rows: u32,
    pub channels: u32,
    pub eps: f32,
    pub accumulate: u32,
}

fn params(label: &str, rows: usize, channels: usize, eps: f32, accumulate: bool) -> LayernormParams {
    assert!(rows > 0, "layernorm `{label}`: rows must be non-zero");
    assert!(channels > 0, "layernorm `{label}`: channels must be non-zero");
    let elements = rows.checked_mul(channels).and_then(|n| u32::try_from(n).ok());
    assert!(elements.is_some(), "layernorm `{label}`: {rows} x {channels} floats exceed u32 indexing");
    LayernormParams { rows: rows as u32, channels: channels as u32, eps, accumulate: u32::from(accumulate) }
}

/// Creates the dispatch that normalizes each of `rows` rows of `channels` floats:
/// `out = (x - mean) * rstd * weight + bias` with `rstd = 1 / sqrt(var + eps)` and the biased
/// variance, as PyTorch computes it. It assigns `out`, `mean` and `rstd`, and the backward
/// entry points read `mean` and `rstd`.
///
/// # Shapes
/// - `inp`, `out`: (N, C)
/// - `weight`, `bias`: (C)
/// - `mean`, `rstd`: (N)
///
/// # Panics
/// If `rows` or `channels` is zero or a binding is smaller than its shape.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    rows: usize,
    channels: usize,
    eps: f32,
    inp: TensorBinding<'_>,
    weight: TensorBinding<'_>,
    bias: TensorBinding<'_>,
    out: TensorBinding<'_>,
    mean: TensorBinding<'_>,
    rstd: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let p = params(label, rows, channels, eps, false);
    let bindings = [
        sized_binding(label, "out", out, rows * channels, true),
        sized_binding(label, "mean", mean, rows, false),
        sized_binding(label, "rstd", rstd, rows, false),
        sized_binding(label, "inp", inp, rows * channels, true),
        sized_binding(label, "weight", weight, channels, true),
        sized_binding(label, "bias", bias, channels, true),
    ];
    let groups = super::grid_1d(gpu, rows as u64, WORKGROUP_SIZE);
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&p)), &bindings, groups)
}

/// Creates the dispatch of the input gradient of [`forward`]. With `xhat = (x - mean) * rstd`
/// and `g = dout * weight`, it computes `dinp = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))`
/// and assigns it, or adds it to `dinp` when `accumulate` is true.
///
/// # Shapes
/// - `dout`, `inp`, `dinp`: (N, C)
/// - `weight`: (C)
/// - `mean`, `rstd`: (N), as [`forward`] wrote them
///
/// # Panics
/// As [`forward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_input(
    gpu: &Gpu,
    label: &str,
    rows: usize,
    channels: usize,
    dout: TensorBinding<'_>,
    inp: TensorBinding<'_>,
    weight: TensorBinding<'_>,
    mean: TensorBinding<'_>,
    rstd: TensorBinding<'_>,
    dinp: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Dispatch, GpuError> {
    let p = params(label, rows, channels, 0.0, accumulate);
    let bindings = [
        sized_binding(label, "dinp", dinp, rows * channels, true),
        sized_binding(label, "mean", mean, rows, false),
        sized_binding(label, "rstd", rstd, rows, false),
        sized_binding(label, "inp", inp, rows * channels, true),
        sized_binding(label, "weight", weight, channels, true),
        sized_binding(label, "dout", dout, rows * channels, true),
    ];
    let groups = super::grid_1d(gpu, rows as u64, WORKGROUP_SIZE);
    gpu.dispatch(&BACKWARD_INPUT, label, Some(bytemuck::bytes_of(&p)), &bindings, groups)
}

/// Creates the dispatch of the parameter gradients of [`forward`]: `dweight += sum_n dout * xhat`
/// and `dbias += sum_n dout`. Always accumulates, because the optimizer zeroes parameter
/// gradients after applying them. One invocation sums each channel over the rows in order.
///
/// # Shapes
/// - `dout`, `inp`: (N, C)
/// - `mean`, `rstd`: (N), as [`forward`] wrote them
/// - `dweight`, `dbias`: (C)
///
/// # Panics
/// As [`forward`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_params(
    gpu: &Gpu,
    label: &str,
    rows: usize,
    channels: usize,
    dout: TensorBinding<'_>,
    inp: TensorBinding<'_>,
    mean: TensorBinding<'_>,
    rstd: TensorBinding<'_>,
    dweight: TensorBinding<'_>,
    dbias: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let p = params(label, rows, channels, 0.0, true);
    let bindings = [
        sized_binding(label, "dweight", dweight, channels, true),
        sized_binding(label, "mean", mean, rows, false),
        sized_binding(label, "rstd", rstd, rows, false),
        sized_binding(label, "inp", inp, rows * channels, true),
        // The weight slot of the other entry points, which this entry point does not read.
        gpu.placeholder(),
        sized_binding(label, "dout", dout, rows * channels, true),
        sized_binding(label, "dbias", dbias, channels, true),
    ];
    let invocations = channels.div_ceil(CHANNELS_PER_INVOCATION) as u64;
    let groups = super::grid_1d(gpu, invocations, WORKGROUP_SIZE);
    gpu.dispatch(&BACKWARD_PARAMS, label, Some(bytemuck::bytes_of(&p)), &bindings, groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::layernorm as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// GPT-2's `layer_norm_epsilon`.
    const EPS: f32 = 1e-5;
    /// Forward outputs are O(1), because xhat is normalized and weight and bias are in [-1, 1).
    /// The f32 sums over C = 768 and the rsqrt (2 ulp in WGSL) leave errors near 1e-6 relative.
    /// Inputs shifted by `MEAN_SHIFT` lose about ulp(10) / std(x) = 1e-6 / 0.58 more. On
    /// lavapipe the largest error was 5.9e-6 (shifted, N = 960), 0.55 of the tolerance.
    const FORWARD_ATOL: f64 = 1e-5;
    const FORWARD_RTOL: f64 = 1e-5;
    /// dinp subtracts two row means from g, cancelling to O(1) results with about C * ulp of
    /// summation error. dweight and dbias sum up to 960 rows, so magnitudes reach ~20 and the
    /// in-order f32 sums lose about sqrt(N) * eps relative. On lavapipe the largest error was
    /// 5.2e-5 (dweight, N = 960), 0.35 of the tolerance.
    const BACKWARD_ATOL: f64 = 5e-5;
    const BACKWARD_RTOL: f64 = 5e-5;
    /// Added to every input of some cases, so the mean is large against the spread (as in
    /// some GPT-2 residual-stream channels) and a one-pass variance would cancel.
    const MEAN_SHIFT: f32 = 10.0;

    /// (N, C): one row (T = 1), C below and across the vec4 width, odd C on the scalar path, rows
    /// past one workgroup, and GPT-2 small at batch 8 x 120 tokens.
    const SHAPES: [(usize, usize); 8] = [(1, 768), (1, 7), (3, 4), (5, 13), (70, 36), (67, 3), (2, 1), (960, 768)];

    struct Case {
        inp: Vec<f32>,
        weight: Vec<f32>,
        bias: Vec<f32>,
        dout: Vec<f32>,
        expected: reference::LayernormOutput,
    }

    fn case(rows: usize, channels: usize, shift: f32, seed: u64) -> Case {
        let inp: Vec<f32> = random_vec(rows * channels, seed).iter().map(|x| x + shift).collect();
        let weight = random_vec(channels, seed + 1);
        let bias = random_vec(channels, seed + 2);
        let dout = random_vec(rows * channels, seed + 3);
        let expected =
            reference::layernorm_forward(&to_f64(&inp), &to_f64(&weight), &to_f64(&bias), rows, channels, f64::from(EPS));
        Case { inp, weight, bias, dout, expected }
    }

    fn upload(gpu: &Gpu, label: &str, data: &[f32]) -> wgpu::Buffer {
        gpu.upload(label, data).expect("test buffers fit the adapter's limits")
    }

    fn to_f32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&x| x as f32).collect()
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<LayernormParams>() % 16, 0);
    }

    #[test]
    fn layernorm_forward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (i, &(rows, channels)) in SHAPES.iter().enumerate() {
            for shift in [0.0, MEAN_SHIFT] {
                let c = case(rows, channels, shift, 10 * i as u64);
                let description = format!("layernorm_forward N={rows} C={channels} shift={shift}");
                let inp = upload(gpu, "inp", &c.inp);
                let weight = upload(gpu, "weight", &c.weight);
                let bias = upload(gpu, "bias", &c.bias);
                let out = gpu.storage_buffer("out", (rows * channels * 4) as u64).unwrap();
                let mean = gpu.storage_buffer("mean", (rows * 4) as u64).unwrap();
                let rstd = gpu.storage_buffer("rstd", (rows * 4) as u64).unwrap();
                let dispatch = forward(
                    gpu,
                    &description,
                    rows,
                    channels,
                    EPS,
                    (&inp).into(),
                    (&weight).into(),
                    (&bias).into(),
                    (&out).into(),
                    (&mean).into(),
                    (&rstd).into(),
                )
                .unwrap();
                gpu.run("layernorm test", &[dispatch]).unwrap();
                let got_out: Vec<f32> = gpu.read(&out, 0, rows * channels).unwrap();
                let got_mean: Vec<f32> = gpu.read(&mean, 0, rows).unwrap();
                let got_rstd: Vec<f32> = gpu.read(&rstd, 0, rows).unwrap();
                assert_close(&format!("{description} out"), &got_out, &c.expected.out, FORWARD_ATOL, FORWARD_RTOL);
                assert_close(&format!("{description} mean"), &got_mean, &c.expected.mean, FORWARD_ATOL, FORWARD_RTOL);
                assert_close(&format!("{description} rstd"), &got_rstd, &c.expected.rstd, FORWARD_ATOL, FORWARD_RTOL);
            }
        }
    }

    #[test]
    fn layernorm_backward_input_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (i, &(rows, channels)) in SHAPES.iter().enumerate() {
            for accumulate in [false, true] {
                let c = case(rows, channels, 0.0, 100 + 10 * i as u64);
                let description = format!("layernorm_backward_input N={rows} C={channels} accumulate={accumulate}");
                let initial = random_vec(rows * channels, 200 + i as u64);
                let dout = upload(gpu, "dout", &c.dout);
                let inp = upload(gpu, "inp", &c.inp);
                let weight = upload(gpu, "weight", &c.weight);
                let mean = upload(gpu, "mean", &to_f32(&c.expected.mean));
                let rstd = upload(gpu, "rstd", &to_f32(&c.expected.rstd));
                let dinp = upload(gpu, "dinp", &initial);
                let dispatch = backward_input(
                    gpu,
                    &description,
                    rows,
                    channels,
                    (&dout).into(),
                    (&inp).into(),
                    (&weight).into(),
                    (&mean).into(),
                    (&rstd).into(),
                    (&dinp).into(),
                    accumulate,
                )
                .unwrap();
                gpu.run("layernorm test", &[dispatch]).unwrap();
                let got: Vec<f32> = gpu.read(&dinp, 0, rows * channels).unwrap();
                let (mut want, _, _) = reference::layernorm_backward(
                    &to_f64(&c.dout),
                    &to_f64(&c.inp),
                    &to_f64(&c.weight),
                    &c.expected.mean,
                    &c.expected.rstd,
                    rows,
                    channels,
                );
                if accumulate {
                    for (w, x) in want.iter_mut().zip(&initial) {
                        *w += f64::from(*x);
                    }
                }
                assert_close(&description, &got, &want, BACKWARD_ATOL, BACKWARD_RTOL);
            }
        }
    }

    #[test]
    fn layernorm_backward_params_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (i, &(rows, channels)) in SHAPES.iter().enumerate() {
            let c = case(rows, channels, 0.0, 300 + 10 * i as u64);
            let description = format!("layernorm_backward_params N={rows} C={channels}");
            let initial_dweight = random_vec(channels, 400 + i as u64);
            let initial_dbias = random_vec(channels, 500 + i as u64);
            let dout = upload(gpu, "dout", &c.dout);
            let inp = upload(gpu, "inp", &c.inp);
            let mean = upload(gpu, "mean", &to_f32(&c.expected.mean));
            let rstd = upload(gpu, "rstd", &to_f32(&c.expected.rstd));
            let dweight = upload(gpu, "dweight", &initial_dweight);
            let dbias = upload(gpu, "dbias", &initial_dbias);
            let dispatch = backward_params(
                gpu,
                &description,
                rows,
                channels,
                (&dout).into(),
                (&inp).into(),
                (&mean).into(),
                (&rstd).into(),
                (&dweight).into(),
                (&dbias).into(),
            )
            .unwrap();
            gpu.run("layernorm test", &[dispatch]).unwrap();
            let got_dweight: Vec<f32> = gpu.read(&dweight, 0, channels).unwrap();
            let got_dbias: Vec<f32> = gpu.read(&dbias, 0, channels).unwrap();
            let (_, mut want_dweight, mut want_dbias) = reference::layernorm_backward(
                &to_f64(&c.dout),
                &to_f64(&c.inp),
                &to_f64(&c.weight),
                &c.expected.mean,
                &c.expected.rstd,
                rows,
                channels,
            );
            for (w, x) in want_dweight.iter_mut().zip(&initial_dweight) {
                *w += f64::from(*x);
            }
            for (w, x) in want_dbias.iter_mut().zip(&initial_dbias) {
                *w += f64::from(*x);
            }
            assert_close(&format!("{description} dweight"), &got_dweight, &want_dweight, BACKWARD_ATOL, BACKWARD_RTOL);
            assert_close(&format!("{description} dbias"), &got_dbias, &want_dbias, BACKWARD_ATOL, BACKWARD_RTOL);
        }
    }
}
