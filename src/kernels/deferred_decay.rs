//! Deferred weight decay for the rows of a table that `adamw_update_rows` leaves alone
//! (`shaders/deferred_decay.wgsl`): the owed factors of past steps, applied in step order before
//! anything reads the rows.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "deferred_decay", source: include_str!("../../shaders/deferred_decay.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;

static DECAY_ROWS: KernelEntry = KernelEntry {
    family: &FAMILY,
    entry: "decay_rows",
    bindings: &[BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadOnly, BindingKind::ReadWrite],
};

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] = &[(&DECAY_ROWS, WORKGROUP_SIZE)];

/// Bytes of one logged step: its learning rate, then its global gradient norm (both f32).
pub(crate) const STEP_BYTES: u64 = 8;

/// Byte offset of the norm within a logged step.
pub(crate) const NORM_OFFSET: u64 = 4;

/// Laid out as `DecayParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct DecayParams {
    len: u32,
    weight_decay: f32,
    row_len: u32,
    max_norm: f32,
}

/// Returns the number of u32 values in a list that names at most `rows` rows: the count, the end
/// step, then a (row, first owed step) pair per row.
pub(crate) fn list_len(rows: usize) -> usize {
    2 + 2 * rows
}

/// Builds the u32 values of a list for [`decay_rows`], in which each `(row, from)` pair owes the
/// factors of logged steps `from..end`.
pub(crate) fn list(end: u32, rows: &[(u32, u32)]) -> Vec<u32> {
    let mut values = Vec::with_capacity(list_len(rows.len()));
    values.push(rows.len() as u32);
    values.push(end);
    for &(row, from) in rows {
        values.extend([row, from]);
    }
    values
}

/// Applies to each row named in `list` (see [`list`]) the weight decay of the logged steps it
/// owes: one factor `1 - lr * weight_decay` per step, in step order. Steps that AdamW skipped
/// (with `max_norm > 0`, those whose logged norm is NaN or infinite) are skipped here too. The
/// dispatch reads its workgroup counts from `counts`, which the caller sets to [`rows_workgroups`]
/// for the list it writes. The list may name at most `max_rows` rows.
///
/// # Shapes
/// - `steps`: (S, 2), the (lr, norm) of each logged step
/// - `list`: at least [`list_len`]`(max_rows)` u32 values
/// - `param`: (N) with N = `len`, a multiple of `row_len`, itself a multiple of 4
#[allow(clippy::too_many_arguments)]
pub(crate) fn decay_rows(
    gpu: &Gpu,
    label: &str,
    len: usize,
    row_len: usize,
    weight_decay: f32,
    max_norm: f32,
    max_rows: usize,
    steps: TensorBinding<'_>,
    list: TensorBinding<'_>,
    param: TensorBinding<'_>,
    counts: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    assert!(
        row_len > 0 && row_len % 4 == 0 && len % row_len == 0,
        "`{label}`: {len} floats in rows of {row_len}: rows must be a multiple of 4 floats and divide the tensor"
    );
    assert!(list.size >= list_len(max_rows) as u64 * 4, "`{label}`: the row list is {} bytes, too small for {max_rows} rows", list.size);
    let param = super::matmul::sized_binding(label, "param", param, len, true);
    let groups = super::grid_1d(gpu, (max_rows * row_len / 4) as u64, WORKGROUP_SIZE);
    let p = DecayParams { len: len as u32, weight_decay, row_len: row_len as u32, max_norm };
    Ok(gpu.dispatch(&DECAY_ROWS, label, Some(bytemuck::bytes_of(&p)), &[steps, list, param], groups)?.with_indirect(counts))
}

/// Returns the workgroup counts of a [`decay_rows`] dispatch over a list of `listed` rows of `row_len`
/// floats.
pub(crate) fn rows_workgroups(gpu: &Gpu, listed: usize, row_len: usize) -> [u32; 3] {
    super::indirect_grid_1d(gpu, (listed * row_len / 4) as u64, WORKGROUP_SIZE)
}
