//! AdamW with decoupled weight decay and clipping by global norm (`shaders/adamw.wgsl`), one
//! dispatch per trainable parameter tensor.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "adamw", source: include_str!("../../shaders/adamw.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;
/// Floats per invocation: the shader handles one vec4.
const ELEMENTS_PER_INVOCATION: u64 = 4;

/// Bindings of `adamw_update_rows`: params, step, norm, param, grad, m, v, rows.
/// `adamw_update` binds all but the last.
const BINDINGS: [BindingKind; 8] = [
    BindingKind::Uniform,
    BindingKind::ReadOnly,
    BindingKind::ReadOnly,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
    BindingKind::ReadOnly,
];

pub(crate) static STEP_FAMILY: ShaderFamily =
    ShaderFamily { name: "adamw_step", source: include_str!("../../shaders/adamw_step.wgsl") };

static UPDATE: KernelEntry = KernelEntry { family: &FAMILY, entry: "adamw_update", bindings: BINDINGS.split_at(7).0 };
static UPDATE_ROWS: KernelEntry = KernelEntry { family: &FAMILY, entry: "adamw_update_rows", bindings: &BINDINGS };

static COUNT_STEP: KernelEntry =
    KernelEntry { family: &STEP_FAMILY, entry: "adamw_count_step", bindings: &[BindingKind::ReadWrite, BindingKind::ReadOnly] };

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&UPDATE, WORKGROUP_SIZE), (&UPDATE_ROWS, WORKGROUP_SIZE), (&COUNT_STEP, 1)];

/// Per-tensor uniform parameters, laid out as `AdamWParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct AdamWParams {
    /// Floats in the parameter tensor.
    pub len: u32,
    /// Decoupled weight decay coefficient of this tensor.
    pub weight_decay: f32,
    /// Floats per row, for [`update_rows`]; 0 otherwise.
    pub row_len: u32,
    pub _pad0: u32,
}

