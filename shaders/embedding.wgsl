// Token plus position embedding, with the token table (wte) split into row chunks because GPT-2's
// 50257 x 768 f32 table is larger than many adapters' storage binding limit. One dispatch per
// chunk covers all tokens; each touches only the tokens whose id falls in its chunk.
//
// embedding_forward:           out[b, t, :] = wte[id, :] + wpe[t, :] for every (b, t) whose
//                              id = ids[b, t] lies in [row_offset, row_offset + chunk_rows)
//                              (assigned; other positions are left untouched)
// embedding_backward_token:    dwte[id, :] += sum of dout[p, :] over the positions p of id,
//                              for the ids of this chunk (accumulated)
// embedding_backward_position: dwpe[t, :] += sum_b dout[b, t, :]                 (accumulated)
//
// The token backward reads the positions grouped by id from the host (see `token_segments` in
// src/kernels/embedding.rs): `order` lists the B*T positions sorted by id, and `segments` holds
// the number of distinct ids followed by (id, start, end) per id, naming the range
// order[start..end] of its positions. One invocation owns one (id, channel) pair and adds its
// positions in that fixed order, so there are no atomics and two runs give bitwise-identical
// gradients.
//
// Work is spread over a 2-D grid of workgroups; each invocation handles one float.

const WORKGROUP_SIZE: u32 = 256u;

struct EmbeddingParams {
    batch_size: u32,
    seq_len: u32,
    channels: u32,
    // First wte row held by the bound chunk.
    row_offset: u32,
    // Rows in the bound chunk.
    chunk_rows: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

// Each slot is declared once and shared by the entry points that use it.
@group(0) @binding(0) var<uniform> params: EmbeddingParams;
@group(0) @binding(1) var<storage, read> input: array<f32>;        // forward: wte chunk (chunk_rows, C); backward: dout (B, T, C)
@group(0) @binding(2) var<storage, read_write> output: array<f32>; // forward: out (B, T, C); token backward: dwte chunk (chunk_rows, C); position backward: dwpe (n_positions, C)
@group(0) @binding(3) var<storage, read> positions: array<u32>;    // forward: ids (B*T); token backward: order (B*T)
@group(0) @binding(4) var<storage, read> segments: array<u32>;     // token backward: (1 + 3 * count)
@group(0) @binding(5) var<storage, read> wpe: array<f32>;          // forward: (n_positions, C)

fn flat_index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * WORKGROUP_SIZE;
}

// Row of `id` in the bound chunk, or chunk_rows when the id lies outside it.
fn chunk_row(id: u32) -> u32 {
    // Unsigned wrap-around sends ids below row_offset past chunk_rows too.
    let row = id - params.row_offset;
    return select(params.chunk_rows, row, id >= params.row_offset && row < params.chunk_rows);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn embedding_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_index(gid, groups);
    let c = params.channels;
    if (i >= params.batch_size * params.seq_len * c) {
        return;
    }
    let position = i / c;
    let channel = i % c;
    let row = chunk_row(positions[position]);
    if (row == params.chunk_rows) {
        return;
    }
    let t = position % params.seq_len;
    output[i] = input[row * c + channel] + wpe[t * c + channel];
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn embedding_backward_token(@builtin(global_invocation_id) gid: vec3<u32>,
                            @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_index(gid, groups);
    let c = params.channels;
    let segment = i / c;
    let channel = i % c;
    if (segment >= segments[0]) {
        return;
    }
    let id = segments[1u + 3u * segment];
    let row = chunk_row(id);
    if (row == params.chunk_rows) {
        return;
    }
    let start = segments[2u + 3u * segment];
    let end = segments[3u + 3u * segment];
    var sum = 0.0;
    for (var k = start; k < end; k++) {
        sum += input[positions[k] * c + channel];
    }
    let dst = row * c + channel;
    output[dst] = output[dst] + sum;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn embedding_backward_position(@builtin(global_invocation_id) gid: vec3<u32>,
                               @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_index(gid, groups);
    let c = params.channels;
    let t_len = params.seq_len;
    if (i >= t_len * c) {
        return;
    }
    // i = t * C + channel indexes both dwpe and dout[0, t, channel]; batch b is b * T * C further.
    var sum = 0.0;
    for (var b = 0u; b < params.batch_size; b++) {
        sum += input[b * t_len * c + i];
    }
    output[i] = output[i] + sum;
}
