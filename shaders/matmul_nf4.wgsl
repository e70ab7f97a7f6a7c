// Linear-layer products with a frozen weight W stored as 4-bit NormalFloat (NF4), dequantised
// inside the kernel; the f32 weight is never written to memory.
//   matmul_nf4_forward:        out[m, out_offset + n] = sum_k inp[m, k] * W[k, n] (+ bias[n])
//   matmul_nf4_backward_input: dinp[m, k] (+)= sum_n dout[m, out_offset + n] * W[k, n]
// The forward assigns `out`. The input gradient assigns `dinp`, or adds to it when `accumulate`
// is 1. W is (K, N), input index first, as GPT-2 stores its Conv1D weights, and N is a multiple of
// BLOCK_SIZE, so every quantisation block is BLOCK_SIZE consecutive columns of one weight row.
//
// Storage (written by `quantize` in src/kernels/nf4.rs), for element e = k * N + n of W:
//   code:  bits 4 * (e % 8) .. 4 * (e % 8) + 3 of packed[e / 8], an index into NF4_CODES
//   block: b = e / BLOCK_SIZE, with one scale per block (the absmax of its 64 values)
//   W[k, n] = NF4_CODES[code] * scale(b)
// With double_quant 0, scales[b] holds the bits of the f32 scale. With double_quant 1, byte b % 4
// (bits 8 * (b % 4) ..) of scales[b / 4] is a signed 8-bit code q and
//   scale(b) = scale_mean + f32(q) * scale_steps[b / GROUP_BLOCKS].
//
// Each invocation computes a block of results in registers and sums every result over the whole
// reduction itself, in index order, so results are deterministic and independent of the dispatch
// geometry. There is no workgroup memory, because on CPU Vulkan drivers (lavapipe) workgroup loads
// and barriers cost more than they save. Row indices past the last row are clamped for the loads,
// and only the stores check bounds.
//
// One u32 load yields 8 weights and each decoded weight is used by every row of the block, so the
// decode (shift, mask and a select tree over the code table, no memory access) is paid once per
// weight and block, not once per multiply-add.
// NOTE: on lavapipe (Mesa 22.3, LLVM 15, 2 shared vCPUs) `shadertune bench kernels` measured
// 0.6-0.7 GFLOP/s for both entry points at (960, 768) x (768, 3072), against 2.8-3.2 for the
// f32 subgroup matmul in the same run. Decoding with a dynamically indexed copy of NF4_CODES,
// or 8 rows per invocation, measured no faster. A subgroup variant in which each lane decodes a
// share of the words and broadcasts the values may close the gap.

const WORKGROUP_SIZE: u32 = 64u;
// Weights per quantisation block (one scale each) and block scales per double-quantisation group.
const BLOCK_SIZE: u32 = 64u;
const GROUP_BLOCKS: u32 = 256u;
// Codes in one u32 of `packed`.
const WORD_CODES: u32 = 8u;
// Result rows per invocation of the forward; its columns are the 8 of one packed word.
const FORWARD_ROWS: u32 = 16u;
// Result rows per invocation of the input gradient; its columns are 8 consecutive k, as two quads.
const BACKWARD_ROWS: u32 = 32u;
const BACKWARD_COLS: u32 = 8u;

// The 16 NF4 code values in code order: quantiles of the standard normal distribution scaled to
// [-1, 1], 7 below zero, an exact zero (code 7) and 8 above (QLoRA, Dettmers et al. 2023; the
// f32 values of the bitsandbytes table). Must match `NF4_CODES` in src/kernels/nf4.rs.
const NF4_CODES = array<f32, 16>(
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
);

