// Linear-layer products with a frozen weight W stored in half precision (IEEE 754 binary16), two
// values per u32, widened to f32 inside the kernel; every multiply and sum is f32.
//   matmul_f16_forward:        out[m, out_offset + n] = sum_k inp[m, k] * W[k, n] (+ bias[n])
//   matmul_f16_backward_input: dinp[m, k] (+)= sum_n dout[m, out_offset + n] * W[k, n]
// The forward assigns `out`. The input gradient assigns `dinp`, or adds to it when `accumulate`
// is 1. W is (K, N), input index first, as GPT-2 stores its Conv1D weights, and N is a multiple
// of 8, so that each row of W is a whole number of 16-byte words.
//
// Storage (written by `pack` in src/kernels/f16_weights.rs), for element e = k * N + n of W: the low 16
// bits of word e / 2 when e is even, the high 16 bits when it is odd, which is the order that
// unpack2x16float returns. Nothing is computed in f16, so the kernels need wgpu's SHADER_F16_IN_F32
// capability for that builtin but not the SHADER_F16 feature.
//
// The blocking follows shaders/matmul_nf4.wgsl, the other kernel pair whose weight is decoded on
// load: each invocation computes a block of results in registers and sums every result over the
// whole reduction itself, in index order, so results are deterministic and independent of the
// dispatch geometry. No workgroup memory is used. Row indices past the last row are clamped for
// the loads, and only the stores check bounds.

const WORKGROUP_SIZE: u32 = 64u;
// Weights in one vec4<u32> of `packed`.
const WORD_VALUES: u32 = 8u;
// Result rows per invocation of the forward; its columns are the 8 of one packed word.
const FORWARD_ROWS: u32 = 16u;
// Result rows per invocation of the input gradient; its columns are 8 consecutive k.
const BACKWARD_ROWS: u32 = 32u;
const BACKWARD_COLS: u32 = 8u;

struct F16Params {
    // M, rows of the activations and of the result.
    rows: u32,
    // N, weight columns: the output features.
    cols: u32,
    // K, weight rows: the input features.
    inner: u32,
    // Row stride and first column of `out` (forward) or `dout` (input gradient), in floats.
    out_stride: u32,
    out_offset: u32,
    // 1 adds into the result, 0 overwrites it (input gradient only).
    accumulate: u32,
    // 1: add bias[n] to column n (forward only).
    has_bias: u32,
    // 1: every activation row that is read starts on a 16-byte boundary and the kernel loads vec4s.
    vec4_loads: u32,
}

@group(0) @binding(0) var<uniform> params: F16Params;
@group(0) @binding(1) var<storage, read_write> result: array<f32>;  // out (M, out_stride), or dinp (M, K)
@group(0) @binding(2) var<storage, read> act: array<vec4<f32>>;     // inp (M, K), or dout (M, out_stride)
@group(0) @binding(3) var<storage, read> packed: array<vec4<u32>>;  // (K * N / 8) words of W
@group(0) @binding(4) var<storage, read> bias: array<f32>;          // (N), read when has_bias is 1

fn act_at(index: u32) -> f32 {
    return act[index >> 2u][index & 3u];
}

// Four consecutive activations from float index `start`, which is a multiple of 4 when
// vec4_loads is 1.
fn act_quad(start: u32) -> vec4<f32> {
    if (params.vec4_loads == 1u) {
        return act[start >> 2u];
    }
    return vec4<f32>(act_at(start), act_at(start + 1u), act_at(start + 2u), act_at(start + 3u));
}

// Invocation index over the 2-D grid that spreads 1-D work past 65535 workgroups per dimension.
fn flat_index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * WORKGROUP_SIZE;
}

fn clamped_row(row: u32) -> u32 {
    return min(row, params.rows - 1u);
}

// The 8 weights of one packed word, in element order: lo holds elements 0..3, hi 4..7.
struct Octet {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn octet(word: u32) -> Octet {
    let w = packed[word];
    return Octet(
        vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)),
        vec4<f32>(unpack2x16float(w.z), unpack2x16float(w.w)),
    );
}

