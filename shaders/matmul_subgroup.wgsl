// Matrix products for adapters with 8-lane subgroups (lavapipe): the three GEMM forms of
// shaders/matmul.wgsl, with the same parameters, bindings, operand addressing and meaning
//   matmul_nn: result[r, c] (+)= sum_i lhs[r, i] * rhs[i, c]   (+ bias[c])
//   matmul_nt: result[r, c] (+)= sum_i lhs[r, i] * rhs[c, i]   (+ bias[c])
//   matmul_tn: result[r, c] (+)= sum_i lhs[i, r] * rhs[i, c]
// (see the header of shaders/matmul.wgsl for how the launcher maps linear-layer operations onto
// them). It is a separate module because a module that uses subgroup built-ins fails to create
// on a device without the SUBGROUP feature.
//
// The launcher (src/kernels/matmul.rs) uses these entry points only when the subgroup size is
// exactly LANES and every operand row that is read starts on a 16-byte boundary, with vec4-sized
// lengths along rows: the `vec4_loads` condition of shaders/matmul.wgsl. `vec4_loads` is ignored
// here.
//
// Each invocation keeps a BLOCK_ROWS x BLOCK_COLS block of results in registers and sums every
// result over the whole reduction itself, in index order, so results are deterministic and
// independent of the dispatch geometry. The LANES invocations of a subgroup share their
// BLOCK_ROWS result rows and cover LANES neighbouring column blocks. The lhs values of the shared
// rows are loaded once per subgroup: each lane loads the values of BLOCK_ROWS / LANES rows and
// `subgroupBroadcast` hands them to the other lanes. On lavapipe every memory load is a scalar
// loop over the SIMD lanes while a broadcast is a register splat, so this removes 7/8 of the lhs
// loads; each invocation loads only its own BLOCK_COLS rhs columns.
//
// Every invocation of a subgroup runs the whole reduction, including invocations past the last
// block, because `subgroupBroadcast` needs all lanes. Such invocations and edge blocks clamp
// their load indices to the last valid row and column, and only the stores check bounds.
// NOTE: the grouping assumes that a subgroup is LANES consecutive invocations of the
// one-dimensional workgroup, as on lavapipe.
// NOTE: on lavapipe (Mesa 22.3, LLVM 15, 2 vCPUs) `shadertune bench kernels` measured 9-10
// GFLOP/s for all three forms on the GPT-2 small shapes, against 3-4 for shaders/matmul.wgsl.
// A 32 x 4 block ran slower (5-7). Faster layouts of this design may exist.

const WORKGROUP_SIZE: u32 = 64u;
// Invocations per subgroup that the broadcasts below assume.
const LANES: u32 = 8u;
// Result rows and columns per invocation. Lane L loads the lhs values of rows
// ROWS_PER_LANE * L .. ROWS_PER_LANE * (L + 1) of the block.
const BLOCK_ROWS: u32 = 32u;
const ROWS_PER_LANE: u32 = 4u;
const BLOCK_COLS: u32 = 8u;

// One invocation's results: lo[r] holds columns 0..3 of block row r, hi[r] columns 4..7.
struct Block {
    lo: array<vec4<f32>, BLOCK_ROWS>,
    hi: array<vec4<f32>, BLOCK_ROWS>,
}

// Field names and order as in shaders/matmul.wgsl and `MatmulParams` in the launcher.
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
    vec4_loads: u32,
}

@group(0) @binding(0) var<uniform> params: MatmulParams;
@group(0) @binding(1) var<storage, read_write> result: array<f32>; // (rows, out_stride)
@group(0) @binding(2) var<storage, read> lhs: array<vec4<f32>>;   // (rows, lhs_stride), or (inner, lhs_stride) for tn
@group(0) @binding(3) var<storage, read> rhs: array<vec4<f32>>;   // (inner, rhs_stride), or (cols, rhs_stride) for nt
@group(0) @binding(4) var<storage, read> bias: array<f32>;        // (cols), read when has_bias is 1

// The result block of one invocation and whether it lies inside the result.
struct Origin {
    row0: u32,
    col0: u32,
    inside: bool,
}

// Column blocks of one subgroup: LANES blocks of BLOCK_COLS columns.
fn group_cols() -> u32 {
    return BLOCK_COLS * LANES;
}

fn col_groups() -> u32 {
    return (params.cols + group_cols() - 1u) / group_cols();
}

// Invocation `flat` (over the 2-D grid that spreads 1-D work past 65535 workgroups per dimension)
// with subgroup lane `lane`. Subgroup g covers rows g / col_groups() * BLOCK_ROWS and column
// group g % col_groups(); invocations past the last subgroup repeat the last one's loads.
fn block_origin(gid: vec3<u32>, groups: vec3<u32>, lane: u32) -> Origin {
    let flat = gid.x + gid.y * groups.x * WORKGROUP_SIZE;
    let count = col_groups() * ((params.rows + BLOCK_ROWS - 1u) / BLOCK_ROWS);
    // The same for every lane of the subgroup, which keeps the block rows uniform there.
    let g = subgroupBroadcast(flat / LANES, 0u);
    let clamped = min(g, count - 1u);
    let row0 = clamped / col_groups() * BLOCK_ROWS;
    let col0 = clamped % col_groups() * group_cols() + lane * BLOCK_COLS;
    return Origin(row0, col0, g < count && col0 < params.cols);
}

fn clamped_row(row: u32) -> u32 {
    return min(row, params.rows - 1u);
}

fn clamped_col(col: u32) -> u32 {
    return min(col, params.cols - 1u);
}

// Quad index (float index / 4), within an rhs row, of the quad holding column `col` (clamped),
// for nn and tn.
fn col_quad(col: u32) -> u32 {
    return params.rhs_offset / 4u + clamped_col(col) / 4u;
}

