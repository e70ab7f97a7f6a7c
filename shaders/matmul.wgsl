// Matrix products of the linear layers: forward, input gradient, weight gradient, bias gradient.
//
// Every product is one of three GEMM forms over row-major f32 operands, named as in BLAS by
// which operand is read transposed:
//   matmul_nn: result[r, c] (+)= sum_i lhs[r, i] * rhs[i, c]   (+ bias[c])
//   matmul_nt: result[r, c] (+)= sum_i lhs[r, i] * rhs[c, i]   (+ bias[c])
//   matmul_tn: result[r, c] (+)= sum_i lhs[i, r] * rhs[i, c]
// and matmul_backward_bias computes result[c] += sum_r lhs[r, c].
// The launcher (src/kernels/matmul.rs) maps each linear-layer operation onto a form:
//   forward, weight (K, N):         out = inp @ W          nn, lhs = inp,  rhs = weight
//   forward, weight (N, K):         out = inp @ W^T        nt, lhs = inp,  rhs = weight
//   input gradient, weight (K, N):  dinp = dout @ W^T      nt, lhs = dout, rhs = weight
//   input gradient, weight (N, K):  dinp = dout @ W        nn, lhs = dout, rhs = weight
//   weight gradient, (K, N):        dW += inp^T @ dout     tn, lhs = inp,  rhs = dout
//   weight gradient, (N, K):        dW += dout^T @ inp     tn, lhs = dout, rhs = inp
//
// Element (row, column) of an operand sits at row * stride + offset + column floats, so a product
// can read or write a column range of a wider tensor (the vocabulary chunks of the LM head).
//
// Each invocation computes a TILE_ROWS x TILE_COLS tile of results in registers and sums every
// result over the whole reduction itself, in index order. The result therefore does not depend
// on the dispatch geometry, and no atomics are needed. There is no workgroup memory, because on
// CPU Vulkan drivers (lavapipe) workgroup loads and barriers cost more than they save; GPUs get
// the workgroup-memory variant in matmul_tiled.wgsl. Edge tiles clamp their load indices
// to the last valid row and column, so the reduction loop has no branches and only the stores
// check bounds.
//
// The tile size trades loads for registers: each reduction step loads TILE_ROWS + TILE_COLS
// floats for TILE_ROWS * TILE_COLS multiply-adds. Loads dominate on lavapipe: the same
// multiply-adds without the loads ran about seven times faster, and 16 x 16 ran 1.35x faster
// than 8 x 16 (GPT-2 shapes, 2 vCPUs). The tile is kept as two halves of HALF_ROWS rows with
// separate loops, because one 16-row loop was no longer unrolled into registers and ran slower
// than 8 x 16.
// NOTE: 256 accumulators exceed the register file of some GPUs, so this variant spills there.
//
// When `vec4_loads` is 1, every operand row that is read starts on a 16-byte boundary and the
// reduction loads whole vec4s. Otherwise the same products read single floats through the vec4
// arrays.

const WORKGROUP_SIZE: u32 = 64u;
// Result rows and columns per invocation. TILE_ROWS is two halves of HALF_ROWS, and TILE_COLS is
// TILE_QUADS groups of four columns.
const TILE_ROWS: u32 = 16u;
const HALF_ROWS: u32 = 8u;
const TILE_COLS: u32 = 16u;
const TILE_QUADS: u32 = 4u;

// Registers for HALF_ROWS rows of a tile: q<j>[r] holds columns 4j..4j+3 of row r. The four
// quads are separate arrays indexed only by row, because then compilers keep them in registers
// (on lavapipe, one array indexed by row and quad ran at half the speed).
struct HalfTile {
    q0: array<vec4<f32>, HALF_ROWS>,
    q1: array<vec4<f32>, HALF_ROWS>,
    q2: array<vec4<f32>, HALF_ROWS>,
    q3: array<vec4<f32>, HALF_ROWS>,
}