// Writes (or, with accumulate 1, adds) the 8 results of one row from float index `start`, of
// which the first `count` are in bounds.
fn store_octet(start: u32, count: u32, values: Octet) {
    for (var j = 0u; j < WORD_VALUES; j++) {
        if (j >= count) {
            break;
        }
        var value: f32;
        if (j < 4u) {
            value = values.lo[j];
        } else {
            value = values.hi[j - 4u];
        }
        if (params.accumulate == 1u) {
            value += result[start + j];
        }
        result[start + j] = value;
    }
}

// Forward: one invocation computes FORWARD_ROWS rows and the 8 columns of one packed word.
// Neighbouring invocations take neighbouring words of the same rows, so they read the same
// activation rows.
@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_f16_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                      @builtin(num_workgroups) groups: vec3<u32>) {
    let t = flat_index(gid, groups);
    let row_words = params.cols / WORD_VALUES;
    let row_tiles = (params.rows + FORWARD_ROWS - 1u) / FORWARD_ROWS;
    if (t >= row_tiles * row_words) {
        return;
    }
    let row0 = t / row_words * FORWARD_ROWS;
    let word_col = t % row_words;

    var starts: array<u32, FORWARD_ROWS>;
    for (var r = 0u; r < FORWARD_ROWS; r++) {
        starts[r] = clamped_row(row0 + r) * params.inner;
    }
    var lo: array<vec4<f32>, FORWARD_ROWS>;
    var hi: array<vec4<f32>, FORWARD_ROWS>;

    // Four reduction steps per iteration: one activation vec4 per row, four weight rows.
    let quads = params.inner / 4u;
    for (var k4 = 0u; k4 < quads; k4++) {
        let k = k4 * 4u;
        let w0 = octet(k * row_words + word_col);
        let w1 = octet((k + 1u) * row_words + word_col);
        let w2 = octet((k + 2u) * row_words + word_col);
        let w3 = octet((k + 3u) * row_words + word_col);
        for (var r = 0u; r < FORWARD_ROWS; r++) {
            let a = act_quad(starts[r] + k);
            lo[r] = fma(vec4<f32>(a.x), w0.lo, lo[r]);
            hi[r] = fma(vec4<f32>(a.x), w0.hi, hi[r]);
            lo[r] = fma(vec4<f32>(a.y), w1.lo, lo[r]);
            hi[r] = fma(vec4<f32>(a.y), w1.hi, hi[r]);
            lo[r] = fma(vec4<f32>(a.z), w2.lo, lo[r]);
            hi[r] = fma(vec4<f32>(a.z), w2.hi, hi[r]);
            lo[r] = fma(vec4<f32>(a.w), w3.lo, lo[r]);
            hi[r] = fma(vec4<f32>(a.w), w3.hi, hi[r]);
        }
    }
    // The last K % 4 reduction steps.
    for (var k = quads * 4u; k < params.inner; k++) {
        let w = octet(k * row_words + word_col);
        for (var r = 0u; r < FORWARD_ROWS; r++) {
            let a = vec4<f32>(act_at(starts[r] + k));
            lo[r] = fma(a, w.lo, lo[r]);
            hi[r] = fma(a, w.hi, hi[r]);
        }
    }

    let col0 = word_col * WORD_VALUES;
    var bias_lo = vec4<f32>();
    var bias_hi = vec4<f32>();
    if (params.has_bias == 1u) {
        bias_lo = vec4<f32>(bias[col0], bias[col0 + 1u], bias[col0 + 2u], bias[col0 + 3u]);
        bias_hi = vec4<f32>(bias[col0 + 4u], bias[col0 + 5u], bias[col0 + 6u], bias[col0 + 7u]);
    }
    for (var r = 0u; r < FORWARD_ROWS; r++) {
        let row = row0 + r;
        if (row >= params.rows) {
            break;
        }
        let start = row * params.out_stride + params.out_offset + col0;
        store_octet(start, WORD_VALUES, Octet(lo[r] + bias_lo, hi[r] + bias_hi));
    }
}