// Four reduction steps of nn and nt. a<j> holds this lane's lhs row ROWS_PER_LANE * lane + j at
// the four steps, and b_lo[s] / b_hi[s] this invocation's columns 0..3 / 4..7 at step s. Lane
// L's values are broadcast in turn, and every block row gains its four products in step order.
fn four_steps(before: Block, a0: vec4<f32>, a1: vec4<f32>, a2: vec4<f32>, a3: vec4<f32>,
              b_lo: array<vec4<f32>, 4>, b_hi: array<vec4<f32>, 4>) -> Block {
    var acc = before;
    {
        let v0 = subgroupBroadcast(a0, 0u);
        let v1 = subgroupBroadcast(a1, 0u);
        let v2 = subgroupBroadcast(a2, 0u);
        let v3 = subgroupBroadcast(a3, 0u);
        acc.lo[0] = fma(vec4<f32>(v0[0]), b_lo[0], acc.lo[0]);
        acc.hi[0] = fma(vec4<f32>(v0[0]), b_hi[0], acc.hi[0]);
        acc.lo[0] = fma(vec4<f32>(v0[1]), b_lo[1], acc.lo[0]);
        acc.hi[0] = fma(vec4<f32>(v0[1]), b_hi[1], acc.hi[0]);
        acc.lo[0] = fma(vec4<f32>(v0[2]), b_lo[2], acc.lo[0]);
        acc.hi[0] = fma(vec4<f32>(v0[2]), b_hi[2], acc.hi[0]);
        acc.lo[0] = fma(vec4<f32>(v0[3]), b_lo[3], acc.lo[0]);
        acc.hi[0] = fma(vec4<f32>(v0[3]), b_hi[3], acc.hi[0]);
        acc.lo[1] = fma(vec4<f32>(v1[0]), b_lo[0], acc.lo[1]);
        acc.hi[1] = fma(vec4<f32>(v1[0]), b_hi[0], acc.hi[1]);
        acc.lo[1] = fma(vec4<f32>(v1[1]), b_lo[1], acc.lo[1]);
        acc.hi[1] = fma(vec4<f32>(v1[1]), b_hi[1], acc.hi[1]);
        acc.lo[1] = fma(vec4<f32>(v1[2]), b_lo[2], acc.lo[1]);
        acc.hi[1] = fma(vec4<f32>(v1[2]), b_hi[2], acc.hi[1]);
        acc.lo[1] = fma(vec4<f32>(v1[3]), b_lo[3], acc.lo[1]);
        acc.hi[1] = fma(vec4<f32>(v1[3]), b_hi[3], acc.hi[1]);
        acc.lo[2] = fma(vec4<f32>(v2[0]), b_lo[0], acc.lo[2]);
        acc.hi[2] = fma(vec4<f32>(v2[0]), b_hi[0], acc.hi[2]);
        acc.lo[2] = fma(vec4<f32>(v2[1]), b_lo[1], acc.lo[2]);
        acc.hi[2] = fma(vec4<f32>(v2[1]), b_hi[1], acc.hi[2]);
        acc.lo[2] = fma(vec4<f32>(v2[2]), b_lo[2], acc.lo[2]);
        acc.hi[2] = fma(vec4<f32>(v2[2]), b_hi[2], acc.hi[2]);
        acc.lo[2] = fma(vec4<f32>(v2[3]), b_lo[3], acc.lo[2]);
        acc.hi[2] = fma(vec4<f32>(v2[3]), b_hi[3], acc.hi[2]);
        acc.lo[3] = fma(vec4<f32>(v3[0]), b_lo[0], acc.lo[3]);
        acc.hi[3] = fma(vec4<f32>(v3[0]), b_hi[0], acc.hi[3]);
        acc.lo[3] = fma(vec4<f32>(v3[1]), b_lo[1], acc.lo[3]);
        acc.hi[3] = fma(vec4<f32>(v3[1]), b_hi[1], acc.hi[3]);
        acc.lo[3] = fma(vec4<f32>(v3[2]), b_lo[2], acc.lo[3]);
        acc.hi[3] = fma(vec4<f32>(v3[2]), b_hi[2], acc.hi[3]);
        acc.lo[3] = fma(vec4<f32>(v3[3]), b_lo[3], acc.lo[3]);
        acc.hi[3] = fma(vec4<f32>(v3[3]), b_hi[3], acc.hi[3]);
    }
    {
        let v0 = subgroupBroadcast(a0, 1u);
        let v1 = subgroupBroadcast(a1, 1u);
        let v2 = subgroupBroadcast(a2, 1u);
        let v3 = subgroupBroadcast(a3, 1u);
        acc.lo[4] = fma(vec4<f32>(v0[0]), b_lo[0], acc.lo[4]);
        acc.hi[4] = fma(vec4<f32>(v0[0]), b_hi[0], acc.hi[4]);
        acc.lo[4] = fma(vec4<f32>(v0[1]), b_lo[1], acc.lo[4]);
        acc.hi[4] = fma(vec4<f32>(v0[1]), b_hi[1], acc.hi[4]);
        acc.lo[4] = fma(vec4<f32>(v0[2]), b_lo[2], acc.lo[4]);
        acc.hi[4] = fma(vec4<f32>(v0[2]), b_hi[2], acc.hi[4]);
        acc.lo[4] = fma(vec4<f32>(v0[3]), b_lo[3], acc.lo[4]);
        acc.hi[4] = fma(vec4<f32>(v0[3]), b_hi[3], acc.hi[4]);
        acc.lo[5] = fma(vec4<f32>(v1[0]), b_lo[0], acc.lo[5]);
        acc.hi[5] = fma(vec4<f32>(v1[0]), b_hi[0], acc.hi[5]);
        acc.lo[5] = fma(vec4<f32>(v1[1]), b_lo[1], acc.lo[5]);
        acc.hi[5] = fma(vec4<f32>(v1[1]), b_hi[1], acc.hi[5]);
        acc.lo[5] = fma(vec4<f32>(v1[2]), b_lo[2], acc.lo[5]);
        acc.hi[5] = fma(vec4<f32>(v1[2]), b_hi[2], acc.hi[5]);
        acc.lo[5] = fma(vec4<f32>(v1[3]), b_lo[3], acc.lo[5]);
        acc.hi[5] = fma(vec4<f32>(v1[3]), b_hi[3], acc.hi[5]);
        acc.lo[6] = fma(vec4<f32>(v2[0]), b_lo[0], acc.lo[6]);
        acc.hi[6] = fma(vec4<f32>(v2[0]), b_hi[0], acc.hi[6]);
        acc.lo[6] = fma(vec4<f32>(v2[1]), b_lo[1], acc.lo[6]);
        acc.hi[6] = fma(vec4<f32>(v2[1]), b_hi[1], acc.hi[6]);
        acc.lo[6] = fma(vec4<f32>(v2[2]), b_lo[2], acc.lo[6]);
        acc.hi[6] = fma(vec4<f32>(v2[2]), b_hi[2], acc.hi[6]);
        acc.lo[6] = fma(vec4<f32>(v2[3]), b_lo[3], acc.lo[6]);
        acc.hi[6] = fma(vec4<f32>(v2[3]), b_hi[3], acc.hi[6]);
        acc.lo[7] = fma(vec4<f32>(v3[0]), b_lo[0], acc.lo[7]);
        acc.hi[7] = fma(vec4<f32>(v3[0]), b_hi[0], acc.hi[7]);
        acc.lo[7] = fma(vec4<f32>(v3[1]), b_lo[1], acc.lo[7]);
        acc.hi[7] = fma(vec4<f32>(v3[1]), b_hi[1], acc.hi[7]);
        acc.lo[7] = fma(vec4<f32>(v3[2]), b_lo[2], acc.lo[7]);
        acc.hi[7] = fma(vec4<f32>(v3[2]), b_hi[2], acc.hi[7]);
        acc.lo[7] = fma(vec4<f32>(v3[3]), b_lo[3], acc.lo[7]);
        acc.hi[7] = fma(vec4<f32>(v3[3]), b_hi[3], acc.hi[7]);
    }
    {
        let v0 = subgroupBroadcast(a0, 2u);
        let v1 = subgroupBroadcast(a1, 2u);
        let v2 = subgroupBroadcast(a2, 2u);
        let v3 = subgroupBroadcast(a3, 2u);
        acc.lo[8] = fma(vec4<f32>(v0[0]), b_lo[0], acc.lo[8]);
        acc.hi[8] = fma(vec4<f32>(v0[0]), b_hi[0], acc.hi[8]);
        acc.lo[8] = fma(vec4<f32>(v0[1]), b_lo[1], acc.lo[8]);
        acc.hi[8] = fma(vec4<f32>(v0[1]), b_hi[1], acc.hi[8]);
        acc.lo[8] = fma(vec4<f32>(v0[2]), b_lo[2], acc.lo[8]);
        acc.hi[8] = fma(vec4<f32>(v0[2]), b_hi[2], acc.hi[8]);
        acc.lo[8] = fma(vec4<f32>(v0[3]), b_lo[3], acc.lo[8]);
        acc.hi[8] = fma(vec4<f32>(v0[3]), b_hi[3], acc.hi[8]);
        acc.lo[9] = fma(vec4<f32>(v1[0]), b_lo[0], acc.lo[9]);
        acc.hi[9] = fma(vec4<f32>(v1[0]), b_hi[0], acc.hi[9]);
        acc.lo[9] = fma(vec4<f32>(v1[1]), b_lo[1], acc.lo[9]);
        acc.hi[9] = fma(vec4<f32>(v1[1]), b_hi[1], acc.hi[9]);
        acc.lo[9] = fma(vec4<f32>(v1[2]), b_lo[2], acc.lo[9]);
        acc.hi[9] = fma(vec4<f32>(v1[2]), b_hi[2], acc.hi[9]);
        acc.lo[9] = fma(vec4<f32>(v1[3]), b_lo[3], acc.lo[9]);
        acc.hi[9] = fma(vec4<f32>(v1[3]), b_hi[3], acc.hi[9]);
        acc.lo[10] = fma(vec4<f32>(v2[0]), b_lo[0], acc.lo[10]);
        acc.hi[10] = fma(vec4<f32>(v2[0]), b_hi[0], acc.hi[10]);
        acc.lo[10] = fma(vec4<f32>(v2[1]), b_lo[1], acc.lo[10]);
        acc.hi[10] = fma(vec4<f32>(v2[1]), b_hi[1], acc.hi[10]);
        acc.lo[10] = fma(vec4<f32>(v2[2]), b_lo[2], acc.lo[10]);
        acc.hi[10] = fma(vec4<f32>(v2[2]), b_hi[2], acc.hi[10]);
        acc.lo[10] = fma(vec4<f32>(v2[3]), b_lo[3], acc.lo[10]);
        acc.hi[10] = fma(vec4<f32>(v2[3]), b_hi[3], acc.hi[10]);
        acc.lo[11] = fma(vec4<f32>(v3[0]), b_lo[0], acc.lo[11]);
        acc.hi[11] = fma(vec4<f32>(v3[0]), b_hi[0], acc.hi[11]);
        acc.lo[11] = fma(vec4<f32>(v3[1]), b_lo[1], acc.lo[11]);
        acc.hi[11] = fma(vec4<f32>(v3[1]), b_hi[1], acc.hi[11]);
        acc.lo[11] = fma(vec4<f32>(v3[2]), b_lo[2], acc.lo[11]);
        acc.hi[11] = fma(vec4<f32>(v3[2]), b_hi[2], acc.hi[11]);
        acc.lo[11] = fma(vec4<f32>(v3[3]), b_lo[3], acc.lo[11]);
        acc.hi[11] = fma(vec4<f32>(v3[3]), b_hi[3], acc.hi[11]);
    }
    {
        let v0 = subgroupBroadcast(a0, 3u);
        let v1 = subgroupBroadcast(a1, 3u);
        let v2 = subgroupBroadcast(a2, 3u);
        let v3 = subgroupBroadcast(a3, 3u);
        acc.lo[12] = fma(vec4<f32>(v0[0]), b_lo[0], acc.lo[12]);
        acc.hi[12] = fma(vec4<f32>(v0[0]), b_hi[0], acc.hi[12]);
        acc.lo[12] = fma(vec4<f32>(v0[1]), b_lo[1], acc.lo[12]);
        acc.hi[12] = fma(vec4<f32>(v0[1]), b_hi[1], acc.hi[12]);
        acc.lo[12] = fma(vec4<f32>(v0[2]), b_lo[2], acc.lo[12]);
        acc.hi[12] = fma(vec4<f32>(v0[2]), b_hi[2], acc.hi[12]);
        acc.lo[12] = fma(vec4<f32>(v0[3]), b_lo[3], acc.lo[12]);
        acc.hi[12] = fma(vec4<f32>(v0[3]), b_hi[3], acc.hi[12]);
        acc.lo[13] = fma(vec4<f32>(v1[0]), b_lo[0], acc.lo[13]);
        acc.hi[13] = fma(vec4<f32>(v1[0]), b_hi[0], acc.hi[13]);
        acc.lo[13] = fma(vec4<f32>(v1[1]), b_lo[1], acc.lo[13]);
        acc.hi[13] = fma(vec4<f32>(v1[1]), b_hi[1], acc.hi[13]);
        acc.lo[13] = fma(vec4<f32>(v1[2]), b_lo[2], acc.lo[13]);
        acc.hi[13] = fma(vec4<f32>(v1[2]), b_hi[2], acc.hi[13]);
        acc.lo[13] = fma(vec4<f32>(v1[3]), b_lo[3], acc.lo[13]);
        acc.hi[13] = fma(vec4<f32>(v1[3]), b_hi[3], acc.hi[13]);
        acc.lo[14] = fma(vec4<f32>(v2[0]), b_lo[0], acc.lo[14]);
        acc.hi[14] = fma(vec4<f32>(v2[0]), b_hi[0], acc.hi[14]);
        acc.lo[14] = fma(vec4<f32>(v2[1]), b_lo[1], acc.lo[14]);
        acc.hi[14] = fma(vec4<f32>(v2[1]), b_hi[1], acc.hi[14]);
        acc.lo[14] = fma(vec4<f32>(v2[2]), b_lo[2], acc.lo[14]);
        acc.hi[14] = fma(vec4<f32>(v2[2]), b_hi[2], acc.hi[14]);
        acc.lo[14] = fma(vec4<f32>(v2[3]), b_lo[3], acc.lo[14]);
        acc.hi[14] = fma(vec4<f32>(v2[3]), b_hi[3], acc.hi[14]);
        acc.lo[15] = fma(vec4<f32>(v3[0]), b_lo[0], acc.lo[15]);
        acc.hi[15] = fma(vec4<f32>(v3[0]), b_hi[0], acc.hi[15]);
        acc.lo[15] = fma(vec4<f32>(v3[1]), b_lo[1], acc.lo[15]);
        acc.hi[15] = fma(vec4<f32>(v3[1]), b_hi[1], acc.hi[15]);
        acc.lo[15] = fma(vec4<f32>(v3[2]), b_lo[2], acc.lo[15]);
        acc.hi[15] = fma(vec4<f32>(v3[2]), b_hi[2], acc.hi[15]);
        acc.lo[15] = fma(vec4<f32>(v3[3]), b_lo[3], acc.lo[15]);
        acc.hi[15] = fma(vec4<f32>(v3[3]), b_hi[3], acc.hi[15]);
    }
    {
        let v0 = subgroupBroadcast(a0, 4u);
        let v1 = subgroupBroadcast(a1, 4u);
        let v2 = subgroupBroadcast(a2, 4u);
        let v3 = subgroupBroadcast(a3, 4u);
        acc.lo[16] = fma(vec4<f32>(v0[0]), b_lo[0], acc.lo[16]);
        acc.hi[16] = fma(vec4<f32>(v0[0]), b_hi[0], acc.hi[16]);
        acc.lo[16] = fma(vec4<f32>(v0[1]), b_lo[1], acc.lo[16]);
        acc.hi[16] = fma(vec4<f32>(v0[1]), b_hi[1], acc.hi[16]);
        acc.lo[16] = fma(vec4<f32>(v0[2]), b_lo[2], acc.lo[16]);
        acc.hi[16] = fma(vec4<f32>(v0[2]), b_hi[2], acc.hi[16]);
        acc.lo[16] = fma(vec4<f32>(v0[3]), b_lo[3], acc.lo[16]);
        acc.hi[16] = fma(vec4<f32>(v0[3]), b_hi[3], acc.hi[16]);
        acc.lo[17] = fma(vec4<f32>(v1[0]), b_lo[0], acc.lo[17]);
        acc.hi[17] = fma(vec4<f32>(v1[0]), b_hi[0], acc.hi[17]);
        acc.lo[17] = fma(vec4<f32>(v1[1]), b_lo[1], acc.lo[17]);
        acc.hi[17] = fma(vec4<f32>(v1[1]), b_hi[1], acc.hi[17]);
        acc.lo[17] = fma(vec4<f32>(v1[2]), b_lo[2], acc.lo[17]);
        acc.hi[17] = fma(vec4<f32>(v1[2]), b_hi[2], acc.hi[17]);
        acc.lo[17] = fma(vec4<f32>(v1[3]), b_lo[3], acc.lo[17]);
        acc.hi[17] = fma(vec4<f32>(v1[3]), b_hi[3], acc.hi[17]);
        acc.lo[18] = fma(vec4<f32>(v2[0]), b_lo[0], acc.lo[18]);
        acc.hi[18] = fma(vec4<f32>(v2[0]), b_hi[0], acc.hi[18]);
        acc.lo[18] = fma(vec4<f32>(v2[1]), b_lo[1], acc.lo[18]);
        acc.hi[18] = fma(vec4<f32>(v2[1]), b_hi[1], acc.hi[18]);
        acc.lo[18] = fma(vec4<f32>(v2[2]), b_lo[2], acc.lo[18]);
        acc.hi[18] = fma(vec4<f32>(v2[2]), b_hi[2], acc.hi[18]);
        acc.lo[18] = fma(vec4<f32>(v2[3]), b_lo[3], acc.lo[18]);
        acc.hi[18] = fma(vec4<f32>(v2[3]), b_hi[3], acc.hi[18]);
        acc.lo[19] = fma(vec4<f32>(v3[0]), b_lo[0], acc.lo[19]);
        acc.hi[19] = fma(vec4<f32>(v3[0]), b_hi[0], acc.hi[19]);
        acc.lo[19] = fma(vec4<f32>(v3[1]), b_lo[1], acc.lo[19]);
        acc.hi[19] = fma(vec4<f32>(v3[1]), b_hi[1], acc.hi[19]);
        acc.lo[19] = fma(vec4<f32>(v3[2]), b_lo[2], acc.lo[19]);
        acc.hi[19] = fma(vec4<f32>(v3[2]), b_hi[2], acc.hi[19]);
        acc.lo[19] = fma(vec4<f32>(v3[3]), b_lo[3], acc.lo[19]);
        acc.hi[19] = fma(vec4<f32>(v3[3]), b_hi[3], acc.hi[19]);
    }
    {
        let v0 = subgroupBroadcast(a0, 5u);
        let v1 = subgroupBroadcast(a1, 5u);
        let v2 = subgroupBroadcast(a2, 5u);
        let v3 = subgroupBroadcast(a3, 5u);
        acc.lo[20] = fma(vec4<f32>(v0[0]), b_lo[0], acc.lo[20]);
        acc.hi[20] = fma(vec4<f32>(v0[0]), b_hi[0], acc.hi[20]);
        acc.lo[20] = fma(vec4<f32>(v0[1]), b_lo[1], acc.lo[20]);
        acc.hi[20] = fma(vec4<f32>(v0[1]), b_hi[1], acc.hi[20]);
        acc.lo[20] = fma(vec4<f32>(v0[2]), b_lo[2], acc.lo[20]);
        acc.hi[20] = fma(vec4<f32>(v0[2]), b_hi[2], acc.hi[20]);
        acc.lo[20] = fma(vec4<f32>(v0[3]), b_lo[3], acc.lo[20]);
        acc.hi[20] = fma(vec4<f32>(v0[3]), b_hi[3], acc.hi[20]);
        acc.lo[21] = fma(vec4<f32>(v1[0]), b_lo[0], acc.lo[21]);
        acc.hi[21] = fma(vec4<f32>(v1[0]), b_hi[0], acc.hi[21]);
        acc.lo[21] = fma(vec4<f32>(v1[1]), b_lo[1], acc.lo[21]);
        acc.hi[21] = fma(vec4<f32>(v1[1]), b_hi[1], acc.hi[21]);
        acc.lo[21] = fma(vec4<f32>(v1[2]), b_lo[2], acc.lo[21]);
        acc.hi[21] = fma(vec4<f32>(v1[2]), b_hi[2], acc.hi[21]);
        acc.lo[21] = fma(vec4<f32>(v1[3]), b_lo[3], acc.lo[21]);
        acc.hi[21] = fma(vec4<f32>(v1[3]), b_hi[3], acc.hi[21]);
        acc.lo[22] = fma(vec4<f32>(v2[0]), b_lo[0], acc.lo[22]);
        acc.hi[22] = fma(vec4<f32>(v2[0]), b_hi[0], acc.hi[22]);
        acc.lo[22] = fma(vec4<f32>(v2[1]), b_lo[1], acc.lo[22]);
        acc.hi[22] = fma(vec4<f32>(v2[1]), b_hi[1], acc.hi[22]);
        acc.lo[22] = fma(vec4<f32>(v2[2]), b_lo[2], acc.lo[22]);
        acc.hi[22] = fma(vec4<f32>(v2[2]), b_hi[2], acc.hi[22]);
        acc.lo[22] = fma(vec4<f32>(v2[3]), b_lo[3], acc.lo[22]);
        acc.hi[22] = fma(vec4<f32>(v2[3]), b_hi[3], acc.hi[22]);
        acc.lo[23] = fma(vec4<f32>(v3[0]), b_lo[0], acc.lo[23]);
        acc.hi[23] = fma(vec4<f32>(v3[0]), b_hi[0], acc.hi[23]);
        acc.lo[23] = fma(vec4<f32>(v3[1]), b_lo[1], acc.lo[23]);
        acc.hi[23] = fma(vec4<f32>(v3[1]), b_hi[1], acc.hi[23]);
        acc.lo[23] = fma(vec4<f32>(v3[2]), b_lo[2], acc.lo[23]);
        acc.hi[23] = fma(vec4<f32>(v3[2]), b_hi[2], acc.hi[23]);
        acc.lo[23] = fma(vec4<f32>(v3[3]), b_lo[3], acc.lo[23]);
        acc.hi[23] = fma(vec4<f32>(v3[3]), b_hi[3], acc.hi[23]);
    }
    {
        let v0 = subgroupBroadcast(a0, 6u);
        let v1 = subgroupBroadcast(a1, 6u);
        let v2 = subgroupBroadcast(a2, 6u);
        let v3 = subgroupBroadcast(a3, 6u);
        acc.lo[24] = fma(vec4<f32>(v0[0]), b_lo[0], acc.lo[24]);
        acc.hi[24] = fma(vec4<f32>(v0[0]), b_hi[0], acc.hi[24]);
        acc.lo[24] = fma(vec4<f32>(v0[1]), b_lo[1], acc.lo[24]);
        acc.hi[24] = fma(vec4<f32>(v0[1]), b_hi[1], acc.hi[24]);
        acc.lo[24] = fma(vec4<f32>(v0[2]), b_lo[2], acc.lo[24]);
        acc.hi[24] = fma(vec4<f32>(v0[2]), b_hi[2], acc.hi[24]);
        acc.lo[24] = fma(vec4<f32>(v0[3]), b_lo[3], acc.lo[24]);
        acc.hi[24] = fma(vec4<f32>(v0[3]), b_hi[3], acc.hi[24]);
        acc.lo[25] = fma(vec4<f32>(v1[0]), b_lo[0], acc.lo[25]);
        acc.hi[25] = fma(vec4<f32>(v1[0]), b_hi[0], acc.hi[25]);
        acc.lo[25] = fma(vec4<f32>(v1[1]), b_lo[1], acc.lo[25]);
        acc.hi[25] = fma(vec4<f32>(v1[1]), b_hi[1], acc.hi[25]);
        acc.lo[25] = fma(vec4<f32>(v1[2]), b_lo[2], acc.lo[25]);
        acc.hi[25] = fma(vec4<f32>(v1[2]), b_hi[2], acc.hi[25]);
        acc.lo[25] = fma(vec4<f32>(v1[3]), b_lo[3], acc.lo[25]);
        acc.hi[25] = fma(vec4<f32>(v1[3]), b_hi[3], acc.hi[25]);
        acc.lo[26] = fma(vec4<f32>(v2[0]), b_lo[0], acc.lo[26]);
        acc.hi[26] = fma(vec4<f32>(v2[0]), b_hi[0], acc.hi[26]);
        acc.lo[26] = fma(vec4<f32>(v2[1]), b_lo[1], acc.lo[26]);
        acc.hi[26] = fma(vec4<f32>(v2[1]), b_hi[1], acc.hi[26]);
        acc.lo[26] = fma(vec4<f32>(v2[2]), b_lo[2], acc.lo[26]);
        acc.hi[26] = fma(vec4<f32>(v2[2]), b_hi[2], acc.hi[26]);
        acc.lo[26] = fma(vec4<f32>(v2[3]), b_lo[3], acc.lo[26]);
        acc.hi[26] = fma(vec4<f32>(v2[3]), b_hi[3], acc.hi[26]);
        acc.lo[27] = fma(vec4<f32>(v3[0]), b_lo[0], acc.lo[27]);
        acc.hi[27] = fma(vec4<f32>(v3[0]), b_hi[0], acc.hi[27]);
        acc.lo[27] = fma(vec4<f32>(v3[1]), b_lo[1], acc.lo[27]);
        acc.hi[27] = fma(vec4<f32>(v3[1]), b_hi[1], acc.hi[27]);
        acc.lo[27] = fma(vec4<f32>(v3[2]), b_lo[2], acc.lo[27]);
        acc.hi[27] = fma(vec4<f32>(v3[2]), b_hi[2], acc.hi[27]);
        acc.lo[27] = fma(vec4<f32>(v3[3]), b_lo[3], acc.lo[27]);
        acc.hi[27] = fma(vec4<f32>(v3[3]), b_hi[3], acc.hi[27]);
    }
    {
        let v0 = subgroupBroadcast(a0, 7u);
        let v1 = subgroupBroadcast(a1, 7u);
        let v2 = subgroupBroadcast(a2, 7u);
        let v3 = subgroupBroadcast(a3, 7u);
        acc.lo[28] = fma(vec4<f32>(v0[0]), b_lo[0], acc.lo[28]);
        acc.hi[28] = fma(vec4<f32>(v0[0]), b_hi[0], acc.hi[28]);
        acc.lo[28] = fma(vec4<f32>(v0[1]), b_lo[1], acc.lo[28]);
        acc.hi[28] = fma(vec4<f32>(v0[1]), b_hi[1], acc.hi[28]);
        acc.lo[28] = fma(vec4<f32>(v0[2]), b_lo[2], acc.lo[28]);
        acc.hi[28] = fma(vec4<f32>(v0[2]), b_hi[2], acc.hi[28]);
        acc.lo[28] = fma(vec4<f32>(v0[3]), b_lo[3], acc.lo[28]);
        acc.hi[28] = fma(vec4<f32>(v0[3]), b_hi[3], acc.hi[28]);
        acc.lo[29] = fma(vec4<f32>(v1[0]), b_lo[0], acc.lo[29]);
        acc.hi[29] = fma(vec4<f32>(v1[0]), b_hi[0], acc.hi[29]);
        acc.lo[29] = fma(vec4<f32>(v1[1]), b_lo[1], acc.lo[29]);
        acc.hi[29] = fma(vec4<f32>(v1[1]), b_hi[1], acc.hi[29]);
        acc.lo[29] = fma(vec4<f32>(v1[2]), b_lo[2], acc.lo[29]);
        acc.hi[29] = fma(vec4<f32>(v1[2]), b_hi[2], acc.hi[29]);
        acc.lo[29] = fma(vec4<f32>(v1[3]), b_lo[3], acc.lo[29]);
        acc.hi[29] = fma(vec4<f32>(v1[3]), b_hi[3], acc.hi[29]);
        acc.lo[30] = fma(vec4<f32>(v2[0]), b_lo[0], acc.lo[30]);
        acc.hi[30] = fma(vec4<f32>(v2[0]), b_hi[0], acc.hi[30]);
        acc.lo[30] = fma(vec4<f32>(v2[1]), b_lo[1], acc.lo[30]);
        acc.hi[30] = fma(vec4<f32>(v2[1]), b_hi[1], acc.hi[30]);
        acc.lo[30] = fma(vec4<f32>(v2[2]), b_lo[2], acc.lo[30]);
        acc.hi[30] = fma(vec4<f32>(v2[2]), b_hi[2], acc.hi[30]);
        acc.lo[30] = fma(vec4<f32>(v2[3]), b_lo[3], acc.lo[30]);
        acc.hi[30] = fma(vec4<f32>(v2[3]), b_hi[3], acc.hi[30]);
        acc.lo[31] = fma(vec4<f32>(v3[0]), b_lo[0], acc.lo[31]);
        acc.hi[31] = fma(vec4<f32>(v3[0]), b_hi[0], acc.hi[31]);
        acc.lo[31] = fma(vec4<f32>(v3[1]), b_lo[1], acc.lo[31]);
        acc.hi[31] = fma(vec4<f32>(v3[1]), b_hi[1], acc.hi[31]);
        acc.lo[31] = fma(vec4<f32>(v3[2]), b_lo[2], acc.lo[31]);
        acc.hi[31] = fma(vec4<f32>(v3[2]), b_hi[2], acc.hi[31]);
        acc.lo[31] = fma(vec4<f32>(v3[3]), b_lo[3], acc.lo[31]);
        acc.hi[31] = fma(vec4<f32>(v3[3]), b_hi[3], acc.hi[31]);
    }
    return acc;
}