// One invocation's results: rows 0..HALF_ROWS in `top`, the rest in `bottom`.
struct Tile {
    top: HalfTile,
    bottom: HalfTile,
}

struct MatmulParams {
    // Rows of the result (of the bias gradient: rows summed).
    rows: u32,
    // Columns of the result.
    cols: u32,
    // Length of the reduction.
    inner: u32,
    // Row stride and first column of lhs, in floats.
    lhs_stride: u32,
    lhs_offset: u32,
    // Row stride and first column of rhs, in floats.
    rhs_stride: u32,
    rhs_offset: u32,
    // Row stride and first column of result, in floats.
    out_stride: u32,
    out_offset: u32,
    // 1 adds into result, 0 overwrites it.
    accumulate: u32,
    // 1: add bias[c] to column c (nn and nt only).
    has_bias: u32,
    // 1: strides, offsets and the dimensions read along rows are multiples of 4.
    vec4_loads: u32,
}

@group(0) @binding(0) var<uniform> params: MatmulParams;
@group(0) @binding(1) var<storage, read_write> result: array<f32>; // (rows, out_stride), or (cols) for the bias gradient
@group(0) @binding(2) var<storage, read> lhs: array<vec4<f32>>;   // (rows, lhs_stride), or (inner, lhs_stride) for tn
@group(0) @binding(3) var<storage, read> rhs: array<vec4<f32>>;   // (inner, rhs_stride), or (cols, rhs_stride) for nt
@group(0) @binding(4) var<storage, read> bias: array<f32>;        // (cols), read when has_bias is 1

fn lhs_at(index: u32) -> f32 {
    return lhs[index >> 2u][index & 3u];
}

fn rhs_at(index: u32) -> f32 {
    return rhs[index >> 2u][index & 3u];
}

// Invocation index over the 2-D grid that spreads 1-D work past 65535 workgroups per dimension.
fn flat_index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * WORKGROUP_SIZE;
}

fn col_tiles() -> u32 {
    return (params.cols + TILE_COLS - 1u) / TILE_COLS;
}

fn tile_count() -> u32 {
    return col_tiles() * ((params.rows + TILE_ROWS - 1u) / TILE_ROWS);
}

// First result row and column of tile `t`. Neighbouring invocations share a row of tiles, so they
// read the same lhs rows.
fn tile_origin(t: u32) -> vec2<u32> {
    return vec2<u32>(t / col_tiles() * TILE_ROWS, t % col_tiles() * TILE_COLS);
}

fn clamped_row(row0: u32, r: u32) -> u32 {
    return min(row0 + r, params.rows - 1u);
}

fn clamped_col(col0: u32, c: u32) -> u32 {
    return min(col0 + c, params.cols - 1u);
}

