// Attention for one new position during text generation, over a cache of earlier keys and values.
//
// decode_attention: for the token at position pos (read from `position`, written by the host
// before each step), with qkv (3C) the c_attn output of that token (q | k | v, head h at channels
// h*HS..(h+1)*HS of each part) and scale = 1 / sqrt(HS):
//   k_cache[pos, h, :] = k[h, :],  v_cache[pos, h, :] = v[h, :]             (assigned)
//   scores[h, t]       = scale * sum_d q[h, d] * k_cache[t, h, d]            for t = 0..=pos
//   p[h, t]            = softmax(scores[h, 0..=pos])[t]
//   out[h, :]          = sum_{t<=pos} p[h, t] * v_cache[t, h, :]             (assigned)
// This is the last row of causal attention (shaders/attention.wgsl) over the pos + 1 tokens seen
// so far, without recomputing the earlier rows. Rows of the caches after pos are never read.
//
// One workgroup runs one head. It writes the head's slice of the caches, waits on a storage
// barrier so every invocation sees that slice, computes the scores of keys t = lid, lid + WG, ...
// into storage scratch (up to n_positions keys do not fit in workgroup memory), reduces the
// maximum and the sum of exponentials over the invocations, and finally each invocation sums the
// values of its channels over the keys in index order. Every reduction runs in a fixed order, so
// two runs give bitwise-identical results.
//
// The host guarantees pos < max_positions; the kernel clamps pos to the last cache row only so
// that no access can leave the buffers.

const WORKGROUP_SIZE: u32 = 64u;

