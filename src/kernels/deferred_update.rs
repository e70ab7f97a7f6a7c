//! Deferred AdamW updates for the rows of a table that `adamw_update_rows` leaves alone
//! (`shaders/deferred_update.wgsl`): the steps a row missed while its gradient was zero, applied
//! in step order before anything reads the row.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "deferred_update", source: include_str!("../../shaders/deferred_update.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;

/// Set in a list entry's first owed step (see [`list`]) when the row's moments may be nonzero.
/// Must match `MOMENTS_FLAG` in the shader.
const MOMENTS_FLAG: u32 = 0x8000_0000;

static SETTLE_ROWS: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "settle_rows",
    bindings: &[
        BindingKind::Uniform,
        BindingKind::ReadOnly,
        BindingKind::ReadOnly,
        BindingKind::ReadWrite,
        BindingKind::ReadWrite,
        BindingKind::ReadWrite,
    ],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&SETTLE_ROWS, WORKGROUP_SIZE)];

/// Bytes of one logged step: its learning rate, its global gradient norm and its two bias
/// corrections (all f32).
pub(crate) const STEP_BYTES: u64 = 16;

/// Byte offset of the norm within a logged step.
pub(crate) const NORM_OFFSET: u64 = 4;

/// Byte offset of the two bias corrections within a logged step.
pub(crate) const BIAS_CORRECTIONS_OFFSET: u64 = 8;

/// The maximum number of steps in a log, because list entries keep their top bit for
/// [`MOMENTS_FLAG`].
pub(crate) const MAX_STEPS: u32 = MOMENTS_FLAG;

/// Laid out as `SettleParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct SettleParams {
    len: u32,
    weight_decay: f32,
    row_len: u32,
    max_norm: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    _pad0: u32,
}

/// The optimizer constants that every step of a run shares.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Constants {
    pub weight_decay: f32,
    /// Clipping threshold of the run's steps (`AdamWStep::max_norm`).
    pub max_norm: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
}

/// A row that owes the logged steps from `from` on; `moments` when its moments may be nonzero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Owed {
    pub row: u32,
    pub from: u32,
    pub moments: bool,
}

/// Returns the number of u32 values in a list that names at most `rows` rows: the count, the end
/// step, then a (row, first owed step) pair per row.
pub(crate) fn list_len(rows: usize) -> usize {
    2 + 2 * rows
}

/// Builds the u32 values of a list for [`settle_rows`], in which each row owes the logged steps
/// `from..end`.
pub(crate) fn list(end: u32, rows: &[Owed]) -> Vec<u32> {
    assert!(end < MAX_STEPS, "a log of {end} steps is longer than a list can name");
    let mut values = Vec::with_capacity(list_len(rows.len()));
    values.push(rows.len() as u32);
    values.push(end);
    for owed in rows {
        values.extend([owed.row, owed.from | if owed.moments { MOMENTS_FLAG } else { 0 }]);
    }
    values
}

/// Applies to each row named in `list` (see [`list`]) the AdamW steps it owes with a zero
/// gradient, in step order. A row whose moments are 0 gets the weight decay alone. Any other
/// row also gets the decay of both moments and the step along them. Steps that AdamW skipped (with `max_norm > 0`,
/// those whose logged norm is NaN or infinite) are skipped here too. The dispatch reads its
/// workgroup counts from `counts`, which the caller sets to [`rows_workgroups`] for the list it
/// writes. The list may name at most `max_rows` rows.
///
/// # Shapes
/// - `steps`: (S, 4), the (lr, norm, bias correction 1, bias correction 2) of each logged step
/// - `list`: at least [`list_len`]`(max_rows)` u32 values
/// - `param`, `m`, `v`: (N) with N = `len`, a multiple of `row_len`, itself a multiple of 4
#[allow(clippy::too_many_arguments)]
pub(crate) fn settle_rows(
    gpu: &Gpu,
    label: &str,
    len: usize,
    row_len: usize,
    constants: Constants,
    max_rows: usize,
    steps: TensorBinding<'_>,
    list: TensorBinding<'_>,
    [param, m, v]: [TensorBinding<'_>; 3],
    counts: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    assert!(
        row_len > 0 && row_len % 4 == 0 && len % row_len == 0,
        "`{label}`: {len} floats in rows of {row_len}: rows must be a multiple of 4 floats and divide the tensor"
    );
    assert!(list.size >= list_len(max_rows) as u64 * 4, "`{label}`: the row list is {} bytes, too small for {max_rows} rows", list.size);
    let param = super::matmul::sized_binding(label, "param", param, len, true);
    let m = super::matmul::sized_binding(label, "m", m, len, true);
    let v = super::matmul::sized_binding(label, "v", v, len, true);
    let groups = super::grid_1d(gpu, (max_rows * row_len / 4) as u64, WORKGROUP_SIZE);
    let Constants { weight_decay, max_norm, beta1, beta2, eps } = constants;
    let p = SettleParams { len: len as u32, weight_decay, row_len: row_len as u32, max_norm, beta1, beta2, eps, _pad0: 0 };
    Ok(gpu.dispatch(&SETTLE_ROWS, label, Some(bytemuck::bytes_of(&p)), &[steps, list, param, m, v], groups)?.with_indirect(counts))
}

/// Returns the workgroup counts of a [`settle_rows`] dispatch over a list of `listed` rows of
/// `row_len` floats.
pub(crate) fn rows_workgroups(gpu: &Gpu, listed: usize, row_len: usize) -> [u32; 3] {
    super::indirect_grid_1d(gpu, (listed * row_len / 4) as u64, WORKGROUP_SIZE)
}