// Scalar form shared by nn, nt and tn: the lhs element for tile row r and reduction index i is
// at lhs_start[r] + i * lhs_step, and the rhs element for tile column c at
// rhs_start[c] + i * rhs_step.
fn product_scalar(
    lhs_start: array<u32, TILE_ROWS>,
    lhs_step: u32,
    rhs_start: array<u32, TILE_COLS>,
    rhs_step: u32,
) -> Tile {
    var top: HalfTile;
    var bottom: HalfTile;
    for (var i = 0u; i < params.inner; i++) {
        let b0 = vec4<f32>(
            rhs_at(rhs_start[0] + i * rhs_step),
            rhs_at(rhs_start[1] + i * rhs_step),
            rhs_at(rhs_start[2] + i * rhs_step),
            rhs_at(rhs_start[3] + i * rhs_step),
        );
        let b1 = vec4<f32>(
            rhs_at(rhs_start[4] + i * rhs_step),
            rhs_at(rhs_start[5] + i * rhs_step),
            rhs_at(rhs_start[6] + i * rhs_step),
            rhs_at(rhs_start[7] + i * rhs_step),
        );
        let b2 = vec4<f32>(
            rhs_at(rhs_start[8] + i * rhs_step),
            rhs_at(rhs_start[9] + i * rhs_step),
            rhs_at(rhs_start[10] + i * rhs_step),
            rhs_at(rhs_start[11] + i * rhs_step),
        );
        let b3 = vec4<f32>(
            rhs_at(rhs_start[12] + i * rhs_step),
            rhs_at(rhs_start[13] + i * rhs_step),
            rhs_at(rhs_start[14] + i * rhs_step),
            rhs_at(rhs_start[15] + i * rhs_step),
        );
        for (var r = 0u; r < HALF_ROWS; r++) {
            let a = vec4<f32>(lhs_at(lhs_start[r] + i * lhs_step));
            top.q0[r] = fma(a, b0, top.q0[r]);
            top.q1[r] = fma(a, b1, top.q1[r]);
            top.q2[r] = fma(a, b2, top.q2[r]);
            top.q3[r] = fma(a, b3, top.q3[r]);
        }
        for (var r = 0u; r < HALF_ROWS; r++) {
            let a = vec4<f32>(lhs_at(lhs_start[HALF_ROWS + r] + i * lhs_step));
            bottom.q0[r] = fma(a, b0, bottom.q0[r]);
            bottom.q1[r] = fma(a, b1, bottom.q1[r]);
            bottom.q2[r] = fma(a, b2, bottom.q2[r]);
            bottom.q3[r] = fma(a, b3, bottom.q3[r]);
        }
    }
    return Tile(top, bottom);
}

// Quad index (float index / 4) of the start of each of HALF_ROWS lhs rows from row0, for nn and nt.
fn lhs_row_quads(row0: u32) -> array<u32, HALF_ROWS> {
    var quads: array<u32, HALF_ROWS>;
    for (var r = 0u; r < HALF_ROWS; r++) {
        quads[r] = (clamped_row(row0, r) * params.lhs_stride + params.lhs_offset) / 4u;
    }
    return quads;
}

// Quad index of column quad j of the tile within an operand row, clamped to the last quad.
fn col_quad(col0: u32, j: u32, offset: u32) -> u32 {
    return offset / 4u + min(col0 / 4u + j, (params.cols - 1u) / 4u);
}

// nn with vec4 loads: four reduction steps per iteration, one vec4 of each lhs row and one vec4
// per column quad of each of the four rhs rows.
fn nn_vec4(row0: u32, col0: u32) -> Tile {
    var top: HalfTile;
    var bottom: HalfTile;
    let top_quads = lhs_row_quads(row0);
    let bottom_quads = lhs_row_quads(row0 + HALF_ROWS);
    let j0 = col_quad(col0, 0u, params.rhs_offset);
    let j1 = col_quad(col0, 1u, params.rhs_offset);
    let j2 = col_quad(col0, 2u, params.rhs_offset);
    let j3 = col_quad(col0, 3u, params.rhs_offset);
    let rhs_row_quads = params.rhs_stride / 4u;
    let steps = params.inner / 4u;
    for (var i4 = 0u; i4 < steps; i4++) {
        var a_top: array<vec4<f32>, HALF_ROWS>;
        var a_bottom: array<vec4<f32>, HALF_ROWS>;
        for (var r = 0u; r < HALF_ROWS; r++) {
            a_top[r] = lhs[top_quads[r] + i4];
            a_bottom[r] = lhs[bottom_quads[r] + i4];
        }
        for (var s = 0u; s < 4u; s++) {
            let row_quad = (i4 * 4u + s) * rhs_row_quads;
            let b0 = rhs[row_quad + j0];
            let b1 = rhs[row_quad + j1];
            let b2 = rhs[row_quad + j2];
            let b3 = rhs[row_quad + j3];
            for (var r = 0u; r < HALF_ROWS; r++) {
                let x = vec4<f32>(a_top[r][s]);
                top.q0[r] = fma(x, b0, top.q0[r]);
                top.q1[r] = fma(x, b1, top.q1[r]);
                top.q2[r] = fma(x, b2, top.q2[r]);
                top.q3[r] = fma(x, b3, top.q3[r]);
            }
            for (var r = 0u; r < HALF_ROWS; r++) {
                let x = vec4<f32>(a_bottom[r][s]);
                bottom.q0[r] = fma(x, b0, bottom.q0[r]);
                bottom.q1[r] = fma(x, b1, bottom.q1[r]);
                bottom.q2[r] = fma(x, b2, bottom.q2[r]);
                bottom.q3[r] = fma(x, b3, bottom.q3[r]);
            }
        }
    }
    return Tile(top, bottom);
}

