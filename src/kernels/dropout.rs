//! Inverted dropout (`shaders/dropout.wgsl`) with a mask recomputed from a hash, forward and
//! backward.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "dropout", source: include_str!("../../shaders/dropout.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;

static FORWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "dropout_forward",
    // seed, inp, out
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadOnly, BindingKind::ReadWrite],
};
static BACKWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "dropout_backward",
    // seed, dout, dinp
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadOnly, BindingKind::ReadWrite],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&FORWARD, WORKGROUP_SIZE), (&BACKWARD, WORKGROUP_SIZE)];

/// Uniform parameters, with the field names and order of `DropoutParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, Debug, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct DropoutParams {
    pub len: u32,
    pub threshold: u32,
    pub scale: f32,
    pub salt: u32,
    pub accumulate: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// Hash values below this are dropped: round(p * 2^32), so that P(drop) = p up to 2^-32.
pub(crate) fn threshold(prob: f32) -> u32 {
    assert!((0.0..1.0).contains(&prob), "dropout probability {prob} is outside [0, 1)");
    (f64::from(prob) * 4_294_967_296.0).round().min(f64::from(u32::MAX)) as u32
}

fn params(label: &str, len: usize, prob: f32, salt: u32, accumulate: bool) -> DropoutParams {
    let len = u32::try_from(len).unwrap_or_else(|_| panic!("dropout `{label}`: {len} floats exceed u32 indexing"));
    DropoutParams {
        len,
        threshold: threshold(prob),
        scale: 1.0 / (1.0 - prob),
        salt,
        accumulate: u32::from(accumulate),
        _pad0: 0,
        _pad1: 0,
        _pad2: 0,
    }
}

/// Computes the shader's integer permutation, for references and tests.
#[cfg(test)]
pub(crate) fn permute(x: u32) -> u32 {
    let state = x.wrapping_mul(747_796_405).wrapping_add(2_891_336_453);
    let word = ((state >> ((state >> 28) + 4)) ^ state).wrapping_mul(277_803_737);
    (word >> 22) ^ word
}

/// Returns whether element `i` is kept at `seed` and `salt`, exactly as the shader decides.
#[cfg(test)]
pub(crate) fn kept(seed: u32, salt: u32, prob: f32, i: u32) -> bool {
    let stream = permute(seed ^ permute(salt));
    permute(i ^ stream) >= threshold(prob)
}

/// Creates the dispatch of `out = mask * inp / (1 - p)` when `seed[1]` is 1 and `out = inp`
/// otherwise, which assigns `out`.
///
/// # Shapes
/// - `seed`: (2) u32; `inp`, `out`: (N), N = `len`
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    len: usize,
    prob: f32,
    salt: u32,
    seed: TensorBinding<'_>,
    inp: TensorBinding<'_>,
    out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let p = params(label, len, prob, salt, false);
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&p)), &[seed, inp, out], super::grid_1d(gpu, len as u64, WORKGROUP_SIZE))
}

/// Creates the dispatch of `dinp (+)= mask * dout / (1 - p)` with the mask of [`forward`] at
/// the same seed and salt (`dinp (+)= dout` when `seed[1]` is 0).
///
/// # Shapes
/// - `seed`: (2) u32; `dout`, `dinp`: (N), N = `len`
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    gpu: &Gpu,
    label: &str,
    len: usize,
    prob: f32,
    salt: u32,
    accumulate: bool,
    seed: TensorBinding<'_>,
    dout: TensorBinding<'_>,
    dinp: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    let p = params(label, len, prob, salt, accumulate);
    gpu.dispatch(&BACKWARD, label, Some(bytemuck::bytes_of(&p)), &[seed, dout, dinp], super::grid_1d(gpu, len as u64, WORKGROUP_SIZE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_vec, test_gpu};

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<DropoutParams>() % 16, 0);
    }

    #[test]
    fn mask_matches_host_and_rate_matches_probability() {
        let Some(gpu) = test_gpu() else { return };
        let (len, prob, salt, step_seed) = (100_003usize, 0.25f32, 9u32, 0xdead_beefu32);
        let inp = random_vec(len, 11);
        let dinp = gpu.upload("inp", &inp).unwrap();
        let seed = gpu.upload("seed", &[step_seed, 1u32]).unwrap();
        let out = gpu.storage_buffer("out", (len * 4) as u64).unwrap();
        let d = forward(gpu, "dropout", len, prob, salt, (&seed).into(), (&dinp).into(), (&out).into()).unwrap();
        gpu.run("dropout test", &[d]).unwrap();
        let got: Vec<f32> = gpu.read(&out, 0, len).unwrap();
        let mut dropped = 0usize;
        for (i, (&g, &x)) in got.iter().zip(&inp).enumerate() {
            let want = if kept(step_seed, salt, prob, i as u32) { x / (1.0 - prob) } else { 0.0 };
            assert!((g - want).abs() <= 1e-6 * want.abs().max(1.0), "dropout out[{i}] = {g}, expected {want}");
            dropped += usize::from(!kept(step_seed, salt, prob, i as u32));
        }
        // Binomial(100003, 0.25): standard deviation about 137, so 6 sigma is about 820.
        let expected = prob as f64 * len as f64;
        assert!((dropped as f64 - expected).abs() < 820.0, "dropped {dropped} of {len}, expected about {expected}");
        // Another salt gives another mask.
        let other = (0..len as u32).filter(|&i| kept(step_seed, salt, prob, i) != kept(step_seed, salt + 1, prob, i)).count();
        assert!(other > len / 10, "salts {salt} and {} share almost the whole mask ({other} differences)", salt + 1);
    }

    #[test]
    fn dropout_backward_mask_and_inactive() {
        let Some(gpu) = test_gpu() else { return };
        let (len, prob, salt) = (4099usize, 0.5f32, 3u32);
        let dout = random_vec(len, 12);
        let init = random_vec(len, 13);
        let ddout = gpu.upload("dout", &dout).unwrap();
        let ddinp = gpu.upload("dinp", &init).unwrap();
        let seed = gpu.upload("seed", &[77u32, 1u32]).unwrap();
        let d = backward(gpu, "dropout grad", len, prob, salt, true, (&seed).into(), (&ddout).into(), (&ddinp).into()).unwrap();
        gpu.run("dropout test", &[d]).unwrap();
        let got: Vec<f32> = gpu.read(&ddinp, 0, len).unwrap();
        for i in 0..len {
            let grad = if kept(77, salt, prob, i as u32) { dout[i] * 2.0 } else { 0.0 };
            let want = init[i] + grad;
            assert!((got[i] - want).abs() <= 1e-6 * want.abs().max(1.0), "dropout dinp[{i}] = {}, expected {want}", got[i]);
        }
        gpu.write(&seed, 0, &[77u32, 0u32]);
        let out = gpu.storage_buffer("out", (len * 4) as u64).unwrap();
        let d = forward(gpu, "dropout off", len, prob, salt, (&seed).into(), (&ddout).into(), (&out).into()).unwrap();
        gpu.run("dropout test", &[d]).unwrap();
        let got: Vec<f32> = gpu.read(&out, 0, len).unwrap();
        assert_eq!(got, dout, "inactive dropout must copy its input exactly");
    }
}