struct Nf4Params {
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
    // 1: block scales are 8-bit codes, decoded with scale_mean and scale_steps.
    double_quant: u32,
    // Mean of all block scales of the weight, subtracted before their 8-bit quantisation.
    scale_mean: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Nf4Params;
@group(0) @binding(1) var<storage, read_write> result: array<f32>; // out (M, out_stride), or dinp (M, K)
@group(0) @binding(2) var<storage, read> act: array<vec4<f32>>;    // inp (M, K), or dout (M, out_stride)
@group(0) @binding(3) var<storage, read> packed: array<u32>;       // (K * N / 8) codes of W
@group(0) @binding(4) var<storage, read> scales: array<u32>;       // (K * N / 64) f32, or (K * N / 256) words of 8-bit codes
@group(0) @binding(5) var<storage, read> scale_steps: array<f32>;  // (K * N / 64 / 256), read when double_quant is 1
@group(0) @binding(6) var<storage, read> bias: array<f32>;         // (N), read when has_bias is 1

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

// The scale of quantisation block `b`.
fn block_scale(b: u32) -> f32 {
    if (params.double_quant == 0u) {
        return bitcast<f32>(scales[b]);
    }
    // Move byte b % 4 to the top, then an arithmetic shift sign-extends it.
    let word = scales[b / 4u];
    let code = bitcast<i32>(word << (24u - 8u * (b % 4u))) >> 24u;
    return params.scale_mean + f32(code) * scale_steps[b / GROUP_BLOCKS];
}

// NF4_CODES[codes[i]] for each of four codes in 0..15, by a binary select tree on the code bits:
// a dynamically indexed array would be a memory access per code on CPU drivers.
fn code_values(codes: vec4<u32>) -> vec4<f32> {
    let bit0 = (codes & vec4<u32>(1u)) != vec4<u32>(0u);
    let bit1 = (codes & vec4<u32>(2u)) != vec4<u32>(0u);
    let bit2 = (codes & vec4<u32>(4u)) != vec4<u32>(0u);
    let bit3 = (codes & vec4<u32>(8u)) != vec4<u32>(0u);
    let c01 = select(vec4<f32>(NF4_CODES[0]), vec4<f32>(NF4_CODES[1]), bit0);
    let c23 = select(vec4<f32>(NF4_CODES[2]), vec4<f32>(NF4_CODES[3]), bit0);
    let c45 = select(vec4<f32>(NF4_CODES[4]), vec4<f32>(NF4_CODES[5]), bit0);
    let c67 = select(vec4<f32>(NF4_CODES[6]), vec4<f32>(NF4_CODES[7]), bit0);
    let c89 = select(vec4<f32>(NF4_CODES[8]), vec4<f32>(NF4_CODES[9]), bit0);
    let c1011 = select(vec4<f32>(NF4_CODES[10]), vec4<f32>(NF4_CODES[11]), bit0);
    let c1213 = select(vec4<f32>(NF4_CODES[12]), vec4<f32>(NF4_CODES[13]), bit0);
    let c1415 = select(vec4<f32>(NF4_CODES[14]), vec4<f32>(NF4_CODES[15]), bit0);
    let c0_3 = select(c01, c23, bit1);
    let c4_7 = select(c45, c67, bit1);
    let c8_11 = select(c89, c1011, bit1);
    let c12_15 = select(c1213, c1415, bit1);
    let c0_7 = select(c0_3, c4_7, bit2);
    let c8_15 = select(c8_11, c12_15, bit2);
    return select(c0_7, c8_15, bit3);
}

// The 8 weights of one packed word, in element order: lo holds elements 0..3, hi 4..7.
struct Octet {
    lo: vec4<f32>,
    hi: vec4<f32>,
}

fn decode_word(word: u32, scale: f32) -> Octet {
    let w = vec4<u32>(word);
    let lo = code_values((w >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u));
    let hi = code_values((w >> vec4<u32>(16u, 20u, 24u, 28u)) & vec4<u32>(15u));
    return Octet(lo * scale, hi * scale);
}

// Writes (or, with accumulate 1, adds) the 8 results of one row from float index `start`, of
// which the first `count` are in bounds.
fn store_octet(start: u32, count: u32, values: Octet) {
    for (var j = 0u; j < WORD_CODES; j++) {
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
fn matmul_nf4_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                      @builtin(num_workgroups) groups: vec3<u32>) {
    let t = flat_index(gid, groups);
    let row_words = params.cols / WORD_CODES;
    let row_tiles = (params.rows + FORWARD_ROWS - 1u) / FORWARD_ROWS;
    if (t >= row_tiles * row_words) {
        return;
    }
    let row0 = t / row_words * FORWARD_ROWS;
    let word_col = t % row_words;
    let row_blocks = params.cols / BLOCK_SIZE;
    let block_col = word_col / (BLOCK_SIZE / WORD_CODES);

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
        let w0 = decode_word(packed[k * row_words + word_col], block_scale(k * row_blocks + block_col));
        let w1 = decode_word(packed[(k + 1u) * row_words + word_col], block_scale((k + 1u) * row_blocks + block_col));
        let w2 = decode_word(packed[(k + 2u) * row_words + word_col], block_scale((k + 2u) * row_blocks + block_col));
        let w3 = decode_word(packed[(k + 3u) * row_words + word_col], block_scale((k + 3u) * row_blocks + block_col));
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
        let w = decode_word(packed[k * row_words + word_col], block_scale(k * row_blocks + block_col));
        for (var r = 0u; r < FORWARD_ROWS; r++) {
            let a = vec4<f32>(act_at(starts[r] + k));
            lo[r] = fma(a, w.lo, lo[r]);
            hi[r] = fma(a, w.hi, hi[r]);
        }
    }

    let col0 = word_col * WORD_CODES;
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
        store_octet(start, WORD_CODES, Octet(lo[r] + bias_lo, hi[r] + bias_hi));
    }
}