// Dot products of x with each of four vectors.
fn dot4(x: vec4<f32>, b0: vec4<f32>, b1: vec4<f32>, b2: vec4<f32>, b3: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(dot(x, b0), dot(x, b1), dot(x, b2), dot(x, b3));
}

// nt with vec4 loads: both operands are read along the reduction, four steps per iteration,
// and each result gains the dot product of one lhs vec4 and one rhs vec4.
fn nt_vec4(row0: u32, col0: u32) -> Tile {
    var top: HalfTile;
    var bottom: HalfTile;
    let top_quads = lhs_row_quads(row0);
    let bottom_quads = lhs_row_quads(row0 + HALF_ROWS);
    var rhs_quads: array<u32, TILE_COLS>;
    for (var c = 0u; c < TILE_COLS; c++) {
        rhs_quads[c] = (clamped_col(col0, c) * params.rhs_stride + params.rhs_offset) / 4u;
    }
    let steps = params.inner / 4u;
    for (var i4 = 0u; i4 < steps; i4++) {
        var b: array<vec4<f32>, TILE_COLS>;
        for (var c = 0u; c < TILE_COLS; c++) {
            b[c] = rhs[rhs_quads[c] + i4];
        }
        for (var r = 0u; r < HALF_ROWS; r++) {
            let a = lhs[top_quads[r] + i4];
            top.q0[r] += dot4(a, b[0], b[1], b[2], b[3]);
            top.q1[r] += dot4(a, b[4], b[5], b[6], b[7]);
            top.q2[r] += dot4(a, b[8], b[9], b[10], b[11]);
            top.q3[r] += dot4(a, b[12], b[13], b[14], b[15]);
        }
        for (var r = 0u; r < HALF_ROWS; r++) {
            let a = lhs[bottom_quads[r] + i4];
            bottom.q0[r] += dot4(a, b[0], b[1], b[2], b[3]);
            bottom.q1[r] += dot4(a, b[4], b[5], b[6], b[7]);
            bottom.q2[r] += dot4(a, b[8], b[9], b[10], b[11]);
            bottom.q3[r] += dot4(a, b[12], b[13], b[14], b[15]);
        }
    }
    return Tile(top, bottom);
}