struct DecodeParams {
    // C, channels of the model.
    channels: u32,
    // NH, attention heads; one workgroup per head.
    num_heads: u32,
    // HS = C / NH.
    head_size: u32,
    // Rows of the caches and of each head's scores (the model's n_positions).
    max_positions: u32,
    // 1 / sqrt(HS), the scaled dot-product factor.
    scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: DecodeParams;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;            // (3C) of the new token
@group(0) @binding(2) var<storage, read> position: array<u32>;       // (1): pos
@group(0) @binding(3) var<storage, read_write> k_cache: array<f32>;  // (max_positions, C), row pos assigned
@group(0) @binding(4) var<storage, read_write> v_cache: array<f32>;  // (max_positions, C), row pos assigned
@group(0) @binding(5) var<storage, read_write> scores: array<f32>;   // (NH, max_positions), scratch
@group(0) @binding(6) var<storage, read_write> out: array<f32>;      // (C), assigned

// Per-invocation maximum, then per-invocation sum of exponentials.
var<workgroup> partial: array<f32, WORKGROUP_SIZE>;

// scale * (q . k_t) for the head whose channels start at `head`.
fn key_score(head: u32, t: u32) -> f32 {
    let key_row = t * params.channels + head;
    var dot = 0.0;
    for (var d = 0u; d < params.head_size; d++) {
        dot += qkv[head + d] * k_cache[key_row + d];
    }
    return dot * params.scale;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn decode_attention(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(local_invocation_index) lid: u32) {
    let h = wid.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (h >= params.num_heads) {
        return;
    }
    let c = params.channels;
    let head = h * params.head_size;
    let pos = min(position[0], params.max_positions - 1u);
    let keys = pos + 1u;

    let cache_row = pos * c + head;
    for (var d = lid; d < params.head_size; d += WORKGROUP_SIZE) {
        k_cache[cache_row + d] = qkv[c + head + d];
        v_cache[cache_row + d] = qkv[2u * c + head + d];
    }
    storageBarrier();

    // Invocation lid handles keys lid, lid + WG, ...; only invocations with lid < keys have any,
    // and only their maxima are merged below.
    let score_row = h * params.max_positions;
    var lane_max = 0.0;
    for (var t = lid; t < keys; t += WORKGROUP_SIZE) {
        let score = key_score(head, t);
        scores[score_row + t] = score;
        lane_max = select(max(lane_max, score), score, t == lid);
    }
    partial[lid] = lane_max;
    workgroupBarrier();
    let lanes = min(keys, WORKGROUP_SIZE);
    var row_max = partial[0];
    for (var i = 1u; i < lanes; i++) {
        row_max = max(row_max, partial[i]);
    }
    // Every invocation has read the maxima before `partial` is overwritten with sums.
    workgroupBarrier();

    // The maximum is subtracted so that exp cannot overflow. Each invocation rewrites the scores
    // it wrote itself, so no barrier is needed between the two loops.
    var lane_sum = 0.0;
    for (var t = lid; t < keys; t += WORKGROUP_SIZE) {
        let weight = exp(scores[score_row + t] - row_max);
        scores[score_row + t] = weight;
        lane_sum += weight;
    }
    partial[lid] = lane_sum;
    storageBarrier();
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < lanes; i++) {
        total += partial[i];
    }
    let inverse_total = 1.0 / total;

    for (var d = lid; d < params.head_size; d += WORKGROUP_SIZE) {
        var sum = 0.0;
        for (var t = 0u; t < keys; t++) {
            sum += scores[score_row + t] * v_cache[t * c + head + d];
        }
        out[head + d] = sum * inverse_total;
    }
}

// Matrix-vector products of one token's linear layers: the blocks' Conv1D layers and the LM
// head over the rows of wte. With x = matvec_input (K), W = matvec_weight, b = matvec_bias:
//   decode_matvec_in_out: out[out_offset + n] = sum_k x[k] * W[k, n] (+ b[n])   W (K, N), Conv1D
//   decode_matvec_out_in: out[out_offset + n] = sum_k W[n, k] * x[k] (+ b[n])   W (N, K), nn.Linear
//                         and the tied LM head
// out is assigned. K must be a multiple of 4, and so must N for decode_matvec_in_out, so that
// every row is read as whole vec4s; the launcher uses the matmul kernels for other shapes.
//
// A token reads each weight once, so these products are bound by memory traffic. The matmul
// kernels compute tiles of 16 or 32 rows, of which one token fills one, and so do 16 to 32 times
// the work. Here each invocation computes a few outputs over the whole reduction with vec4 loads:
// decode_matvec_in_out takes MATVEC_QUADS groups of four adjacent columns, and
// decode_matvec_out_in takes MATVEC_ROWS rows of W and uses each loaded vec4 of x for all of
// them. Every sum runs in a fixed order, so results are deterministic.
// NOTE: tuned for CPU drivers (lavapipe), where a few long-running invocations per core are cheap.
// A GPU would want more parallelism per output, such as a workgroup per group of outputs that
// splits the reduction.

const MATVEC_WORKGROUP_SIZE: u32 = 32u;
// Groups of four adjacent columns per invocation of decode_matvec_in_out (sum0 and sum1).
const MATVEC_QUADS: u32 = 2u;
// Rows of W per invocation of decode_matvec_out_in (row0 to row3).
const MATVEC_ROWS: u32 = 4u;

struct MatvecParams {
    // K, the reduction length.
    inner: u32,
    // N, the outputs computed.
    cols: u32,
    // Index of matvec_out that receives output 0.
    out_offset: u32,
    // 1 adds matvec_bias[n] to output n.
    has_bias: u32,
}

@group(0) @binding(0) var<uniform> matvec_params: MatvecParams;
@group(0) @binding(1) var<storage, read> matvec_input: array<vec4<f32>>;  // (K)
@group(0) @binding(2) var<storage, read> matvec_weight: array<vec4<f32>>; // (K, N) or (N, K)
@group(0) @binding(3) var<storage, read> matvec_bias: array<f32>;         // (N), read when has_bias is 1
@group(0) @binding(4) var<storage, read_write> matvec_out: array<f32>;    // (out_offset + N), assigned

fn matvec_invocation(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * MATVEC_WORKGROUP_SIZE;
}

fn store_output(n: u32, value: f32) {
    var sum = value;
    if (matvec_params.has_bias == 1u) {
        sum += matvec_bias[n];
    }
    matvec_out[matvec_params.out_offset + n] = sum;
}

@compute @workgroup_size(MATVEC_WORKGROUP_SIZE)
fn decode_matvec_in_out(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) groups: vec3<u32>) {
    let quads = matvec_params.cols / 4u;
    let first = matvec_invocation(gid, groups) * MATVEC_QUADS;
    if (first >= quads) {
        return;
    }
    // The second group is clamped to the last one at the right edge; its result is not stored.
    let second = min(first + 1u, quads - 1u);
    var sum0 = vec4<f32>(0.0);
    var sum1 = vec4<f32>(0.0);
    for (var k4 = 0u; k4 < matvec_params.inner / 4u; k4++) {
        let x = matvec_input[k4];
        // Row k of W starts at vec4 index k * quads.
        let row = k4 * 4u * quads;
        sum0 += x.x * matvec_weight[row + first];
        sum1 += x.x * matvec_weight[row + second];
        sum0 += x.y * matvec_weight[row + quads + first];
        sum1 += x.y * matvec_weight[row + quads + second];
        sum0 += x.z * matvec_weight[row + 2u * quads + first];
        sum1 += x.z * matvec_weight[row + 2u * quads + second];
        sum0 += x.w * matvec_weight[row + 3u * quads + first];
        sum1 += x.w * matvec_weight[row + 3u * quads + second];
    }
    for (var j = 0u; j < 4u; j++) {
        store_output(first * 4u + j, sum0[j]);
    }
    if (first + 1u < quads) {
        for (var j = 0u; j < 4u; j++) {
            store_output(second * 4u + j, sum1[j]);
        }
    }
}

@compute @workgroup_size(MATVEC_WORKGROUP_SIZE)
fn decode_matvec_out_in(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) groups: vec3<u32>) {
    let rows = matvec_params.cols;
    let first = matvec_invocation(gid, groups) * MATVEC_ROWS;
    if (first >= rows) {
        return;
    }
    let row_quads = matvec_params.inner / 4u;
    // Rows past the last are clamped to it; their results are not stored.
    let row0 = first * row_quads;
    let row1 = min(first + 1u, rows - 1u) * row_quads;
    let row2 = min(first + 2u, rows - 1u) * row_quads;
    let row3 = min(first + 3u, rows - 1u) * row_quads;
    var sums = vec4<f32>(0.0);
    for (var k4 = 0u; k4 < row_quads; k4++) {
        let x = matvec_input[k4];
        sums += vec4<f32>(dot(matvec_weight[row0 + k4], x), dot(matvec_weight[row1 + k4], x),
                          dot(matvec_weight[row2 + k4], x), dot(matvec_weight[row3 + k4], x));
    }
    for (var j = 0u; j < MATVEC_ROWS; j++) {
        if (first + j < rows) {
            store_output(first + j, sums[j]);
        }
    }
}