// One reduction step of tn. `a` holds this lane's lhs values of block rows
// ROWS_PER_LANE * lane .. ROWS_PER_LANE * (lane + 1) at this step, b_lo / b_hi this
// invocation's columns 0..3 / 4..7.
fn one_step(before: Block, a: vec4<f32>, b_lo: vec4<f32>, b_hi: vec4<f32>) -> Block {
    var acc = before;
    {
        let v = subgroupBroadcast(a, 0u);
        acc.lo[0] = fma(vec4<f32>(v[0]), b_lo, acc.lo[0]);
        acc.hi[0] = fma(vec4<f32>(v[0]), b_hi, acc.hi[0]);
        acc.lo[1] = fma(vec4<f32>(v[1]), b_lo, acc.lo[1]);
        acc.hi[1] = fma(vec4<f32>(v[1]), b_hi, acc.hi[1]);
        acc.lo[2] = fma(vec4<f32>(v[2]), b_lo, acc.lo[2]);
        acc.hi[2] = fma(vec4<f32>(v[2]), b_hi, acc.hi[2]);
        acc.lo[3] = fma(vec4<f32>(v[3]), b_lo, acc.lo[3]);
        acc.hi[3] = fma(vec4<f32>(v[3]), b_hi, acc.hi[3]);
    }
    {
        let v = subgroupBroadcast(a, 1u);
        acc.lo[4] = fma(vec4<f32>(v[0]), b_lo, acc.lo[4]);
        acc.hi[4] = fma(vec4<f32>(v[0]), b_hi, acc.hi[4]);
        acc.lo[5] = fma(vec4<f32>(v[1]), b_lo, acc.lo[5]);
        acc.hi[5] = fma(vec4<f32>(v[1]), b_hi, acc.hi[5]);
        acc.lo[6] = fma(vec4<f32>(v[2]), b_lo, acc.lo[6]);
        acc.hi[6] = fma(vec4<f32>(v[2]), b_hi, acc.hi[6]);
        acc.lo[7] = fma(vec4<f32>(v[3]), b_lo, acc.lo[7]);
        acc.hi[7] = fma(vec4<f32>(v[3]), b_hi, acc.hi[7]);
    }
    {
        let v = subgroupBroadcast(a, 2u);
        acc.lo[8] = fma(vec4<f32>(v[0]), b_lo, acc.lo[8]);
        acc.hi[8] = fma(vec4<f32>(v[0]), b_hi, acc.hi[8]);
        acc.lo[9] = fma(vec4<f32>(v[1]), b_lo, acc.lo[9]);
        acc.hi[9] = fma(vec4<f32>(v[1]), b_hi, acc.hi[9]);
        acc.lo[10] = fma(vec4<f32>(v[2]), b_lo, acc.lo[10]);
        acc.hi[10] = fma(vec4<f32>(v[2]), b_hi, acc.hi[10]);
        acc.lo[11] = fma(vec4<f32>(v[3]), b_lo, acc.lo[11]);
        acc.hi[11] = fma(vec4<f32>(v[3]), b_hi, acc.hi[11]);
    }
    {
        let v = subgroupBroadcast(a, 3u);
        acc.lo[12] = fma(vec4<f32>(v[0]), b_lo, acc.lo[12]);
        acc.hi[12] = fma(vec4<f32>(v[0]), b_hi, acc.hi[12]);
        acc.lo[13] = fma(vec4<f32>(v[1]), b_lo, acc.lo[13]);
        acc.hi[13] = fma(vec4<f32>(v[1]), b_hi, acc.hi[13]);
        acc.lo[14] = fma(vec4<f32>(v[2]), b_lo, acc.lo[14]);
        acc.hi[14] = fma(vec4<f32>(v[2]), b_hi, acc.hi[14]);
        acc.lo[15] = fma(vec4<f32>(v[3]), b_lo, acc.lo[15]);
        acc.hi[15] = fma(vec4<f32>(v[3]), b_hi, acc.hi[15]);
    }
    {
        let v = subgroupBroadcast(a, 4u);
        acc.lo[16] = fma(vec4<f32>(v[0]), b_lo, acc.lo[16]);
        acc.hi[16] = fma(vec4<f32>(v[0]), b_hi, acc.hi[16]);
        acc.lo[17] = fma(vec4<f32>(v[1]), b_lo, acc.lo[17]);
        acc.hi[17] = fma(vec4<f32>(v[1]), b_hi, acc.hi[17]);
        acc.lo[18] = fma(vec4<f32>(v[2]), b_lo, acc.lo[18]);
        acc.hi[18] = fma(vec4<f32>(v[2]), b_hi, acc.hi[18]);
        acc.lo[19] = fma(vec4<f32>(v[3]), b_lo, acc.lo[19]);
        acc.hi[19] = fma(vec4<f32>(v[3]), b_hi, acc.hi[19]);
    }
    {
        let v = subgroupBroadcast(a, 5u);
        acc.lo[20] = fma(vec4<f32>(v[0]), b_lo, acc.lo[20]);
        acc.hi[20] = fma(vec4<f32>(v[0]), b_hi, acc.hi[20]);
        acc.lo[21] = fma(vec4<f32>(v[1]), b_lo, acc.lo[21]);
        acc.hi[21] = fma(vec4<f32>(v[1]), b_hi, acc.hi[21]);
        acc.lo[22] = fma(vec4<f32>(v[2]), b_lo, acc.lo[22]);
        acc.hi[22] = fma(vec4<f32>(v[2]), b_hi, acc.hi[22]);
        acc.lo[23] = fma(vec4<f32>(v[3]), b_lo, acc.lo[23]);
        acc.hi[23] = fma(vec4<f32>(v[3]), b_hi, acc.hi[23]);
    }
    {
        let v = subgroupBroadcast(a, 6u);
        acc.lo[24] = fma(vec4<f32>(v[0]), b_lo, acc.lo[24]);
        acc.hi[24] = fma(vec4<f32>(v[0]), b_hi, acc.hi[24]);
        acc.lo[25] = fma(vec4<f32>(v[1]), b_lo, acc.lo[25]);
        acc.hi[25] = fma(vec4<f32>(v[1]), b_hi, acc.hi[25]);
        acc.lo[26] = fma(vec4<f32>(v[2]), b_lo, acc.lo[26]);
        acc.hi[26] = fma(vec4<f32>(v[2]), b_hi, acc.hi[26]);
        acc.lo[27] = fma(vec4<f32>(v[3]), b_lo, acc.lo[27]);
        acc.hi[27] = fma(vec4<f32>(v[3]), b_hi, acc.hi[27]);
    }
    {
        let v = subgroupBroadcast(a, 7u);
        acc.lo[28] = fma(vec4<f32>(v[0]), b_lo, acc.lo[28]);
        acc.hi[28] = fma(vec4<f32>(v[0]), b_hi, acc.hi[28]);
        acc.lo[29] = fma(vec4<f32>(v[1]), b_lo, acc.lo[29]);
        acc.hi[29] = fma(vec4<f32>(v[1]), b_hi, acc.hi[29]);
        acc.lo[30] = fma(vec4<f32>(v[2]), b_lo, acc.lo[30]);
        acc.hi[30] = fma(vec4<f32>(v[2]), b_hi, acc.hi[30]);
        acc.lo[31] = fma(vec4<f32>(v[3]), b_lo, acc.lo[31]);
        acc.hi[31] = fma(vec4<f32>(v[3]), b_hi, acc.hi[31]);
    }
    return acc;
}