// tn with vec4 loads: per reduction step, four vec4s of the lhs row cover the tile's sixteen
// result rows and one vec4 of the rhs row covers each column quad.
fn tn_vec4(row0: u32, col0: u32) -> Tile {
    var top: HalfTile;
    var bottom: HalfTile;
    let last_lhs_quad = (params.rows - 1u) / 4u;
    var lhs_quads: array<u32, 4>;
    for (var j = 0u; j < 4u; j++) {
        lhs_quads[j] = params.lhs_offset / 4u + min(row0 / 4u + j, last_lhs_quad);
    }
    let j0 = col_quad(col0, 0u, params.rhs_offset);
    let j1 = col_quad(col0, 1u, params.rhs_offset);
    let j2 = col_quad(col0, 2u, params.rhs_offset);
    let j3 = col_quad(col0, 3u, params.rhs_offset);
    let lhs_row_quads = params.lhs_stride / 4u;
    let rhs_row_quads = params.rhs_stride / 4u;
    for (var i = 0u; i < params.inner; i++) {
        var a: array<vec4<f32>, 4>;
        for (var j = 0u; j < 4u; j++) {
            a[j] = lhs[i * lhs_row_quads + lhs_quads[j]];
        }
        let row_quad = i * rhs_row_quads;
        let b0 = rhs[row_quad + j0];
        let b1 = rhs[row_quad + j1];
        let b2 = rhs[row_quad + j2];
        let b3 = rhs[row_quad + j3];
        for (var r = 0u; r < HALF_ROWS; r++) {
            let x = vec4<f32>(a[r / 4u][r % 4u]);
            top.q0[r] = fma(x, b0, top.q0[r]);
            top.q1[r] = fma(x, b1, top.q1[r]);
            top.q2[r] = fma(x, b2, top.q2[r]);
            top.q3[r] = fma(x, b3, top.q3[r]);
        }
        for (var r = 0u; r < HALF_ROWS; r++) {
            let x = vec4<f32>(a[2u + r / 4u][r % 4u]);
            bottom.q0[r] = fma(x, b0, bottom.q0[r]);
            bottom.q1[r] = fma(x, b1, bottom.q1[r]);
            bottom.q2[r] = fma(x, b2, bottom.q2[r]);
            bottom.q3[r] = fma(x, b3, bottom.q3[r]);
        }
    }
    return Tile(top, bottom);
}

// bias[col0 + c] for the tile's columns c, as four quads, or zeros when has_bias is 0. Entries
// past the last column are clamped and never stored.
fn tile_bias(col0: u32) -> array<vec4<f32>, TILE_QUADS> {
    var quads: array<vec4<f32>, TILE_QUADS>;
    if (params.has_bias == 1u) {
        for (var j = 0u; j < TILE_QUADS; j++) {
            let c = col0 + j * 4u;
            quads[j] = vec4<f32>(
                bias[clamped_col(c, 0u)],
                bias[clamped_col(c, 1u)],
                bias[clamped_col(c, 2u)],
                bias[clamped_col(c, 3u)],
            );
        }
    }
    return quads;
}

// Writes (or adds) the in-bounds part of one column quad of a half tile, plus `offset` per column.
fn store_quad(values: array<vec4<f32>, HALF_ROWS>, offset: vec4<f32>, row0: u32, col0: u32) {
    for (var r = 0u; r < HALF_ROWS; r++) {
        let row = row0 + r;
        if (row >= params.rows) {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + j;
            if (col >= params.cols) {
                break;
            }
            let index = row * params.out_stride + params.out_offset + col;
            var value = values[r][j] + offset[j];
            if (params.accumulate == 1u) {
                value += result[index];
            }
            result[index] = value;
        }
    }
}

fn store_half(half: HalfTile, offsets: array<vec4<f32>, TILE_QUADS>, row0: u32, col0: u32) {
    store_quad(half.q0, offsets[0], row0, col0);
    store_quad(half.q1, offsets[1], row0, col0 + 4u);
    store_quad(half.q2, offsets[2], row0, col0 + 8u);
    store_quad(half.q3, offsets[3], row0, col0 + 12u);
}

