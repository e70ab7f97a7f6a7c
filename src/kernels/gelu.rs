//! GELU with GPT-2's tanh approximation (`shaders/gelu.wgsl`), forward and backward.

use super::matmul::sized_binding;
use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "gelu", source: include_str!("../../shaders/gelu.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;
/// Floats handled by one invocation (one vec4).
const ELEMENTS_PER_INVOCATION: u64 = 4;

static FORWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "gelu_forward",
    // out, inp
    bindings: &[BindingKind::Uniform, BindingKind::ReadWrite, BindingKind::ReadOnly],
};
static BACKWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "gelu_backward",
    // dinp, inp, dout
    bindings: &[BindingKind::Uniform, BindingKind::ReadWrite, BindingKind::ReadOnly, BindingKind::ReadOnly],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&FORWARD, WORKGROUP_SIZE), (&BACKWARD, WORKGROUP_SIZE)];

/// Uniform parameters, with the field names and order of `GeluParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GeluParams {
    pub len: u32,
    pub accumulate: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

fn params(label: &str, len: usize, accumulate: bool) -> GeluParams {
    let len = u32::try_from(len).unwrap_or_else(|_| panic!("gelu `{label}`: {len} floats exceed u32 indexing"));
    GeluParams { len, accumulate: u32::from(accumulate), _pad0: 0, _pad1: 0 }
}

fn workgroups(gpu: &Gpu, len: usize) -> [u32; 3] {
    super::grid_1d(gpu, (len as u64).div_ceil(ELEMENTS_PER_INVOCATION), WORKGROUP_SIZE)
}

/// Creates the dispatch of `out = 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))`
/// elementwise, which assigns `out`.
///
/// # Shapes
/// - `inp`, `out`: (N), N = `len`
///
/// # Panics
/// If a binding is smaller than `len` floats.
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    len: usize,
    inp: TensorBinding<'_>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let p = params(label, len, false);
    let bindings = [sized_binding(label, "out", out, len, true), sized_binding(label, "inp", inp, len, true)];
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&p)), &bindings, workgroups(gpu, len))
}

/// Creates the dispatch of `dinp = dout * gelu'(inp)` elementwise. It assigns `dinp`, or adds
/// to it when `accumulate` is true.
///
/// # Shapes
/// - `inp`, `dout`, `dinp`: (N), N = `len`
///
/// # Panics
/// If a binding is smaller than `len` floats.
pub(crate) fn backward(
    gpu: &Gpu,
    label: &str,
    len: usize,
    inp: TensorBinding<'_>,
    dout: TensorBinding<'_>,
    dinp: TensorBinding<'_>,
    accumulate: bool,
) -> Result<Dispatch, GpuError> {
    let p = params(label, len, accumulate);
    let bindings = [
        sized_binding(label, "dinp", dinp, len, true),
        sized_binding(label, "inp", inp, len, true),
        sized_binding(label, "dout", dout, len, true),
    ];
    gpu.dispatch(&BACKWARD, label, Some(bytemuck::bytes_of(&p)), &bindings, workgroups(gpu, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::gelu as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// One exp, two divisions and a few multiplies per element. WGSL bounds exp's error by
    /// 3 + 2|x| ulp, so results stay within a few ulp. On lavapipe the largest error was 5e-7
    /// absolute (values up to 6), 0.15 of the tolerance.
    const ATOL: f64 = 1e-6;
    const RTOL: f64 = 1e-5;
    /// Inputs are uniform in [-SPREAD, SPREAD), which covers both tails where tanh saturates.
    const SPREAD: f32 = 6.0;
    /// Values at and beyond saturation, and near zero, placed at the start of every input.
    const SPECIAL: [f32; 8] = [0.0, 1e-3, -1e-3, 20.0, -20.0, 100.0, -100.0, 3.0e4];
    /// N: one element, lengths around the vec4 width, one past a workgroup's 1024 floats, and
    /// GPT-2 small's MLP activation at batch 8 x 120 tokens (960 x 3072).
    const LENGTHS: [usize; 8] = [1, 3, 4, 5, 8, 13, 1025, 960 * 3072];

    fn input(len: usize, seed: u64) -> Vec<f32> {
        let mut x: Vec<f32> = random_vec(len, seed).iter().map(|v| v * SPREAD).collect();
        let special = SPECIAL.len().min(len);
        x[..special].copy_from_slice(&SPECIAL[..special]);
        x
    }

    fn upload(gpu: &Gpu, label: &str, data: &[f32]) -> wgpu::Buffer {
        gpu.upload(label, data).expect("test buffers fit the adapter's limits")
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<GeluParams>() % 16, 0);
    }

    #[test]
    fn gelu_forward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (i, &len) in LENGTHS.iter().enumerate() {
            let x = input(len, i as u64);
            let inp = upload(gpu, "inp", &x);
            // Filled with values that a kernel writing too little would leave behind.
            let out = upload(gpu, "out", &random_vec(len, 100 + i as u64));
            let dispatch = forward(gpu, "gelu forward", len, (&inp).into(), (&out).into()).unwrap();
            gpu.run("gelu test", &[dispatch]).unwrap();
            let got: Vec<f32> = gpu.read(&out, 0, len).unwrap();
            let want = reference::gelu_forward(&to_f64(&x));
            assert_close(&format!("gelu_forward N={len}"), &got, &want, ATOL, RTOL);
        }
    }

    #[test]
    fn gelu_backward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for (i, &len) in LENGTHS.iter().enumerate() {
            for accumulate in [false, true] {
                let x = input(len, 200 + i as u64);
                let d = random_vec(len, 300 + i as u64);
                let initial = random_vec(len, 400 + i as u64);
                let inp = upload(gpu, "inp", &x);
                let dout = upload(gpu, "dout", &d);
                let dinp = upload(gpu, "dinp", &initial);
                let dispatch =
                    backward(gpu, "gelu backward", len, (&inp).into(), (&dout).into(), (&dinp).into(), accumulate).unwrap();
                gpu.run("gelu test", &[dispatch]).unwrap();
                let got: Vec<f32> = gpu.read(&dinp, 0, len).unwrap();
                let mut want = reference::gelu_backward(&to_f64(&x), &to_f64(&d));
                if accumulate {
                    for (w, v) in want.iter_mut().zip(&initial) {
                        *w += f64::from(*v);
                    }
                }
                assert_close(&format!("gelu_backward N={len} accumulate={accumulate}"), &got, &want, ATOL, RTOL);
            }
        }
    }

    #[test]
    fn gelu_leaves_floats_past_len_untouched() {
        let Some(gpu) = test_gpu() else { return };
        // Five floats inside a buffer of eight: the kernel must write the first five only.
        let fill = 7.5f32;
        let inp = upload(gpu, "inp", &[0.5f32; 8]);
        let out = upload(gpu, "out", &[fill; 8]);
        let dispatch = forward(gpu, "gelu forward", 5, (&inp).into(), (&out).into()).unwrap();
        gpu.run("gelu test", &[dispatch]).unwrap();
        let got: Vec<f32> = gpu.read(&out, 0, 8).unwrap();
        for (i, &v) in got.iter().enumerate().skip(5) {
            assert_eq!(v, fill, "gelu_forward N=5 wrote out[{i}] = {v}, past the end");
        }
    }
}
