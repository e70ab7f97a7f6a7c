//! Softmax cross-entropy (`shaders/crossentropy.wgsl`) for the classification head and the
//! language-model head.
//!
//! A row is ignored when its target is negative (padding): its loss and gradient are 0 and it is
//! not counted in the mean. A target >= `classes` is invalid input (the host validates labels);
//! its row gets a NaN loss and NaN gradients so that the mistake shows up as a non-finite loss.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "crossentropy", source: include_str!("../../shaders/crossentropy.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;

static FORWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "crossentropy_forward",
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadOnly, BindingKind::ReadWrite],
};
static MEAN: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "crossentropy_mean",
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadOnly, BindingKind::ReadWrite],
};
static BACKWARD: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "crossentropy_backward",
    bindings: &[
        BindingKind::Uniform,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
        BindingKind::ReadWrite,
        BindingKind::ReadOnly,
    ],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] =
    &[(&FORWARD, WORKGROUP_SIZE), (&MEAN, WORKGROUP_SIZE), (&BACKWARD, WORKGROUP_SIZE)];

/// Uniform parameters, laid out as `CrossEntropyParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct CrossEntropyParams {
    pub rows: u32,
    pub classes: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

fn params(rows: usize, classes: usize) -> CrossEntropyParams {
    CrossEntropyParams { rows: rows as u32, classes: classes as u32, _pad0: 0, _pad1: 0 }
}

/// Returns the workgroup grid of the row kernels: one workgroup per row, spread over a 2-D grid
/// when the rows exceed the per-dimension limit.
fn row_grid(gpu: &Gpu, rows: usize) -> [u32; 3] {
    let rows = u32::try_from(rows).unwrap_or(u32::MAX);
    crate::gpu::grid_for(rows, gpu.limits().max_compute_workgroups_per_dimension)
}

/// Panics unless `binding` contains at least `elements` 4-byte values. Shapes come from the
/// model, not from user input, and a smaller binding would make the shader read or write the
/// wrong elements without any error.
fn check_binding(label: &str, name: &str, binding: &TensorBinding<'_>, elements: usize) {
    let needed = elements as u64 * 4;
    assert!(binding.size >= needed, "`{label}`: binding `{name}` is {} bytes, but its shape needs {needed}", binding.size);
}

/// Computes `losses[r] = logsumexp(logits[r]) - logits[r, targets[r]]` (assigned), 0 for
/// ignored rows.
///
/// # Shapes
/// - `logits`: (rows, classes)
/// - `targets`: (rows) i32, negative to ignore the row
/// - `losses`: (rows), assigned
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    gpu: &Gpu,
    label: &str,
    rows: usize,
    classes: usize,
    logits: TensorBinding<'_>,
    targets: TensorBinding<'_>,
    losses: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "logits", &logits, rows * classes);
    check_binding(label, "targets", &targets, rows);
    check_binding(label, "losses", &losses, rows);
    let p = params(rows, classes);
    gpu.dispatch(&FORWARD, label, Some(bytemuck::bytes_of(&p)), &[logits, targets, losses], row_grid(gpu, rows))
}

/// Writes `loss_out = [mean of losses over the rows with a target >= 0, their count]`
/// (assigned, in one workgroup with a fixed order). The mean is 0 when every row is ignored.
///
/// # Shapes
/// - `losses`: (rows), from [`forward`]
/// - `targets`: (rows) i32
/// - `loss_out`: (2), assigned
pub(crate) fn mean(
    gpu: &Gpu,
    label: &str,
    rows: usize,
    losses: TensorBinding<'_>,
    targets: TensorBinding<'_>,
    loss_out: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "losses", &losses, rows);
    check_binding(label, "targets", &targets, rows);
    check_binding(label, "loss_out", &loss_out, 2);
    // The mean reads no logits, so the class count stays 0.
    let p = params(rows, 0);
    gpu.dispatch(&MEAN, label, Some(bytemuck::bytes_of(&p)), &[losses, targets, loss_out], [1, 1, 1])
}