// Stores the tile, adding quad j of `offsets` to column quad j of every row.
fn store_tile(tile: Tile, offsets: array<vec4<f32>, TILE_QUADS>, row0: u32, col0: u32) {
    store_half(tile.top, offsets, row0, col0);
    store_half(tile.bottom, offsets, row0 + HALF_ROWS, col0);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_nn(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) groups: vec3<u32>) {
    let t = flat_index(gid, groups);
    if (t >= tile_count()) {
        return;
    }
    let origin = tile_origin(t);
    var acc: Tile;
    if (params.vec4_loads == 1u) {
        acc = nn_vec4(origin.x, origin.y);
    } else {
        var lhs_start: array<u32, TILE_ROWS>;
        for (var r = 0u; r < TILE_ROWS; r++) {
            lhs_start[r] = clamped_row(origin.x, r) * params.lhs_stride + params.lhs_offset;
        }
        var rhs_start: array<u32, TILE_COLS>;
        for (var c = 0u; c < TILE_COLS; c++) {
            rhs_start[c] = params.rhs_offset + clamped_col(origin.y, c);
        }
        acc = product_scalar(lhs_start, 1u, rhs_start, params.rhs_stride);
    }
    store_tile(acc, tile_bias(origin.y), origin.x, origin.y);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_nt(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) groups: vec3<u32>) {
    let t = flat_index(gid, groups);
    if (t >= tile_count()) {
        return;
    }
    let origin = tile_origin(t);
    var acc: Tile;
    if (params.vec4_loads == 1u) {
        acc = nt_vec4(origin.x, origin.y);
    } else {
        var lhs_start: array<u32, TILE_ROWS>;
        for (var r = 0u; r < TILE_ROWS; r++) {
            lhs_start[r] = clamped_row(origin.x, r) * params.lhs_stride + params.lhs_offset;
        }
        var rhs_start: array<u32, TILE_COLS>;
        for (var c = 0u; c < TILE_COLS; c++) {
            rhs_start[c] = clamped_col(origin.y, c) * params.rhs_stride + params.rhs_offset;
        }
        acc = product_scalar(lhs_start, 1u, rhs_start, 1u);
    }
    store_tile(acc, tile_bias(origin.y), origin.x, origin.y);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_tn(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) groups: vec3<u32>) {
    let t = flat_index(gid, groups);
    if (t >= tile_count()) {
        return;
    }
    let origin = tile_origin(t);
    var acc: Tile;
    if (params.vec4_loads == 1u) {
        acc = tn_vec4(origin.x, origin.y);
    } else {
        var lhs_start: array<u32, TILE_ROWS>;
        for (var r = 0u; r < TILE_ROWS; r++) {
            lhs_start[r] = params.lhs_offset + clamped_row(origin.x, r);
        }
        var rhs_start: array<u32, TILE_COLS>;
        for (var c = 0u; c < TILE_COLS; c++) {
            rhs_start[c] = params.rhs_offset + clamped_col(origin.y, c);
        }
        acc = product_scalar(lhs_start, params.lhs_stride, rhs_start, params.rhs_stride);
    }
    store_tile(acc, array<vec4<f32>, TILE_QUADS>(), origin.x, origin.y);
}

// result[c] (+)= sum_r lhs[r, c]: one invocation per quad of four columns, summing rows in order.
@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_backward_bias(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) groups: vec3<u32>) {
    let col0 = flat_index(gid, groups) * 4u;
    if (col0 >= params.cols) {
        return;
    }
    var sum = vec4<f32>();
    if (params.vec4_loads == 1u) {
        for (var r = 0u; r < params.rows; r++) {
            sum += lhs[(r * params.lhs_stride + params.lhs_offset + col0) / 4u];
        }
    } else {
        let c0 = params.lhs_offset + clamped_col(col0, 0u);
        let c1 = params.lhs_offset + clamped_col(col0, 1u);
        let c2 = params.lhs_offset + clamped_col(col0, 2u);
        let c3 = params.lhs_offset + clamped_col(col0, 3u);
        for (var r = 0u; r < params.rows; r++) {
            let row = r * params.lhs_stride;
            sum += vec4<f32>(lhs_at(row + c0), lhs_at(row + c1), lhs_at(row + c2), lhs_at(row + c3));
        }
    }
    for (var j = 0u; j < 4u; j++) {
        let col = col0 + j;
        if (col < params.cols) {
            var value = sum[j];
            if (params.accumulate == 1u) {
                value += result[col];
            }
            result[col] = value;
        }
    }
}