// Input gradient: one invocation computes BACKWARD_ROWS rows and BACKWARD_COLS consecutive k,
// that is BACKWARD_COLS rows of W, which it reads along n one packed word at a time. Weight rows
// past K are clamped for the loads.
@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_f16_backward_input(@builtin(global_invocation_id) gid: vec3<u32>,
                             @builtin(num_workgroups) groups: vec3<u32>) {
    let t = flat_index(gid, groups);
    let k_tiles = (params.inner + BACKWARD_COLS - 1u) / BACKWARD_COLS;
    let row_tiles = (params.rows + BACKWARD_ROWS - 1u) / BACKWARD_ROWS;
    if (t >= row_tiles * k_tiles) {
        return;
    }
    let row0 = t / k_tiles * BACKWARD_ROWS;
    let k0 = t % k_tiles * BACKWARD_COLS;
    let row_words = params.cols / WORD_VALUES;

    // Weight row k0 + c is quad (c / 4), component (c % 4).
    let last_k = params.inner - 1u;
    let words_lo = min(vec4<u32>(k0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(last_k)) * row_words;
    let words_hi = min(vec4<u32>(k0) + vec4<u32>(4u, 5u, 6u, 7u), vec4<u32>(last_k)) * row_words;

    var starts: array<u32, BACKWARD_ROWS>;
    for (var r = 0u; r < BACKWARD_ROWS; r++) {
        starts[r] = clamped_row(row0 + r) * params.out_stride + params.out_offset;
    }
    var lo: array<vec4<f32>, BACKWARD_ROWS>;
    var hi: array<vec4<f32>, BACKWARD_ROWS>;

    for (var word = 0u; word < row_words; word++) {
        // Octet c holds W[k0 + c, n0 .. n0 + 8]. Transposing groups of four gives w_lo[j] =
        // W[k0 .. k0 + 4, n0 + j] and w_hi[j] = W[k0 + 4 .. k0 + 8, n0 + j].
        let o0 = octet(words_lo.x + word);
        let o1 = octet(words_lo.y + word);
        let o2 = octet(words_lo.z + word);
        let o3 = octet(words_lo.w + word);
        let o4 = octet(words_hi.x + word);
        let o5 = octet(words_hi.y + word);
        let o6 = octet(words_hi.z + word);
        let o7 = octet(words_hi.w + word);
        let lo_first = transpose(mat4x4<f32>(o0.lo, o1.lo, o2.lo, o3.lo));
        let lo_second = transpose(mat4x4<f32>(o0.hi, o1.hi, o2.hi, o3.hi));
        let hi_first = transpose(mat4x4<f32>(o4.lo, o5.lo, o6.lo, o7.lo));
        let hi_second = transpose(mat4x4<f32>(o4.hi, o5.hi, o6.hi, o7.hi));
        let n0 = word * WORD_VALUES;
        for (var r = 0u; r < BACKWARD_ROWS; r++) {
            let d0 = act_quad(starts[r] + n0);
            let d1 = act_quad(starts[r] + n0 + 4u);
            lo[r] = fma(vec4<f32>(d0.x), lo_first[0], lo[r]);
            hi[r] = fma(vec4<f32>(d0.x), hi_first[0], hi[r]);
            lo[r] = fma(vec4<f32>(d0.y), lo_first[1], lo[r]);
            hi[r] = fma(vec4<f32>(d0.y), hi_first[1], hi[r]);
            lo[r] = fma(vec4<f32>(d0.z), lo_first[2], lo[r]);
            hi[r] = fma(vec4<f32>(d0.z), hi_first[2], hi[r]);
            lo[r] = fma(vec4<f32>(d0.w), lo_first[3], lo[r]);
            hi[r] = fma(vec4<f32>(d0.w), hi_first[3], hi[r]);
            lo[r] = fma(vec4<f32>(d1.x), lo_second[0], lo[r]);
            hi[r] = fma(vec4<f32>(d1.x), hi_second[0], hi[r]);
            lo[r] = fma(vec4<f32>(d1.y), lo_second[1], lo[r]);
            hi[r] = fma(vec4<f32>(d1.y), hi_second[1], hi[r]);
            lo[r] = fma(vec4<f32>(d1.z), lo_second[2], lo[r]);
            hi[r] = fma(vec4<f32>(d1.z), hi_second[2], hi[r]);
            lo[r] = fma(vec4<f32>(d1.w), lo_second[3], lo[r]);
            hi[r] = fma(vec4<f32>(d1.w), hi_second[3], hi[r]);
        }
    }

    let count = min(BACKWARD_COLS, params.inner - k0);
    for (var r = 0u; r < BACKWARD_ROWS; r++) {
        let row = row0 + r;
        if (row >= params.rows) {
            break;
        }
        store_octet(row * params.inner + k0, count, Octet(lo[r], hi[r]));
    }
}