/// Computes the gradient of the mean loss:
/// `dlogits[r, c] = (softmax(logits[r])[c] - [c == targets[r]]) / count` (assigned), where
/// `count = loss_out[1]`. Rows that are ignored, and every row when `count` is 0, get 0.
///
/// # Shapes
/// - `logits`: (rows, classes)
/// - `targets`: (rows) i32
/// - `loss_out`: (2), from [`mean`]
/// - `dlogits`: (rows, classes), assigned
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    gpu: &Gpu,
    label: &str,
    rows: usize,
    classes: usize,
    logits: TensorBinding<'_>,
    targets: TensorBinding<'_>,
    loss_out: TensorBinding<'_>,
    dlogits: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "logits", &logits, rows * classes);
    check_binding(label, "targets", &targets, rows);
    check_binding(label, "loss_out", &loss_out, 2);
    check_binding(label, "dlogits", &dlogits, rows * classes);
    let p = params(rows, classes);
    // The shader's binding order puts the output before loss_out, so that every entry point of
    // the family writes through binding 3.
    let buffers = [logits, targets, dlogits, loss_out];
    gpu.dispatch(&BACKWARD, label, Some(bytemuck::bytes_of(&p)), &buffers, row_grid(gpu, rows))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::crossentropy as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};
    use rand::{Rng, SeedableRng};

    /// Losses are about log(classes) <= 11; the f32 sum of up to 50257 exponentials, merged
    /// pairwise, and the log keep the error within a few units of f32 rounding of that size.
    const LOSS_ATOL: f64 = 2e-5;
    const LOSS_RTOL: f64 = 2e-6;
    /// Away from the target class the gradient is a probability (down to about 1e-6 for softmax
    /// over 50257 logits in [-4, 4)) divided by the count. exp and the division add a few units
    /// of f32 rounding, and the f32 sum of exponentials carries about 1e-6 relative error.
    const GRAD_ATOL: f64 = 1e-12;
    const GRAD_RTOL: f64 = 1e-5;
    /// At the target class the gradient is (p - 1) / count, and p - 1 cancels: it keeps the
    /// absolute error of p, a few units of f32 rounding (1.2e-7) of a value up to 1. This
    /// absolute tolerance is divided by the count.
    const TARGET_GRAD_ATOL_TIMES_COUNT: f64 = 5e-7;

    /// Targets in `0..classes`, with the rows in `ignored` set to -1.
    fn random_targets(rows: usize, classes: usize, ignored: &[usize], seed: u64) -> Vec<i32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..rows)
            .map(|r| if ignored.contains(&r) { -1 } else { rng.random_range(0..classes as i32) })
            .collect()
    }

    fn logits(rows: usize, classes: usize, seed: u64) -> Vec<f32> {
        random_vec(rows * classes, seed).iter().map(|x| 4.0 * x).collect()
    }

    /// Runs forward, mean and backward on the device and checks each against the reference.
    fn check(rows: usize, classes: usize, targets: &[i32]) {
        let Some(gpu) = test_gpu() else { return };
        let logits = logits(rows, classes, 11);
        let dlogits_bytes = (rows * classes * 4) as u64;
        let dl = gpu.upload("logits", &logits).unwrap();
        let dt = gpu.upload("targets", targets).unwrap();
        let dlosses = gpu.storage_buffer("losses", (rows * 4) as u64).unwrap();
        let dloss_out = gpu.storage_buffer("loss_out", 8).unwrap();
        // Start from NaN so that an element the backward fails to write shows up.
        let ddlogits = gpu.upload("dlogits", &vec![f32::NAN; rows * classes]).unwrap();
        assert!(ddlogits.size() >= dlogits_bytes);
        let dispatches = vec![
            forward(gpu, "xent forward", rows, classes, (&dl).into(), (&dt).into(), (&dlosses).into()).unwrap(),
            mean(gpu, "xent mean", rows, (&dlosses).into(), (&dt).into(), (&dloss_out).into()).unwrap(),
            backward(gpu, "xent backward", rows, classes, (&dl).into(), (&dt).into(), (&dloss_out).into(), (&ddlogits).into())
                .unwrap(),
        ];
        gpu.run("crossentropy test", &dispatches).unwrap();

        let l64 = to_f64(&logits);
        let want = reference::crossentropy_forward(&l64, targets, rows, classes);
        let shape = format!("rows={rows} classes={classes}");
        let losses: Vec<f32> = gpu.read(&dlosses, 0, rows).unwrap();
        assert_close(&format!("crossentropy_forward {shape}"), &losses, &want.losses, LOSS_ATOL, LOSS_RTOL);
        let loss_out: Vec<f32> = gpu.read(&dloss_out, 0, 2).unwrap();
        assert_close(&format!("crossentropy_mean {shape} mean"), &loss_out[..1], &[want.mean], LOSS_ATOL, LOSS_RTOL);
        assert_eq!(loss_out[1], want.count as f32, "crossentropy_mean {shape}: count {} expected {}", loss_out[1], want.count);
        let dlogits: Vec<f32> = gpu.read(&ddlogits, 0, rows * classes).unwrap();
        let want_grad = reference::crossentropy_backward(&l64, targets, rows, classes);
        // Split the target-class elements from the rest: they have a different error bound.
        let is_target = |i: usize| targets[i / classes] == (i % classes) as i32;
        let (mut got_target, mut want_target, mut got_other, mut want_other) = (vec![], vec![], vec![], vec![]);
        for (i, (&g, &w)) in dlogits.iter().zip(&want_grad).enumerate() {
            if is_target(i) {
                got_target.push(g);
                want_target.push(w);
            } else {
                got_other.push(g);
                want_other.push(w);
            }
        }
        let what = format!("crossentropy_backward {shape} (non-target classes, in row order)");
        assert_close(&what, &got_other, &want_other, GRAD_ATOL, GRAD_RTOL);
        let target_atol = TARGET_GRAD_ATOL_TIMES_COUNT / want.count.max(1) as f64;
        let what = format!("crossentropy_backward {shape} (target classes, one per counted row)");
        assert_close(&what, &got_target, &want_target, target_atol, GRAD_RTOL);
    }

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<CrossEntropyParams>() % 16, 0);
    }

    #[test]
    fn crossentropy_two_classes_matches_reference() {
        check(1, 2, &[1]);
        check(13, 2, &random_targets(13, 2, &[4, 12], 1));
    }

    #[test]
    fn crossentropy_odd_sizes_match_reference() {
        check(5, 257, &random_targets(5, 257, &[0], 2));
        check(300, 3, &random_targets(300, 3, &[7, 299], 3));
    }

    #[test]
    fn crossentropy_vocabulary_matches_reference() {
        check(6, 50257, &random_targets(6, 50257, &[3], 4));
    }

    #[test]
    fn crossentropy_all_ignored_gives_zero() {
        check(3, 5, &[-1, -1, -100]);
    }

    #[test]
    fn crossentropy_out_of_range_target_gives_nan() {
        let Some(gpu) = test_gpu() else { return };
        let (rows, classes) = (3, 4);
        let targets = [2i32, 4, -1];
        let dl = gpu.upload("logits", &logits(rows, classes, 5)).unwrap();
        let dt = gpu.upload("targets", &targets).unwrap();
        let dlosses = gpu.storage_buffer("losses", (rows * 4) as u64).unwrap();
        let dloss_out = gpu.storage_buffer("loss_out", 8).unwrap();
        let ddlogits = gpu.storage_buffer("dlogits", (rows * classes * 4) as u64).unwrap();

        let dispatches = vec![
            forward(gpu, "xent forward", rows, classes, (&dl).into(), (&dt).into(), (&dlosses).into()).unwrap(),
            mean(gpu, "xent mean", rows, (&dlosses).into(), (&dt).into(), (&dloss_out).into()).unwrap(),
            backward(gpu, "xent backward", rows, classes, (&dl).into(), (&dt).into(), (&dloss_out).into(), (&ddlogits).into())
                .unwrap(),
        ];
        gpu.run("crossentropy test", &dispatches).unwrap();

        let losses: Vec<f32> = gpu.read(&dlosses, 0, rows).unwrap();
        assert!(losses[0].is_finite(), "crossentropy_forward: valid row 0 has loss {}", losses[0]);
        assert!(losses[1].is_nan(), "crossentropy_forward: target 4 of 4 classes gave loss {}, expected NaN", losses[1]);
        assert_eq!(losses[2], 0.0, "crossentropy_forward: ignored row 2 has loss {}", losses[2]);
        let loss_out: Vec<f32> = gpu.read(&dloss_out, 0, 2).unwrap();
        assert!(loss_out[0].is_nan(), "crossentropy_mean: mean {} expected NaN", loss_out[0]);
        assert_eq!(loss_out[1], 2.0, "crossentropy_mean: count {} expected 2", loss_out[1]);

        let dlogits: Vec<f32> = gpu.read(&ddlogits, 0, rows * classes).unwrap();
        for (i, g) in dlogits.iter().enumerate() {
            match i / classes {
                0 => assert!(g.is_finite(), "crossentropy_backward: valid row element {i} is {g}"),
                1 => assert!(g.is_nan(), "crossentropy_backward: out-of-range row element {i} is {g}, expected NaN"),
                _ => assert_eq!(*g, 0.0, "crossentropy_backward: ignored row element {i} is {g}"),
            }
        }
    }

    #[test]
    fn crossentropy_large_logits_stay_finite() {
        // exp(1000) overflows f32; subtracting the row maximum keeps every term in range.
        let Some(gpu) = test_gpu() else { return };
        let logits = [1000.0f32, 999.0, 990.0];
        let dl = gpu.upload("logits", &logits).unwrap();
        let dt = gpu.upload("targets", &[1i32]).unwrap();
        let dlosses = gpu.storage_buffer("losses", 4).unwrap();
        let d = forward(gpu, "xent forward", 1, 3, (&dl).into(), (&dt).into(), (&dlosses).into()).unwrap();
        gpu.run("crossentropy test", &[d]).unwrap();
        let got: Vec<f32> = gpu.read(&dlosses, 0, 1).unwrap();
        let want = reference::crossentropy_forward(&to_f64(&logits), &[1], 1, 3);
        assert_close("crossentropy_forward logits near 1000", &got, &want.losses, LOSS_ATOL, LOSS_RTOL);
    }
}
