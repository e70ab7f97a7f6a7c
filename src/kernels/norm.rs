//! Global L2 norm of the gradients (`shaders/norm.wgsl`), the input of clipping by global norm.
//!
//! Each gradient tensor is reduced to partial sums of squares, all tensors writing into one
//! `partials` buffer at their own offsets. [`partial_sums`] writes one per block of floats (their
//! count is [`partials_len`]). For a table whose gradient reaches only some rows, [`row_sums`] or
//! [`listed_row_sums`] writes one per row. Then [`finalize`] adds the partials in a fixed order
//! and takes the square root.

use crate::gpu::{BindingKind, Dispatch, Gpu, GpuError, KernelEntry, ShaderFamily, TensorBinding};

pub(crate) static FAMILY: ShaderFamily =
    ShaderFamily { name: "norm", source: include_str!("../../shaders/norm.wgsl") };

/// Must match `WORKGROUP_SIZE` in the shader.
pub(crate) const WORKGROUP_SIZE: u32 = 256;
/// Must match `ELEMENTS_PER_INVOCATION` in the shader.
const ELEMENTS_PER_INVOCATION: usize = 16;
/// Floats reduced into one partial sum by one workgroup.
const BLOCK_SIZE: usize = WORKGROUP_SIZE as usize * ELEMENTS_PER_INVOCATION;

/// Bindings of `norm_row_sums_listed`: params, input, output, rows. The other entry points bind
/// all but the last.
const BINDINGS: [BindingKind; 4] = [BindingKind::Uniform, BindingKind::ReadOnly, BindingKind::ReadWrite, BindingKind::ReadOnly];
const INPUT_OUTPUT: &[BindingKind] = BINDINGS.split_at(3).0;

static PARTIAL_SUMS: KernelEntry = KernelEntry { family: &FAMILY, entry: "norm_partial_sums", bindings: INPUT_OUTPUT };
static FINALIZE: KernelEntry = KernelEntry { family: &FAMILY, entry: "norm_finalize", bindings: INPUT_OUTPUT };
static ROW_SUMS: KernelEntry = KernelEntry { family: &FAMILY, entry: "norm_row_sums", bindings: INPUT_OUTPUT };
static ROW_SUMS_LISTED: KernelEntry = KernelEntry { family: &FAMILY, entry: "norm_row_sums_listed", bindings: &BINDINGS };

/// Entry points and their WGSL workgroup sizes, for the translation test.
pub(crate) const ENTRIES: &[(&KernelEntry, u32)] =
    &[(&PARTIAL_SUMS, WORKGROUP_SIZE), (&FINALIZE, WORKGROUP_SIZE), (&ROW_SUMS, WORKGROUP_SIZE), (&ROW_SUMS_LISTED, WORKGROUP_SIZE)];

/// Uniform parameters, laid out as `NormParams` in the shader.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct NormParams {
    /// Floats in the gradient tensor (all but finalize).
    pub len: u32,
    /// Index in `partials` of the tensor's first partial sum (all but finalize).
    pub partial_offset: u32,
    /// Number of partial sums to add (finalize only).
    pub count: u32,
    /// Floats per row ([`row_sums`] and [`listed_row_sums`] only).
    pub row_len: u32,
}

/// Panics unless `binding` contains at least `elements` 4-byte values. Shapes come from the
/// model, not from user input, and a smaller binding would make the shader read or write the
/// wrong elements without any error.
fn check_binding(label: &str, name: &str, binding: &TensorBinding<'_>, elements: usize) {
    let needed = elements as u64 * 4;
    assert!(binding.size >= needed, "`{label}`: binding `{name}` is {} bytes, but its shape needs {needed}", binding.size);
}

/// Returns the number of partial sums [`partial_sums`] writes for a tensor of `len` floats.
pub(crate) fn partials_len(len: usize) -> usize {
    len.div_ceil(BLOCK_SIZE)
}

/// Writes the sums of squares of the blocks of `grad` to
/// `partials[partial_offset..partial_offset + partials_len(len)]` (assigned).
///
/// # Shapes
/// - `grad`: (len)
/// - `partials`: (P) with P >= `partial_offset + partials_len(len)`
pub(crate) fn partial_sums(
    gpu: &Gpu,
    label: &str,
    len: usize,
    grad: TensorBinding<'_>,
    partials: TensorBinding<'_>,
    partial_offset: usize,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "grad", &grad, len);
    check_binding(label, "partials", &partials, partial_offset + partials_len(len));
    let p = NormParams { len: len as u32, partial_offset: partial_offset as u32, count: 0, row_len: 0 };
    let blocks = u32::try_from(partials_len(len)).unwrap_or(u32::MAX);
    let groups = crate::gpu::grid_for(blocks, gpu.limits().max_compute_workgroups_per_dimension);
    gpu.dispatch(&PARTIAL_SUMS, label, Some(bytemuck::bytes_of(&p)), &[grad, partials], groups)
}