// Quad index of the start of lhs row (block row ROWS_PER_LANE * lane + j), clamped, for nn and nt.
fn lhs_row_quad(origin: Origin, lane: u32, j: u32) -> u32 {
    let row = clamped_row(origin.row0 + lane * ROWS_PER_LANE + j);
    return (row * params.lhs_stride + params.lhs_offset) / 4u;
}

// bias[col0 + c] for the block's columns c (clamped; columns past the last are never stored), as
// columns 0..3 and 4..7, or zeros when has_bias is 0.
fn block_bias(origin: Origin) -> array<vec4<f32>, 2> {
    var quads: array<vec4<f32>, 2>;
    if (params.has_bias == 1u) {
        for (var c = 0u; c < BLOCK_COLS; c++) {
            quads[c / 4u][c % 4u] = bias[clamped_col(origin.col0 + c)];
        }
    }
    return quads;
}

// Writes (or adds) the in-bounds part of block row `r`: `lo` and `hi` hold its columns 0..3
// and 4..7, and offsets[0] / offsets[1] are added to them.
fn store_row(origin: Origin, offsets: array<vec4<f32>, 2>, r: u32, lo: vec4<f32>, hi: vec4<f32>) {
    let row = origin.row0 + r;
    if (!origin.inside || row >= params.rows) {
        return;
    }
    let values = array<vec4<f32>, 2>(lo + offsets[0], hi + offsets[1]);
    for (var c = 0u; c < BLOCK_COLS; c++) {
        let col = origin.col0 + c;
        if (col >= params.cols) {
            break;
        }
        let index = row * params.out_stride + params.out_offset + col;
        var value = values[c / 4u][c % 4u];
        if (params.accumulate == 1u) {
            value += result[index];
        }
        result[index] = value;
    }
}

