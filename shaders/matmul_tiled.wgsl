// Matrix products staged through workgroup memory, for GPUs.
//
// The same three GEMM forms, parameters and bindings as shaders/matmul.wgsl (see there for how
// the linear-layer operations map onto them):
//   matmul_nn: result[r, c] (+)= sum_i lhs[r, i] * rhs[i, c]   (+ bias[c])
//   matmul_nt: result[r, c] (+)= sum_i lhs[r, i] * rhs[c, i]   (+ bias[c])
//   matmul_tn: result[r, c] (+)= sum_i lhs[i, r] * rhs[i, c]
//
// A workgroup of 16 x 16 invocations computes a 64 x 64 block of results, each invocation a
// 4 x 4 part of it in registers. The reduction advances in slices of DEPTH steps: the workgroup
// copies the block's DEPTH x 64 slice of each operand into workgroup memory (every invocation
// loads four floats of each), waits at a barrier, and every invocation then reads its operands
// from there. Each operand element is loaded from storage once per workgroup instead of once
// per invocation that needs it, which is what GPUs with fast workgroup memory and many
// invocations in flight need. On lavapipe, a CPU driver, it ran the autotune trial 7 to 14
// times slower than the subgroup variant (about 4 GFLOP/s), and the autotuner measures which one
// to use on each adapter.
// NOTE: written for GPUs but so far timed only on lavapipe. The 64 x 64 block and DEPTH 16 are
// common choices for GPUs, not values tuned on one.
//
// Every result is still summed by one invocation over the whole reduction in index order, so it
// does not depend on the dispatch geometry and no atomics are needed. Loads outside the
// operands read zero, which adds nothing to the sums, and stores outside the result are skipped.
// The operands are read one float at a time, so no alignment is required.

// Invocations along each side of the workgroup.
const SIDE: u32 = 16u;
// Result rows and columns of one workgroup: SIDE invocations with PART results each.
const BLOCK: u32 = 64u;
const PART: u32 = 4u;
// Reduction steps per slice held in workgroup memory.
const DEPTH: u32 = 16u;
// Vec4 slots of one staged slice: DEPTH steps of BLOCK / 4 quads.
// NOTE: the staging assumes DEPTH == SIDE == BLOCK / 4, so that the SIDE * SIDE invocations
// fill the slots one vec4 each. Changing one of them means changing the staging as well, and
// TILED_WORKGROUP_BYTES in src/kernels/matmul.rs.
const SLICE_QUADS: u32 = 256u;

const FORM_NN: u32 = 0u;
const FORM_NT: u32 = 1u;
const FORM_TN: u32 = 2u;

struct MatmulParams {
    rows: u32,
    cols: u32,
    inner: u32,
    lhs_stride: u32,
    lhs_offset: u32,
    rhs_stride: u32,
    rhs_offset: u32,
    out_stride: u32,
    out_offset: u32,
    accumulate: u32,
    has_bias: u32,
    // Unused here: this variant reads single floats whatever the alignment.
    vec4_loads: u32,
}

@group(0) @binding(0) var<uniform> params: MatmulParams;
@group(0) @binding(1) var<storage, read_write> result: array<f32>;
@group(0) @binding(2) var<storage, read> lhs: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> rhs: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

// Slice of each operand: slot step * (BLOCK / 4) + q holds four consecutive result rows (of lhs)
// or columns (of rhs) 4q..4q+3 of the block at one reduction step.
var<workgroup> lhs_slice: array<vec4<f32>, SLICE_QUADS>;
var<workgroup> rhs_slice: array<vec4<f32>, SLICE_QUADS>;

fn lhs_at(index: u32) -> f32 {
    return lhs[index >> 2u][index & 3u];
}

fn rhs_at(index: u32) -> f32 {
    return rhs[index >> 2u][index & 3u];
}

// lhs element of result row `row` at reduction step `step`, or 0 outside the operand.
fn lhs_value(form: u32, row: u32, step: u32) -> f32 {
    if (row >= params.rows || step >= params.inner) {
        return 0.0;
    }
    if (form == FORM_TN) {
        return lhs_at(step * params.lhs_stride + params.lhs_offset + row);
    }
    return lhs_at(row * params.lhs_stride + params.lhs_offset + step);
}