/// Writes one partial sum per row of a table of rows of `row_len` floats to
/// `partials[partial_offset..partial_offset + len / row_len]` (assigned): the sum of x^2 over the
/// row, in index order.
///
/// # Shapes
/// - `grad`: (len), a whole number of rows
/// - `partials`: at least `partial_offset + len / row_len`
pub(crate) fn row_sums(
    gpu: &Gpu,
    label: &str,
    len: usize,
    row_len: usize,
    grad: TensorBinding<'_>,
    partials: TensorBinding<'_>,
    partial_offset: usize,
) -> Result<Dispatch, GpuError> {
    let rows = table_rows(label, len, row_len);
    check_binding(label, "grad", &grad, len);
    check_binding(label, "partials", &partials, partial_offset + rows);
    let p = NormParams { len: len as u32, partial_offset: partial_offset as u32, count: 0, row_len: row_len as u32 };
    let groups = super::grid_1d(gpu, rows as u64, WORKGROUP_SIZE);
    gpu.dispatch(&ROW_SUMS, label, Some(bytemuck::bytes_of(&p)), &[grad, partials], groups)
}

/// Writes the partial sums of [`row_sums`] for the rows listed in `rows` (their count, then
/// their indices), bit for bit as [`row_sums`] writes them, and nothing for the others. For a
/// table whose gradient is zero outside the listed rows, that gives the norm of the whole table
/// provided the partial sums of the other rows hold +0, which the caller ensures by zeroing them
/// before each step. The dispatch reads its workgroup counts from `counts`, which the caller sets to
/// [`rows_workgroups`] whenever the list changes.
///
/// # Shapes
/// - `grad`: (len), a whole number of rows
/// - `rows`: (1 + len / row_len)
/// - `partials`: at least `partial_offset + len / row_len`
#[allow(clippy::too_many_arguments)]
pub(crate) fn listed_row_sums(
    gpu: &Gpu,
    label: &str,
    len: usize,
    row_len: usize,
    grad: TensorBinding<'_>,
    rows: TensorBinding<'_>,
    partials: TensorBinding<'_>,
    partial_offset: usize,
    counts: &wgpu::Buffer,
) -> Result<Dispatch, GpuError> {
    let count = table_rows(label, len, row_len);
    check_binding(label, "grad", &grad, len);
    check_binding(label, "rows", &rows, 1 + count);
    check_binding(label, "partials", &partials, partial_offset + count);
    let p = NormParams { len: len as u32, partial_offset: partial_offset as u32, count: 0, row_len: row_len as u32 };
    let groups = super::grid_1d(gpu, count as u64, WORKGROUP_SIZE);
    Ok(gpu.dispatch(&ROW_SUMS_LISTED, label, Some(bytemuck::bytes_of(&p)), &[grad, partials, rows], groups)?.with_indirect(counts))
}

/// Returns the number of rows of `row_len` floats in a table of `len` floats, which must be a
/// whole number.
fn table_rows(label: &str, len: usize, row_len: usize) -> usize {
    assert!(row_len > 0, "`{label}`: rows of 0 floats");
    assert!(len.is_multiple_of(row_len), "`{label}`: {len} floats are not a whole number of rows of {row_len}");
    len / row_len
}

/// Returns the workgroup counts of a [`listed_row_sums`] dispatch over `listed` rows.
pub(crate) fn rows_workgroups(gpu: &Gpu, listed: usize) -> [u32; 3] {
    super::indirect_grid_1d(gpu, listed as u64, WORKGROUP_SIZE)
}