// Stores every row of the block. The rows are written out rather than looped over, so that
// `acc` is indexed only by constants: one index computed at run time can make a compiler keep the
// whole block in memory instead of registers.
fn store_block(acc: Block, offsets: array<vec4<f32>, 2>, origin: Origin) {
    store_row(origin, offsets, 0u, acc.lo[0], acc.hi[0]);
    store_row(origin, offsets, 1u, acc.lo[1], acc.hi[1]);
    store_row(origin, offsets, 2u, acc.lo[2], acc.hi[2]);
    store_row(origin, offsets, 3u, acc.lo[3], acc.hi[3]);
    store_row(origin, offsets, 4u, acc.lo[4], acc.hi[4]);
    store_row(origin, offsets, 5u, acc.lo[5], acc.hi[5]);
    store_row(origin, offsets, 6u, acc.lo[6], acc.hi[6]);
    store_row(origin, offsets, 7u, acc.lo[7], acc.hi[7]);
    store_row(origin, offsets, 8u, acc.lo[8], acc.hi[8]);
    store_row(origin, offsets, 9u, acc.lo[9], acc.hi[9]);
    store_row(origin, offsets, 10u, acc.lo[10], acc.hi[10]);
    store_row(origin, offsets, 11u, acc.lo[11], acc.hi[11]);
    store_row(origin, offsets, 12u, acc.lo[12], acc.hi[12]);
    store_row(origin, offsets, 13u, acc.lo[13], acc.hi[13]);
    store_row(origin, offsets, 14u, acc.lo[14], acc.hi[14]);
    store_row(origin, offsets, 15u, acc.lo[15], acc.hi[15]);
    store_row(origin, offsets, 16u, acc.lo[16], acc.hi[16]);
    store_row(origin, offsets, 17u, acc.lo[17], acc.hi[17]);
    store_row(origin, offsets, 18u, acc.lo[18], acc.hi[18]);
    store_row(origin, offsets, 19u, acc.lo[19], acc.hi[19]);
    store_row(origin, offsets, 20u, acc.lo[20], acc.hi[20]);
    store_row(origin, offsets, 21u, acc.lo[21], acc.hi[21]);
    store_row(origin, offsets, 22u, acc.lo[22], acc.hi[22]);
    store_row(origin, offsets, 23u, acc.lo[23], acc.hi[23]);
    store_row(origin, offsets, 24u, acc.lo[24], acc.hi[24]);
    store_row(origin, offsets, 25u, acc.lo[25], acc.hi[25]);
    store_row(origin, offsets, 26u, acc.lo[26], acc.hi[26]);
    store_row(origin, offsets, 27u, acc.lo[27], acc.hi[27]);
    store_row(origin, offsets, 28u, acc.lo[28], acc.hi[28]);
    store_row(origin, offsets, 29u, acc.lo[29], acc.hi[29]);
    store_row(origin, offsets, 30u, acc.lo[30], acc.hi[30]);
    store_row(origin, offsets, 31u, acc.lo[31], acc.hi[31]);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_nn(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) groups: vec3<u32>,
             @builtin(subgroup_invocation_id) lane: u32) {
    let origin = block_origin(gid, groups, lane);
    let q0 = lhs_row_quad(origin, lane, 0u);
    let q1 = lhs_row_quad(origin, lane, 1u);
    let q2 = lhs_row_quad(origin, lane, 2u);
    let q3 = lhs_row_quad(origin, lane, 3u);
    let j_lo = col_quad(origin.col0);
    let j_hi = col_quad(origin.col0 + 4u);
    let rhs_row_quads = params.rhs_stride / 4u;
    var acc: Block;
    let steps = params.inner / 4u;
    for (var i4 = 0u; i4 < steps; i4++) {
        var b_lo: array<vec4<f32>, 4>;
        var b_hi: array<vec4<f32>, 4>;
        for (var s = 0u; s < 4u; s++) {
            let row_quad = (i4 * 4u + s) * rhs_row_quads;
            b_lo[s] = rhs[row_quad + j_lo];
            b_hi[s] = rhs[row_quad + j_hi];
        }
        acc = four_steps(acc, lhs[q0 + i4], lhs[q1 + i4], lhs[q2 + i4], lhs[q3 + i4], b_lo, b_hi);
    }
    store_block(acc, block_bias(origin), origin);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_nt(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) groups: vec3<u32>,
             @builtin(subgroup_invocation_id) lane: u32) {
    let origin = block_origin(gid, groups, lane);
    let q0 = lhs_row_quad(origin, lane, 0u);
    let q1 = lhs_row_quad(origin, lane, 1u);
    let q2 = lhs_row_quad(origin, lane, 2u);
    let q3 = lhs_row_quad(origin, lane, 3u);
    var rhs_quads: array<u32, BLOCK_COLS>;
    for (var c = 0u; c < BLOCK_COLS; c++) {
        rhs_quads[c] = (clamped_col(origin.col0 + c) * params.rhs_stride + params.rhs_offset) / 4u;
    }
    var acc: Block;
    let steps = params.inner / 4u;
    for (var i4 = 0u; i4 < steps; i4++) {
        // Column c's four steps arrive as one vec4; regroup them by step.
        var b: array<vec4<f32>, BLOCK_COLS>;
        for (var c = 0u; c < BLOCK_COLS; c++) {
            b[c] = rhs[rhs_quads[c] + i4];
        }
        var b_lo: array<vec4<f32>, 4>;
        var b_hi: array<vec4<f32>, 4>;
        for (var s = 0u; s < 4u; s++) {
            b_lo[s] = vec4<f32>(b[0][s], b[1][s], b[2][s], b[3][s]);
            b_hi[s] = vec4<f32>(b[4][s], b[5][s], b[6][s], b[7][s]);
        }
        acc = four_steps(acc, lhs[q0 + i4], lhs[q1 + i4], lhs[q2 + i4], lhs[q3 + i4], b_lo, b_hi);
    }
    store_block(acc, block_bias(origin), origin);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_tn(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) groups: vec3<u32>,
             @builtin(subgroup_invocation_id) lane: u32) {
    let origin = block_origin(gid, groups, lane);
    // This lane's quad of result rows, clamped to the last quad: rows are a multiple of 4.
    let a_quad = params.lhs_offset / 4u + min(origin.row0 / 4u + lane, (params.rows - 1u) / 4u);
    let j_lo = col_quad(origin.col0);
    let j_hi = col_quad(origin.col0 + 4u);
    let lhs_row_quads = params.lhs_stride / 4u;
    let rhs_row_quads = params.rhs_stride / 4u;
    var acc: Block;
    for (var i = 0u; i < params.inner; i++) {
        let row_quad = i * rhs_row_quads;
        acc = one_step(acc, lhs[i * lhs_row_quads + a_quad], rhs[row_quad + j_lo], rhs[row_quad + j_hi]);
    }
    store_block(acc, array<vec4<f32>, 2>(), origin);
}