// Input gradient: one invocation computes BACKWARD_ROWS rows and BACKWARD_COLS consecutive k,
// that is BACKWARD_COLS rows of W, which it reads along n one packed word at a time. Weight rows
// past K are clamped for the loads.
@compute @workgroup_size(WORKGROUP_SIZE)
fn matmul_nf4_backward_input(@builtin(global_invocation_id) gid: vec3<u32>,
                             @builtin(num_workgroups) groups: vec3<u32>) {
    let t = flat_index(gid, groups);
    let k_tiles = (params.inner + BACKWARD_COLS - 1u) / BACKWARD_COLS;
    let row_tiles = (params.rows + BACKWARD_ROWS - 1u) / BACKWARD_ROWS;
    if (t >= row_tiles * k_tiles) {
        return;
    }
    let row0 = t / k_tiles * BACKWARD_ROWS;
    let k0 = t % k_tiles * BACKWARD_COLS;
    let row_words = params.cols / WORD_CODES;
    let row_blocks = params.cols / BLOCK_SIZE;

    // Weight row k0 + c is quad (c / 4), component (c % 4).
    let last_k = params.inner - 1u;
    let k_lo = min(vec4<u32>(k0) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(last_k));
    let k_hi = min(vec4<u32>(k0) + vec4<u32>(4u, 5u, 6u, 7u), vec4<u32>(last_k));
    let words_lo = k_lo * row_words;
    let words_hi = k_hi * row_words;
    let blocks_lo = k_lo * row_blocks;
    let blocks_hi = k_hi * row_blocks;

    var starts: array<u32, BACKWARD_ROWS>;
    for (var r = 0u; r < BACKWARD_ROWS; r++) {
        starts[r] = clamped_row(row0 + r) * params.out_stride + params.out_offset;
    }
    var lo: array<vec4<f32>, BACKWARD_ROWS>;
    var hi: array<vec4<f32>, BACKWARD_ROWS>;

    for (var block = 0u; block < row_blocks; block++) {
        let scale_lo = vec4<f32>(
            block_scale(blocks_lo.x + block),
            block_scale(blocks_lo.y + block),
            block_scale(blocks_lo.z + block),
            block_scale(blocks_lo.w + block),
        );
        let scale_hi = vec4<f32>(
            block_scale(blocks_hi.x + block),
            block_scale(blocks_hi.y + block),
            block_scale(blocks_hi.z + block),
            block_scale(blocks_hi.w + block),
        );
        for (var i = 0u; i < BLOCK_SIZE / WORD_CODES; i++) {
            let word = block * (BLOCK_SIZE / WORD_CODES) + i;
            let packed_lo = vec4<u32>(
                packed[words_lo.x + word],
                packed[words_lo.y + word],
                packed[words_lo.z + word],
                packed[words_lo.w + word],
            );
            let packed_hi = vec4<u32>(
                packed[words_hi.x + word],
                packed[words_hi.y + word],
                packed[words_hi.z + word],
                packed[words_hi.w + word],
            );
            // w_lo[j][c] is W[k0 + c, n0 + j] and w_hi[j][c] is W[k0 + 4 + c, n0 + j]: the codes
            // of element j of the word sit at bits 4j..4j+3 of each row's word.
            var w_lo: array<vec4<f32>, WORD_CODES>;
            var w_hi: array<vec4<f32>, WORD_CODES>;
            for (var j = 0u; j < WORD_CODES; j++) {
                let shift = vec4<u32>(4u * j);
                w_lo[j] = code_values((packed_lo >> shift) & vec4<u32>(15u)) * scale_lo;
                w_hi[j] = code_values((packed_hi >> shift) & vec4<u32>(15u)) * scale_hi;
            }
            let n0 = word * WORD_CODES;
            for (var r = 0u; r < BACKWARD_ROWS; r++) {
                let d0 = act_quad(starts[r] + n0);
                let d1 = act_quad(starts[r] + n0 + 4u);
                lo[r] = fma(vec4<f32>(d0.x), w_lo[0], lo[r]);
                hi[r] = fma(vec4<f32>(d0.x), w_hi[0], hi[r]);
                lo[r] = fma(vec4<f32>(d0.y), w_lo[1], lo[r]);
                hi[r] = fma(vec4<f32>(d0.y), w_hi[1], hi[r]);
                lo[r] = fma(vec4<f32>(d0.z), w_lo[2], lo[r]);
                hi[r] = fma(vec4<f32>(d0.z), w_hi[2], hi[r]);
                lo[r] = fma(vec4<f32>(d0.w), w_lo[3], lo[r]);
                hi[r] = fma(vec4<f32>(d0.w), w_hi[3], hi[r]);
                lo[r] = fma(vec4<f32>(d1.x), w_lo[4], lo[r]);
                hi[r] = fma(vec4<f32>(d1.x), w_hi[4], hi[r]);
                lo[r] = fma(vec4<f32>(d1.y), w_lo[5], lo[r]);
                hi[r] = fma(vec4<f32>(d1.y), w_hi[5], hi[r]);
                lo[r] = fma(vec4<f32>(d1.z), w_lo[6], lo[r]);
                hi[r] = fma(vec4<f32>(d1.z), w_hi[6], hi[r]);
                lo[r] = fma(vec4<f32>(d1.w), w_lo[7], lo[r]);
                hi[r] = fma(vec4<f32>(d1.w), w_hi[7], hi[r]);
            }
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
