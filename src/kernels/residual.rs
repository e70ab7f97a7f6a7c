//! Residual add (`shaders/residual.wgsl`) and the copy-or-accumulate used by its backward.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "residual", source: include_str!("../../shaders/residual.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;
/// Floats handled by one invocation.
const ELEMENTS_PER_INVOCATION: u64 = 4;

static FORWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "residual_forward",
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadOnly, BindingKind::ReadWrite],
};
static BACKWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "residual_backward",
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadWrite],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&FORWARD, WORKGROUP_SIZE), (&BACKWARD, WORKGROUP_SIZE)];

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ResidualParams {
    pub len: u32,
    pub accumulate: u32,
    pub scale: f32,
    pub _pad0: u32,
}

fn params(len: usize, accumulate: bool, scale: f32) -> ResidualParams {
    ResidualParams { len: len as u32, accumulate: u32::from(accumulate), scale, _pad0: 0 }
}

/// `out = a + scale * b`, all of `len` floats.
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    len: usize,
    scale: f32,
    a: TensorBinding<'_>,
    b: TensorBinding<'_>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let p = params(len, false, scale);
    let groups = super::grid_1d(gpu, (len as u64).div_ceil(ELEMENTS_PER_INVOCATION), WORKGROUP_SIZE);
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&p)), &[a, b, out], groups)
}

/// `dst = scale * src` or `dst += scale * src` over `len` floats.
pub(crate) fn copy_or_accumulate(
    gpu: &Gpu,
    label: &str,
    len: usize,
    accumulate: bool,
    scale: f32,
    src: TensorBinding<'_>,
    dst: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let p = params(len, accumulate, scale);
    let groups = super::grid_1d(gpu, (len as u64).div_ceil(ELEMENTS_PER_INVOCATION), WORKGROUP_SIZE);
    gpu.dispatch(&BACKWARD, label, Some(bytemuck::bytes_of(&p)), &[src, dst], groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::residual as reference;
    use crate::testing::{assert_close, random_vec, test_gpu};

    /// Exact in f32: one addition per element, rounded once on both sides.
    const ATOL: f64 = 1e-6;
    const RTOL: f64 = 1e-6;

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<ResidualParams>() % 16, 0);
    }

    #[test]
    fn residual_forward_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        for len in [1usize, 7, 1027, 8 * 120 * 768] {
            let a = random_vec(len, 1);
            let b = random_vec(len, 2);
            let da = gpu.upload("a", &a).unwrap();
            let db = gpu.upload("b", &b).unwrap();
            let dout = gpu.storage_buffer("out", (len * 4) as u64).unwrap();
            let d = forward(gpu, "residual", len, 1.0, (&da).into(), (&db).into(), (&dout).into()).unwrap();
            gpu.run("residual test", &[d]).unwrap();
            let got: Vec<f32> = gpu.read(&dout, 0, len).unwrap();
            let want = reference::residual_forward(&to64(&a), &to64(&b));
            assert_close(&format!("residual_forward len={len}"), &got, &want, ATOL, RTOL);
        }
    }

    #[test]
    fn residual_backward_accumulates() {
        let Some(gpu) = test_gpu() else { return };
        let len = 1029;
        let src = random_vec(len, 3);
        let init = random_vec(len, 4);
        let dsrc = gpu.upload("src", &src).unwrap();
        let ddst = gpu.upload("dst", &init).unwrap();
        let d = copy_or_accumulate(gpu, "acc", len, true, 1.0, (&dsrc).into(), (&ddst).into()).unwrap();
        gpu.run("residual test", &[d]).unwrap();
        let got: Vec<f32> = gpu.read(&ddst, 0, len).unwrap();
        let want: Vec<f64> = src.iter().zip(&init).map(|(s, i)| f64::from(*s) + f64::from(*i)).collect();
        assert_close("residual_backward accumulate", &got, &want, ATOL, RTOL);

        let d = copy_or_accumulate(gpu, "copy", len, false, 1.0, (&dsrc).into(), (&ddst).into()).unwrap();
        gpu.run("residual test", &[d]).unwrap();
        let got: Vec<f32> = gpu.read(&ddst, 0, len).unwrap();
        assert_close("residual_backward assign", &got, &to64(&src), ATOL, RTOL);
    }

    #[test]
    fn scaled_add_and_gradient_match_reference() {
        let Some(gpu) = test_gpu() else { return };
        let (len, scale) = (1031usize, 2.5f32);
        let a = random_vec(len, 5);
        let b = random_vec(len, 6);
        let da = gpu.upload("a", &a).unwrap();
        let db = gpu.upload("b", &b).unwrap();
        let dout = gpu.storage_buffer("out", (len * 4) as u64).unwrap();
        let d = forward(gpu, "scaled residual", len, scale, (&da).into(), (&db).into(), (&dout).into()).unwrap();
        gpu.run("residual test", &[d]).unwrap();
        let got: Vec<f32> = gpu.read(&dout, 0, len).unwrap();
        let want = reference::scaled_add(&to64(&a), &to64(&b), f64::from(scale));
        assert_close("residual_forward scale 2.5", &got, &want, ATOL, RTOL);

        // dst = 2 * init, then dst += 2.5 * a
        let dst = gpu.upload("dst", &b).unwrap();
        let first = copy_or_accumulate(gpu, "scaled copy", len, false, 2.0, (&db).into(), (&dst).into()).unwrap();
        let second = copy_or_accumulate(gpu, "scaled acc", len, true, scale, (&da).into(), (&dst).into()).unwrap();
        gpu.run("residual test", &[first, second]).unwrap();
        let got: Vec<f32> = gpu.read(&dst, 0, len).unwrap();
        let doubled: Vec<f64> = to64(&b).iter().map(|x| 2.0 * x).collect();
        let want = reference::scaled_add(&doubled, &to64(&a), f64::from(scale));
        assert_close("residual_backward scale 2 then 2.5", &got, &want, ATOL, RTOL);
    }

    fn to64(v: &[f32]) -> Vec<f64> {
        v.iter().map(|&x| f64::from(x)).collect()
    }
}