/// Writes `norm[0] = sqrt(sum of partials[0..count])` (assigned), added in a fixed order by one
/// workgroup.
///
/// # Shapes
/// - `partials`: (P) with P >= `count`
/// - `norm`: (1)
pub(crate) fn finalize(
    gpu: &Gpu,
    label: &str,
    count: usize,
    partials: TensorBinding<'_>,
    norm: TensorBinding<'_>,
) -> Result<Dispatch, GpuError> {
    check_binding(label, "partials", &partials, count);
    check_binding(label, "norm", &norm, 1);
    let p = NormParams { len: 0, partial_offset: 0, count: count as u32, row_len: 0 };
    gpu.dispatch(&FINALIZE, label, Some(bytemuck::bytes_of(&p)), &[partials, norm], [1, 1, 1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::norm as reference;
    use crate::testing::{assert_close, random_vec, test_gpu, to_f64};

    /// The largest case sums 1.8 million squares in f32, in sequential runs of at most 16 terms
    /// joined by pairwise trees, so no value passes through more than about 35 additions. The
    /// relative error therefore stays within about 35 units of f32 rounding (6e-8), and 1e-5
    /// leaves a wide margin.
    const RTOL: f64 = 1e-5;
    const ATOL: f64 = 1e-7;

    #[test]
    fn params_size_is_multiple_of_16() {
        assert_eq!(std::mem::size_of::<NormParams>() % 16, 0);
    }

    #[test]
    fn partials_len_rounds_up() {
        assert_eq!(partials_len(0), 0);
        assert_eq!(partials_len(1), 1);
        assert_eq!(partials_len(BLOCK_SIZE), 1);
        assert_eq!(partials_len(BLOCK_SIZE + 1), 2);
    }

    /// Computes the global norm of `tensors` on the device, one partial-sums dispatch per tensor.
    fn device_norm(gpu: &Gpu, tensors: &[Vec<f32>]) -> f32 {
        let count: usize = tensors.iter().map(|t| partials_len(t.len())).sum();
        // Fill with NaN so that a partial the kernels fail to write poisons the norm.
        let partials = gpu.upload("partials", &vec![f32::NAN; count.max(1)]).unwrap();
        let norm = gpu.storage_buffer("norm", 4).unwrap();
        let buffers: Vec<wgpu::Buffer> = tensors.iter().map(|t| gpu.upload("grad", t).unwrap()).collect();
        let mut dispatches = Vec::new();
        let mut offset = 0;
        for (t, buffer) in tensors.iter().zip(&buffers) {
            dispatches.push(partial_sums(gpu, "partials", t.len(), buffer.into(), (&partials).into(), offset).unwrap());
            offset += partials_len(t.len());
        }
        dispatches.push(finalize(gpu, "finalize", count, (&partials).into(), (&norm).into()).unwrap());
        gpu.run("norm test", &dispatches).unwrap();
        gpu.read::<f32>(&norm, 0, 1).unwrap()[0]
    }

    #[test]
    fn global_norm_matches_reference() {
        let Some(gpu) = test_gpu() else { return };
        let cases: Vec<Vec<usize>> =
            vec![vec![1], vec![7, 4097, 1], vec![BLOCK_SIZE, 3 * BLOCK_SIZE + 5], vec![768 * 2304, 768, 3]];
        for (seed, lens) in cases.iter().enumerate() {
            let tensors: Vec<Vec<f32>> =
                lens.iter().enumerate().map(|(i, &len)| random_vec(len, (seed * 10 + i) as u64)).collect();
            let got = device_norm(gpu, &tensors);
            let wide: Vec<Vec<f64>> = tensors.iter().map(|t| to_f64(t)).collect();
            let slices: Vec<&[f64]> = wide.iter().map(|t| t.as_slice()).collect();
            let want = reference::global_norm(&slices);
            assert_close(&format!("global norm of tensors {lens:?}"), &[got], &[want], ATOL, RTOL);
        }
    }

    /// The dense row kernel, the only one on adapters without indirect dispatch, after a block
    /// tensor so that its partial sums start at a nonzero offset: each row sum, and the norm of
    /// both, against f64. Every slot starts as NaN, so a row the kernel misses poisons the norm.
    #[test]
    fn row_sums_match_reference() {
        let Some(gpu) = test_gpu() else { return };
        let (rows, row_len) = (301, 37);
        let table = random_vec(rows * row_len, 21);
        let other = random_vec(5000, 22);
        let offset = partials_len(other.len());
        let count = offset + rows;
        let partials = gpu.upload("partials", &vec![f32::NAN; count]).unwrap();
        let norm = gpu.storage_buffer("norm", 4).unwrap();
        let (grad, plain) = (gpu.upload("grad", &table).unwrap(), gpu.upload("other", &other).unwrap());
        let dispatches = vec![
            partial_sums(gpu, "plain", other.len(), (&plain).into(), (&partials).into(), 0).unwrap(),
            row_sums(gpu, "rows", table.len(), row_len, (&grad).into(), (&partials).into(), offset).unwrap(),
            finalize(gpu, "finalize", count, (&partials).into(), (&norm).into()).unwrap(),
        ];
        gpu.run("row sums test", &dispatches).unwrap();
        let got: Vec<f32> = gpu.read::<f32>(&partials, 0, count).unwrap()[offset..].to_vec();
        let want: Vec<f64> = table.chunks(row_len).map(|row| row.iter().map(|&x| f64::from(x) * f64::from(x)).sum()).collect();
        assert_close("row sums of squares", &got, &want, ATOL, RTOL);
        let total = gpu.read::<f32>(&norm, 0, 1).unwrap()[0];
        let want_norm = reference::global_norm(&[&to_f64(&other), &to_f64(&table)]);
        assert_close("norm of a block tensor and a row table", &[total], &[want_norm], ATOL, RTOL);
    }

    #[test]
    fn global_norm_is_bitwise_repeatable() {
        let Some(gpu) = test_gpu() else { return };
        let tensors = vec![random_vec(100_003, 5), random_vec(9, 6)];
        let first = device_norm(gpu, &tensors);
        let second = device_norm(gpu, &tensors);
        assert_eq!(first.to_bits(), second.to_bits(), "global norm differs between runs: {first} vs {second}");
    }

    /// A table of 203 rows of 44 floats lists every third row, in reverse order, and has NaN
    /// in the others. The listed-row kernel reads only the listed rows, leaves the partial sums
    /// of the others at 0, and matches their norm. A second tensor without rows joins the same
    /// total. With the NaN rows set to 0, the dense row kernel gives the same 203 partial sums bit
    /// for bit.
    #[test]
    fn listed_row_sums_match_dense_rows() {
        let Some(gpu) = test_gpu().filter(|gpu| gpu.indirect_dispatch()) else { return };
        let (rows, row_len) = (203, 44);
        let mut table = random_vec(rows * row_len, 11);
        let listed: Vec<u32> = (0..rows as u32).filter(|r| r % 3 == 0).rev().collect();
        for (row, values) in table.chunks_mut(row_len).enumerate() {
            if !listed.contains(&(row as u32)) {
                values.fill(f32::NAN);
            }
        }
        // The plain tensor's partial sums come first, so the table's start at a nonzero offset.
        let other = random_vec(1000, 12);
        let offset = partials_len(other.len());
        let count = offset + rows;
        let mut initial = vec![f32::NAN; offset];
        initial.resize(count, 0.0);
        let partials = gpu.upload("partials", &initial).unwrap();
        let norm = gpu.storage_buffer("norm", 4).unwrap();
        let grad = gpu.upload("grad", &table).unwrap();
        let mut list = vec![listed.len() as u32];
        list.extend(&listed);
        list.resize(1 + rows, 0);
        let row_list = gpu.upload("rows", &list).unwrap();
        let counts = gpu.indirect_buffer("norm workgroups");
        gpu.write(&counts, 0, &rows_workgroups(gpu, listed.len()));
        let plain = gpu.upload("other", &other).unwrap();
        let dispatches = vec![
            listed_row_sums(gpu, "rows", table.len(), row_len, (&grad).into(), (&row_list).into(), (&partials).into(), offset, &counts).unwrap(),
            partial_sums(gpu, "plain", other.len(), (&plain).into(), (&partials).into(), 0).unwrap(),
            finalize(gpu, "finalize", count, (&partials).into(), (&norm).into()).unwrap(),
        ];
        gpu.run("row norm test", &dispatches).unwrap();
        let got = gpu.read::<f32>(&norm, 0, 1).unwrap()[0];
        let listed_values: Vec<f64> = table.iter().filter(|x| !x.is_nan()).map(|&x| f64::from(x)).collect();
        let want = reference::global_norm(&[&listed_values, &to_f64(&other)]);
        assert_close("norm of the listed rows and a plain tensor", &[got], &[want], ATOL, RTOL);

        let by_list: Vec<u32> = gpu.read::<u32>(&partials, 0, count).unwrap()[offset..].to_vec();
        let zeroed: Vec<f32> = table.iter().map(|&x| if x.is_nan() { 0.0 } else { x }).collect();
        let zeroed_grad = gpu.upload("zeroed grad", &zeroed).unwrap();
        let dense = row_sums(gpu, "dense", zeroed.len(), row_len, (&zeroed_grad).into(), (&partials).into(), offset).unwrap();
        gpu.run("row norm test, dense", &[dense]).unwrap();
        let by_rows: Vec<u32> = gpu.read::<u32>(&partials, 0, count).unwrap()[offset..].to_vec();
        let first_difference = by_list.iter().zip(&by_rows).position(|(a, b)| a != b);
        assert_eq!(first_difference, None, "the listed and dense row kernels give different partial sums at that row");
    }
}
