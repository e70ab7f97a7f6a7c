// Global L2 norm of the gradients, for clipping by global norm.
//
// norm_partial_sums: partials[partial_offset + k] = sum of x^2 over block k of one tensor
//   (assigned). A block is BLOCK_SIZE consecutive floats; one workgroup reduces one block, each
//   invocation a run of ELEMENTS_PER_INVOCATION consecutive floats of it.
// norm_finalize:     norm[0] = sqrt(sum of partials[0..count]) (assigned), in one workgroup.
// norm_row_sums:     partials[partial_offset + r] = sum of x^2 over row r of a table of rows of
//                    `row_len` floats (assigned), one invocation per row adding the row's floats
//                    in index order. The norm of a table whose gradient reaches only some rows
//                    (the token embedding of a classifier) is summed this way.
// norm_row_sums_listed: the same for the rows listed in `rows` (a count, then row indices) only,
//                    in a dispatch that the host sizes indirectly (see adamw_update_rows in
//                    shaders/adamw.wgsl). The host keeps the partial sum of an unlisted row, whose
//                    gradient is zero, at +0, so both entry points give the same bits.
//
// Every reduction runs in a fixed order (loops in index order, trees over the workgroup), never
// with atomics, so two runs give bitwise-identical norms.

const WORKGROUP_SIZE: u32 = 256u;
// Floats each invocation squares in norm_partial_sums.
const ELEMENTS_PER_INVOCATION: u32 = 16u;
const BLOCK_SIZE: u32 = WORKGROUP_SIZE * ELEMENTS_PER_INVOCATION;

struct NormParams {
    // All but norm_finalize: floats in the gradient tensor.
    len: u32,
    // All but norm_finalize: index in partials of the tensor's first partial sum (of its first
    // block, or of its first row).
    partial_offset: u32,
    // norm_finalize: number of partial sums to add.
    count: u32,
    // norm_row_sums and norm_row_sums_listed: floats per row of the table.
    row_len: u32,
}

// Each slot is declared once and shared by the entry points.
@group(0) @binding(0) var<uniform> params: NormParams;
@group(0) @binding(1) var<storage, read> input: array<f32>;        // partial sums: grad (len); finalize: partials (count)
@group(0) @binding(2) var<storage, read_write> output: array<f32>; // partial sums: partials; finalize: norm (1)
@group(0) @binding(3) var<storage, read> rows: array<u32>;          // norm_row_sums_listed: count, then rows

var<workgroup> partial: array<f32, WORKGROUP_SIZE>;

// Adds partial[0..WORKGROUP_SIZE] into partial[0] by pairwise halving. Every invocation of the
// workgroup must call it.
fn reduce_workgroup(lid: u32) {
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            partial[lid] = partial[lid] + partial[lid + stride];
        }
        workgroupBarrier();
    }
}

// Sum of x^2 over the run of ELEMENTS_PER_INVOCATION floats from `first`, in index order; floats
// at or past len count as 0.
fn squared_run(first: u32) -> f32 {
    var sum = 0.0;
    for (var k = 0u; k < ELEMENTS_PER_INVOCATION; k++) {
        let i = first + k;
        if (i < params.len) {
            let x = input[i];
            sum = fma(x, x, sum);
        }
    }
    return sum;
}

// Adds every invocation's `sum` and stores the total as the partial sum of `block`. Every
// invocation of the workgroup must call it.
fn store_block_sum(lid: u32, block: u32, sum: f32) {
    partial[lid] = sum;
    reduce_workgroup(lid);
    if (lid == 0u) {
        output[params.partial_offset + block] = partial[0];
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn norm_partial_sums(@builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) groups: vec3<u32>,
                     @builtin(local_invocation_index) lid: u32) {
    let block = wid.x + wid.y * groups.x;
    let start = block * BLOCK_SIZE;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (start >= params.len) {
        return;
    }
    store_block_sum(lid, block, squared_run(start + lid * ELEMENTS_PER_INVOCATION));
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn norm_finalize(@builtin(local_invocation_index) lid: u32) {
    var sum = 0.0;
    for (var i = lid; i < params.count; i += WORKGROUP_SIZE) {
        sum += input[i];
    }
    partial[lid] = sum;
    reduce_workgroup(lid);
    if (lid == 0u) {
        output[0] = sqrt(partial[0]);
    }
}

// Sum of x^2 over row r, in index order.
// NOTE: neighbouring invocations read rows far apart, which lavapipe handles well (measured) but
// which does not coalesce on GPUs (not measured there).
fn row_sum(r: u32) -> f32 {
    let first = r * params.row_len;
    var sum = 0.0;
    for (var i = 0u; i < params.row_len; i++) {
        let x = input[first + i];
        sum = fma(x, x, sum);
    }
    return sum;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn norm_row_sums(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) groups: vec3<u32>) {
    let r = gid.x + gid.y * groups.x * WORKGROUP_SIZE;
    if (r < params.len / params.row_len) {
        output[params.partial_offset + r] = row_sum(r);
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn norm_row_sums_listed(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) groups: vec3<u32>) {
    let entry = gid.x + gid.y * groups.x * WORKGROUP_SIZE;
    if (entry < rows[0]) {
        let r = rows[1u + entry];
        output[params.partial_offset + r] = row_sum(r);
    }
}