// rhs element of result column `col` at reduction step `step`, or 0 outside the operand.
fn rhs_value(form: u32, col: u32, step: u32) -> f32 {
    if (col >= params.cols || step >= params.inner) {
        return 0.0;
    }
    if (form == FORM_NT) {
        return rhs_at(col * params.rhs_stride + params.rhs_offset + step);
    }
    return rhs_at(step * params.rhs_stride + params.rhs_offset + col);
}

// Slot (step, quad) that invocation `index` fills. Where the operand is stored along the
// reduction (`along_steps`), neighbouring invocations take neighbouring steps, else neighbouring
// quads, so that neighbours read neighbouring addresses either way.
fn staging_slot(index: u32, along_steps: bool) -> vec2<u32> {
    if (along_steps) {
        return vec2<u32>(index % DEPTH, index / DEPTH);
    }
    return vec2<u32>(index / SIDE, index % SIDE);
}

fn product(form: u32, group: vec3<u32>, local: vec3<u32>, index: u32) {
    let row0 = group.y * BLOCK;
    let col0 = group.x * BLOCK;
    let lhs_slot = staging_slot(index, form != FORM_TN);
    let rhs_slot = staging_slot(index, form == FORM_NT);
    var acc: array<vec4<f32>, PART>;
    let slices = (params.inner + DEPTH - 1u) / DEPTH;
    for (var s = 0u; s < slices; s++) {
        let step0 = s * DEPTH;
        let lhs_step = step0 + lhs_slot.x;
        let lhs_row = row0 + lhs_slot.y * 4u;
        lhs_slice[lhs_slot.x * SIDE + lhs_slot.y] = vec4<f32>(
            lhs_value(form, lhs_row, lhs_step),
            lhs_value(form, lhs_row + 1u, lhs_step),
            lhs_value(form, lhs_row + 2u, lhs_step),
            lhs_value(form, lhs_row + 3u, lhs_step),
        );
        let rhs_step = step0 + rhs_slot.x;
        let rhs_col = col0 + rhs_slot.y * 4u;
        rhs_slice[rhs_slot.x * SIDE + rhs_slot.y] = vec4<f32>(
            rhs_value(form, rhs_col, rhs_step),
            rhs_value(form, rhs_col + 1u, rhs_step),
            rhs_value(form, rhs_col + 2u, rhs_step),
            rhs_value(form, rhs_col + 3u, rhs_step),
        );
        workgroupBarrier();
        for (var k = 0u; k < DEPTH; k++) {
            let a = lhs_slice[k * SIDE + local.y];
            let b = rhs_slice[k * SIDE + local.x];
            acc[0] = fma(vec4<f32>(a.x), b, acc[0]);
            acc[1] = fma(vec4<f32>(a.y), b, acc[1]);
            acc[2] = fma(vec4<f32>(a.z), b, acc[2]);
            acc[3] = fma(vec4<f32>(a.w), b, acc[3]);
        }
        workgroupBarrier();
    }

    let first_col = col0 + local.x * PART;
    for (var i = 0u; i < PART; i++) {
        let row = row0 + local.y * PART + i;
        if (row >= params.rows) {
            break;
        }
        for (var j = 0u; j < PART; j++) {
            let col = first_col + j;
            if (col >= params.cols) {
                break;
            }
            let index = row * params.out_stride + params.out_offset + col;
            var value = acc[i][j];
            if (params.has_bias == 1u) {
                value += bias[col];
            }
            if (params.accumulate == 1u) {
                value += result[index];
            }
            result[index] = value;
        }
    }
}

@compute @workgroup_size(SIDE, SIDE)
fn matmul_nn(@builtin(workgroup_id) group: vec3<u32>,
             @builtin(local_invocation_id) local: vec3<u32>,
             @builtin(local_invocation_index) index: u32) {
    product(FORM_NN, group, local, index);
}

@compute @workgroup_size(SIDE, SIDE)
fn matmul_nt(@builtin(workgroup_id) group: vec3<u32>,
             @builtin(local_invocation_id) local: vec3<u32>,
             @builtin(local_invocation_index) index: u32) {
    product(FORM_NT, group, local, index);
}

@compute @workgroup_size(SIDE, SIDE)
fn matmul_tn(@builtin(workgroup_id) group: vec3<u32>,
             @builtin(local_invocation_id) local: vec3<u32>,
             @builtin(local_invocation_index) index: u32) {
    product(FORM_TN, group, local, index);
}