/// Per-step values shared by every tensor, laid out as `AdamWStep` in the shader. The host writes
/// it into a small storage buffer before each optimizer step.
#[repr(C)]
#[derive(bytemuck::Pod, bytemuck::Zeroable, Clone, Copy, Debug)]
pub(crate) struct AdamWStep {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 - beta1^t` for step t, counted from 1.
    pub bias_correction1: f32,
    /// `1 - beta2^t`.
    pub bias_correction2: f32,
    /// Clipping threshold for the global gradient norm; `<= 0` turns clipping off.
    pub max_norm: f32,
    /// Factor applied to the stored gradient and its norm: 1 / micro-batches summed per step.
    pub grad_scale: f32,
    /// Updates applied so far: t of the last step. [`count_step`] advances it on the device.
    pub steps: u32,
    pub _pad: [u32; 3],
}

/// Byte offset of the two bias corrections in [`AdamWStep`].
pub(crate) const BIAS_CORRECTIONS_OFFSET: u64 = 16;
/// Byte offset of `max_norm` and `grad_scale` in [`AdamWStep`].
pub(crate) const MAX_NORM_OFFSET: u64 = 24;
/// Byte offset of `steps` in [`AdamWStep`].
pub(crate) const STEPS_OFFSET: u64 = 32;

/// `1 - beta^t`, the bias correction of step `t`, as [`count_step`] computes it.
pub(crate) fn bias_correction(beta: f32, t: u32) -> f32 {
    1.0 - beta.powi(i32::try_from(t).unwrap_or(i32::MAX))
}

/// Counts an optimizer step in `step` and writes its bias corrections there, unless the global
/// gradient `norm` is NaN or infinite, in which case the AdamW dispatches skip the step. Record
/// it after the norm and before the updates. The host then writes only the other fields of
/// `step` (learning rate, betas, eps, max_norm, grad_scale), and t counts the updates applied
/// without the host reading the norm.
///
/// # Shapes
/// - `step`: one [`AdamWStep`]
/// - `norm`: (1)
pub(crate) fn count_step(gpu: &Gpu, step: TensorBinding<'_>, norm: TensorBinding<'_>) -> Result<Dispatch, GpuError> {
    check_binding("adamw count step", "step", &step, std::mem::size_of::<AdamWStep>() / 4);
    check_binding("adamw count step", "norm", &norm, 1);
    gpu.dispatch(&COUNT_STEP, "adamw count step", None, &[step, norm], [1, 1, 1])
}

/// Panics unless `binding` contains at least `elements` 4-byte values. Shapes come from the
/// model, not from user input, and a smaller binding would make the shader read or write the
/// wrong elements without any error.
fn check_binding(label: &str, name: &str, binding: &TensorBinding<'_>, elements: usize) {
    let needed = elements as u64 * 4;
    assert!(binding.size >= needed, "`{label}`: binding `{name}` is {} bytes, but its shape needs {needed}", binding.size);
}

/// The tensors that one AdamW dispatch updates.
pub(crate) struct AdamWState<'a> {
    pub param: TensorBinding<'a>,
    pub grad: TensorBinding<'a>,
    pub m: TensorBinding<'a>,
    pub v: TensorBinding<'a>,
}

/// Applies one AdamW step to `state.param` and zeroes `state.grad`.
///
/// When `step.max_norm > 0` the gradient is first scaled by
/// `min(1, max_norm / (norm[0] * grad_scale + 1e-6))` (as `torch.nn.utils.clip_grad_norm_` does on
/// the mean gradient) and by `grad_scale`. Then
/// `param *= 1 - lr * weight_decay`, the moments `m` and `v` are updated and `param` moves by
/// `lr / bias_correction1 * m / (sqrt(v) / sqrt(bias_correction2) + eps)`, as
/// `torch.optim.AdamW` does. `param`, `m` and `v` are updated in place, `grad` is set to 0.
///
/// # Shapes
/// - `step`: one [`AdamWStep`] (48 bytes)
/// - `norm`: (1), the global gradient norm (read only when clipping)
/// - `param`, `grad`, `m`, `v`: (N) with N = `len`
pub(crate) fn update(
    gpu: &Gpu,
    label: &str,
    len: usize,
    weight_decay: f32,
    step: TensorBinding<'_>,
    norm: TensorBinding<'_>,
    state: AdamWState<'_>,
) -> Result<Dispatch, GpuError> {
    dispatch(gpu, label, len, weight_decay, step, norm, state, None)
}

/// Applies the step of [`update`] to the rows of a table (rows of `row_len` floats) listed in
/// `rows`: the count of listed rows, then their indices. The other rows are left alone: their
/// gradient is 0, and the caller applies the update that a zero gradient gives later with
/// [`deferred_update`](super::deferred_update). So the caller lists every row that has a
/// gradient in this step, each brought up to date with the earlier steps first. The dispatch
/// reads its workgroup counts from `counts`, which the caller sets to [`rows_workgroups`]
/// whenever the list changes.
///
/// # Shapes
/// - `param`, `grad`, `m`, `v`: (N) with N = `len`, a multiple of `row_len`
/// - `rows`: (1 + N / row_len)
/// - `row_len`: a multiple of 4
#[allow(clippy::too_many_arguments)]
pub(crate) fn update_rows(
    gpu: &Gpu,
    label: &str,
    len: usize,
    row_len: usize,
    weight_decay: f32,
    step: TensorBinding<'_>,
    norm: TensorBinding<'_>,
    state: AdamWState<'_>,
    rows: TensorBinding<'_>,
    counts: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    assert!(
        row_len > 0 && row_len % 4 == 0 && len % row_len == 0,
        "`{label}`: {len} floats in rows of {row_len}: rows must be a multiple of 4 floats and divide the tensor"
    );
    check_binding(label, "rows", &rows, 1 + len / row_len);
    Ok(dispatch(gpu, label, len, weight_decay, step, norm, state, Some((row_len, rows)))?.with_indirect(counts))
}

/// Returns the workgroup counts of an [`update_rows`] dispatch over `listed` rows of `row_len` floats.
pub(crate) fn rows_workgroups(gpu: &Gpu, listed: usize, row_len: usize) -> [u32; 3] {
    super::indirect_grid_1d(gpu, (listed * row_len) as u64 / ELEMENTS_PER_INVOCATION, WORKGROUP_SIZE)
}

#[allow(clippy::too_many_arguments)]
fn dispatch(
    gpu: &Gpu,
    label: &str,
    len: usize,
    weight_decay: f32,
    step: TensorBinding<'_>,
    norm: TensorBinding<'_>,
    state: AdamWState<'_>,
    rows: Option<(usize, TensorBinding<'_>)>,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "step", &step, std::mem::size_of::<AdamWStep>() / 4);
    check_binding(label, "norm", &norm, 1);
    let param = super::matmul::sized_binding(label, "param", state.param, len, true);
    let grad = super::matmul::sized_binding(label, "grad", state.grad, len, true);
    let m = super::matmul::sized_binding(label, "m", state.m, len, true);
    let v = super::matmul::sized_binding(label, "v", state.v, len, true);
    let groups = super::grid_1d(gpu, (len as u64).div_ceil(ELEMENTS_PER_INVOCATION), WORKGROUP_SIZE);
    let (entry, row_len, bindings) = match rows {
        None => (&UPDATE, 0, vec![step, norm, param, grad, m, v]),
        Some((row_len, rows)) => (&UPDATE_ROWS, row_len as u32, vec![step, norm, param, grad, m, v, rows]),
    };
    let p = AdamWParams { len: len as u32, weight_decay, row_len, _pad0: 0 };
    gpu.dispatch(entry, label, Some(bytemuck::bytes_of(&p)), &bindings, groups)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::adamw::{adamw_update, AdamWHyperparameters};
    use crate::reference::norm::{clip_coefficient, global_norm};
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// Each step moves a parameter by about lr (1e-3 here) at most, with an f32 relative error of a
    /// few units of rounding (6e-8) from the square root and the division. Over five steps that
    /// stays far below 1e-6 absolute on parameters of magnitude 1. The moments carry the same
    /// rounding.
    const ATOL: f64 = 1e-6;
    const RTOL: f64 = 1e-5;

    const HYPER: AdamWHyperparameters =
        AdamWHyperparameters { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
    const STEPS: u32 = 5;

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<AdamWParams>() % 16, 0);
        assert_eq!(std::mem::size_of::<AdamWStep>() % 16, 0);
    }

    fn state<'a>(param: &'a wgpu::Buffer, grad: &'a wgpu::Buffer, m: &'a wgpu::Buffer, v: &'a wgpu::Buffer) -> AdamWState<'a> {
        AdamWState { param: param.into(), grad: grad.into(), m: m.into(), v: v.into() }
    }

    fn step_values(step: u32, max_norm: f32, micro_batches: f32) -> AdamWStep {
        AdamWStep {
            lr: HYPER.lr as f32,
            beta1: HYPER.beta1 as f32,
            beta2: HYPER.beta2 as f32,
            eps: HYPER.eps as f32,
            bias_correction1: (1.0 - HYPER.beta1.powi(step as i32)) as f32,
            bias_correction2: (1.0 - HYPER.beta2.powi(step as i32)) as f32,
            max_norm,
            grad_scale: 1.0 / micro_batches,
            steps: 0,
            _pad: [0; 3],
        }
    }

    /// Runs `STEPS` AdamW steps on the device and on the reference with a fresh gradient each step,
    /// and compares param, m and v after every step. `max_norm <= 0` turns clipping off. The
    /// device receives the gradient summed over `micro_batches` identical micro-batches with
    /// `grad_scale = 1 / micro_batches`, so it must step as the reference does on one.
    fn check_steps(len: usize, max_norm: f32, grad_scale: f32, micro_batches: f32) {
        let Some(gpu) = test_gpu() else { return };
        let initial = random_vec(len, 1);
        let param = gpu.upload("param", &initial).unwrap();
        let grad = gpu.storage_buffer("grad", (len * 4) as u64).unwrap();
        let m = gpu.storage_buffer("m", (len * 4) as u64).unwrap();
        let v = gpu.storage_buffer("v", (len * 4) as u64).unwrap();
        let step_buffer = gpu.storage_buffer("step", std::mem::size_of::<AdamWStep>() as u64).unwrap();
        let norm = gpu.storage_buffer("norm", 4).unwrap();
        let (mut want_param, mut want_m, mut want_v) = (to_f64(&initial), vec![0.0; len], vec![0.0; len]);
        for step in 1..=STEPS {
            let g: Vec<f32> = random_vec(len, 100 + u64::from(step)).iter().map(|x| x * grad_scale).collect();
            let g64 = to_f64(&g);
            let total_norm = global_norm(&[&g64]);
            let summed: Vec<f32> = g.iter().map(|x| x * micro_batches).collect();
            gpu.write(&grad, 0, &summed);
            gpu.write(&norm, 0, &[total_norm as f32 * micro_batches]);
            gpu.write(&step_buffer, 0, &[step_values(step, max_norm, micro_batches)]);
            let d = update(
                gpu,
                "adamw",
                len,
                HYPER.weight_decay as f32,
                (&step_buffer).into(),
                (&norm).into(),
                state(&param, &grad, &m, &v),
            )
            .unwrap();
            gpu.run("adamw test", &[d]).unwrap();

            let clip = clip_coefficient(total_norm, f64::from(max_norm));
            let clipped: Vec<f64> = g64.iter().map(|x| x * clip).collect();
            adamw_update(&mut want_param, &clipped, &mut want_m, &mut want_v, step, &HYPER);
            let what = |name: &str| format!("adamw_update len={len} max_norm={max_norm} step {step} {name}");
            assert_close(&what("param"), &gpu.read::<f32>(&param, 0, len).unwrap(), &want_param, ATOL, RTOL);
            assert_close(&what("m"), &gpu.read::<f32>(&m, 0, len).unwrap(), &want_m, ATOL, RTOL);
            assert_close(&what("v"), &gpu.read::<f32>(&v, 0, len).unwrap(), &want_v, ATOL, RTOL);
            let zeroed: Vec<f32> = gpu.read(&grad, 0, len).unwrap();
            assert!(zeroed.iter().all(|&x| x == 0.0), "{}: grad was not zeroed", what("grad"));
        }
    }

    #[test]
    fn adamw_without_clipping_matches_reference() {
        for len in [1, 7, 1029] {
            check_steps(len, 0.0, 1.0, 1.0);
        }
    }

    #[test]
    fn adamw_scales_accumulated_gradients() {
        check_steps(515, 0.0, 1.0, 4.0);
        check_steps(515, 1.0, 1.0, 4.0);
    }

    #[test]
    fn adamw_skips_a_step_with_a_non_finite_norm() {
        let Some(gpu) = test_gpu() else { return };
        let len = 9;
        let initial = random_vec(len, 4);
        let moment = random_vec(len, 5);
        let param = gpu.upload("param", &initial).unwrap();
        let grad = gpu.upload("grad", &vec![f32::NAN; len]).unwrap();
        let m = gpu.upload("m", &moment).unwrap();
        let v = gpu.upload("v", &moment.iter().map(|x| x * x).collect::<Vec<f32>>()).unwrap();
        let step_buffer = gpu.upload("step", &[step_values(3, f32::MAX, 1.0)]).unwrap();
        for bad_norm in [f32::NAN, f32::INFINITY] {
            let norm = gpu.upload("norm", &[bad_norm]).unwrap();
            let d = update(gpu, "adamw", len, 0.1, (&step_buffer).into(), (&norm).into(), state(&param, &grad, &m, &v))
                .unwrap();
            gpu.run("adamw test", &[d]).unwrap();
            let got: Vec<f32> = gpu.read(&param, 0, len).unwrap();
            assert_eq!(got, initial, "norm {bad_norm}: the parameters changed");
            let got_m: Vec<f32> = gpu.read(&m, 0, len).unwrap();
            assert_eq!(got_m, moment, "norm {bad_norm}: the first moment changed");
            let zeroed: Vec<f32> = gpu.read(&grad, 0, len).unwrap();
            assert!(zeroed.iter().all(|&x| x == 0.0), "norm {bad_norm}: grad was not zeroed: {zeroed:?}");
            gpu.write(&grad, 0, &vec![f32::NAN; len]);
        }
    }

    #[test]
    fn adamw_with_clipping_matches_reference() {
        // A gradient of norm about 30 against max_norm 1: clipping scales it by about 1/30.
        check_steps(2053, 1.0, 1.0, 1.0);
        // A gradient whose norm is below max_norm is left alone.
        check_steps(33, 100.0, 0.01, 1.0);
    }

    /// The row variant runs on a table with four kinds of rows: some have a gradient at every
    /// step, some at steps 1 and 4, some from step 3 on, the others never. Each step lists only
    /// the rows with a gradient. Before it, `deferred_update::settle_rows` applies to those rows
    /// the steps they missed: the moments' decay and step where they had a gradient before, the
    /// weight decay alone elsewhere. Some unlisted rows also settle
    /// after step 2, and every row at the end. The learning rate changes every step and step 3
    /// is skipped. After each step the gradients and the listed rows, and at the end every
    /// value, equal bit for bit what the full update gives.
    #[test]
    fn adamw_rows_match_full_update() {
        use crate::kernels::deferred_update::{self, Owed};
        let Some(gpu) = test_gpu().filter(|gpu| gpu.indirect_dispatch()) else { return };
        let (rows, row_len) = (23, 12);
        let len = rows * row_len;
        let initial = random_vec(len, 7);
        let hit = |row: usize, step: u32| row % 5 == 0 || (row % 5 == 1 && (step == 1 || step == 4)) || (row % 5 == 3 && step >= 3);
        let full: Vec<wgpu::Buffer> = ["param", "grad", "m", "v"].iter().map(|n| gpu.upload(n, &vec![0.0f32; len]).unwrap()).collect();
        let sparse: Vec<wgpu::Buffer> = ["param", "grad", "m", "v"].iter().map(|n| gpu.upload(n, &vec![0.0f32; len]).unwrap()).collect();
        gpu.write(&full[0], 0, &initial);
        gpu.write(&sparse[0], 0, &initial);

        let listed = gpu.storage_buffer("listed rows", ((rows + 1) * 4) as u64).unwrap();
        let counts = gpu.indirect_buffer("adamw workgroups");
        let step_buffer = gpu.storage_buffer("step", std::mem::size_of::<AdamWStep>() as u64).unwrap();
        let norm = gpu.storage_buffer("norm", 4).unwrap();
        let steps = gpu.storage_buffer("step log", 8 * deferred_update::STEP_BYTES).unwrap();
        let owed = gpu.storage_buffer("owed rows", (deferred_update::list_len(rows) * 4) as u64).unwrap();
        let max_norm = 1.0;
        let constants = deferred_update::Constants { weight_decay: 0.1, max_norm, beta1: HYPER.beta1 as f32, beta2: HYPER.beta2 as f32, eps: HYPER.eps as f32 };
        let settle_counts = gpu.indirect_buffer("settle workgroups");
        // Per row, the first logged step it owes and whether it ever had a gradient.
        let mut owed_from = vec![0u32; rows];
        let mut moments = vec![false; rows];
        let settle = |which: &[usize], end: u32, owed_from: &mut [u32], moments: &[bool]| {
            let list: Vec<Owed> = which
                .iter()
                .filter(|&&r| owed_from[r] < end)
                .map(|&r| Owed { row: r as u32, from: owed_from[r], moments: moments[r] })
                .collect();
            for &r in which {
                owed_from[r] = end;
            }
            gpu.write(&owed, 0, &deferred_update::list(end, &list));
            gpu.write(&settle_counts, 0, &deferred_update::rows_workgroups(gpu, list.len(), row_len));
            let state = [(&sparse[0]).into(), (&sparse[2]).into(), (&sparse[3]).into()];
            let d = deferred_update::settle_rows(gpu, "settle", len, row_len, constants, rows, (&steps).into(), (&owed).into(), state, &settle_counts).unwrap();
            gpu.run("deferred update test", &[d]).unwrap();
            list.len()
        };
        let mut settled_with_moments = 0;
        for step in 1..=5u32 {
            let mut g = random_vec(len, 200 + u64::from(step));
            let hit_rows: Vec<usize> = (0..rows).filter(|&r| hit(r, step)).collect();
            for (row, chunk) in g.chunks_mut(row_len).enumerate() {
                if !hit(row, step) {
                    chunk.fill(0.0);
                }
            }
            // Logged steps 0 .. step - 2 are steps 1 .. step - 1.
            settled_with_moments += hit_rows.iter().filter(|&&r| moments[r] && owed_from[r] < step - 1).count();
            settle(&hit_rows, step - 1, &mut owed_from, &moments);
            let total = if step == 3 { f32::NAN } else { global_norm(&[&to_f64(&g)]) as f32 };
            for buffers in [&full, &sparse] {
                gpu.write(&buffers[1], 0, &g);
            }
            let mut list = vec![hit_rows.len() as u32];
            list.extend(hit_rows.iter().map(|&r| r as u32));
            gpu.write(&listed, 0, &list);
            gpu.write(&counts, 0, &rows_workgroups(gpu, hit_rows.len(), row_len));
            gpu.write(&norm, 0, &[total]);
            let values = AdamWStep { lr: 1e-3 * (1.0 + 0.5 * step as f32), ..step_values(step, max_norm, 1.0) };
            gpu.write(&step_buffer, 0, &[values]);
            let logged = [values.lr, total, values.bias_correction1, values.bias_correction2];
            gpu.write(&steps, u64::from(step - 1) * deferred_update::STEP_BYTES, &logged);

            let plain = update(gpu, "adamw", len, 0.1, (&step_buffer).into(), (&norm).into(), state(&full[0], &full[1], &full[2], &full[3])).unwrap();
            let by_rows = update_rows(
                gpu,
                "adamw rows",
                len,
                row_len,
                0.1,
                (&step_buffer).into(),
                (&norm).into(),
                state(&sparse[0], &sparse[1], &sparse[2], &sparse[3]),
                (&listed).into(),
                &counts,
            )
            .unwrap();
            gpu.run("adamw rows test", &[plain, by_rows]).unwrap();
            for &r in &hit_rows {
                owed_from[r] = step;
                moments[r] = true;
            }
            if step == 2 {
                // Some rows that are not listed settle the first two steps now, the rest later.
                let early: Vec<usize> = (0..rows).filter(|&r| !hit(r, 3) && r % 2 == 1).collect();
                settle(&early, 2, &mut owed_from, &moments);
            }

            for (k, name) in ["param", "grad", "m", "v"].iter().enumerate() {
                let want: Vec<u32> = gpu.read(&full[k], 0, len).unwrap();
                let got: Vec<u32> = gpu.read(&sparse[k], 0, len).unwrap();
                for row in 0..rows {
                    let span = row * row_len..(row + 1) * row_len;
                    if k == 1 || hit(row, step) {
                        assert_eq!(got[span.clone()], want[span], "step {step}: {name} of row {row} differs from the full update");
                    }
                }
            }
        }
        assert!(settled_with_moments > 0, "no listed row caught up on moments it had before");
        let before: Vec<u32> = gpu.read(&sparse[0], 0, len).unwrap();
        let all: Vec<usize> = (0..rows).collect();
        let with_moments = (0..rows).filter(|&r| moments[r] && owed_from[r] < 5).count();
        assert!(with_moments > 2, "some rows with moments must owe steps at the end");
        assert!(settle(&all, 5, &mut owed_from, &moments) > with_moments, "rows without moments must owe steps at the end");
        for (k, name) in ["param", "m", "v"].iter().enumerate() {
            let k = if k == 0 { 0 } else { k + 1 };
            let want: Vec<u32> = gpu.read(&full[k], 0, len).unwrap();
            let got: Vec<u32> = gpu.read(&sparse[k], 0, len).unwrap();
            assert_eq!(got, want, "after settling every row, {name} differs from the full update");
        }
        let got: Vec<u32> = gpu.read(&sparse[0], 0, len).unwrap();
        assert_ne!(before, got, "the rows owed updates that were never applied");
        let moved = got.iter().zip(&initial).filter(|(a, b)| f32::from_bits(**a) != **b).count();
        assert_eq!(moved, len, "the weight decay should move every parameter");
    }

    /// The device counts a step and computes its bias corrections with the same bits as the
    /// host's f32 powi, from the first step to past a million, and leaves both alone when the
    /// norm is NaN or infinite.
    #[test]
    fn count_step_matches_host_bias_corrections() {
        let Some(gpu) = test_gpu() else { return };
        let norm = gpu.storage_buffer("norm", 4).unwrap();
        let step = gpu.storage_buffer("step", std::mem::size_of::<AdamWStep>() as u64).unwrap();
        let dispatch = count_step(gpu, (&step).into(), (&norm).into()).unwrap();
        let run = |before: u32, beta1: f32, beta2: f32, norm_value: f32| -> AdamWStep {
            let values = AdamWStep { beta1, beta2, steps: before, bias_correction1: -1.0, bias_correction2: -1.0, ..step_values(1, 1.0, 1.0) };
            gpu.write(&step, 0, &[values]);
            gpu.write(&norm, 0, &[norm_value]);
            let mut encoder = gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("count step") });
            {
                let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: None, timestamp_writes: None });
                dispatch.record(&mut pass);
            }
            gpu.queue.submit(Some(encoder.finish()));
            let words: Vec<u32> = gpu.read(&step, 0, std::mem::size_of::<AdamWStep>() / 4).unwrap();
            *bytemuck::from_bytes(bytemuck::cast_slice(&words))
        };
        let mut ts: Vec<u32> = (1..=40).collect();
        ts.extend([63, 64, 65, 100, 999, 1000, 1023, 1024, 4097, 65_535, 1_000_001]);
        for (beta1, beta2) in [(0.9f32, 0.999f32), (0.95, 0.98)] {
            for &t in &ts {
                let out = run(t - 1, beta1, beta2, 3.5);
                assert_eq!(out.steps, t);
                for (got, beta) in [(out.bias_correction1, beta1), (out.bias_correction2, beta2)] {
                    let want = bias_correction(beta, t);
                    assert_eq!(got.to_bits(), want.to_bits(), "step {t}, beta {beta}: device {got:e}, host {want:e}");
                }
            }
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let out = run(7, 0.9, 0.999, bad);
            assert_eq!((out.steps, out.bias_correction1, out.bias_correction2), (7, -1.0, -1.0), "norm {bad}: the step must not count");
        }
    }
}
