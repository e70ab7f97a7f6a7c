// Next-token cross-entropy over a vocabulary that arrives in column chunks, so that the
// (rows, vocab) logits never exist whole. The host computes one chunk of logits at a time,
// chunk = hidden @ wte[offset .. offset + cols]^T, and runs:
//
// lmloss_chunk_forward:  merges the chunk into the running (max, sum of exp(x - max)) of each
//                        row, records the target's logit when the target lies in the chunk, and
//                        on the last chunk writes losses[r] = max + log(sum) - target logit
//                        (0 for an ignored row, NaN for a target >= vocab).
// lmloss_chunk_backward: overwrites the chunk with its gradient of the mean loss,
//                        d chunk[r, j] = (exp(x - max) / sum - [offset + j == target[r]]) / count,
//                        where count = loss_out[1] comes from crossentropy_mean over `losses`
//                        (0 for ignored rows, NaN for a target >= vocab).
//
// stats (rows, 3) holds (running max, running sum, target logit) per row between the chunks and
// keeps the final pair for the backward. The forward runs one workgroup per row and merges the
// chunk in a fixed order, so two runs give bitwise-identical results. A negative target marks an
// ignored row, as in crossentropy.wgsl.

const WORKGROUP_SIZE: u32 = 256u;
// Bits of a quiet f32 NaN, written for targets >= vocab.
const QUIET_NAN_BITS: u32 = 0x7fc00000u;

struct LmLossParams {
    rows: u32,
    // Columns of this chunk.
    cols: u32,
    // Vocabulary index of the chunk's first column.
    col_offset: u32,
    vocab: u32,
    // 1 for the first chunk (assign the running pair), else 0 (merge).
    first: u32,
    // 1 for the last chunk (write the loss), else 0.
    last: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: LmLossParams;
@group(0) @binding(1) var<storage, read_write> chunk: array<f32>;  // (rows, cols): logits; the backward overwrites them with their gradient
@group(0) @binding(2) var<storage, read> targets: array<i32>;      // (rows)
@group(0) @binding(3) var<storage, read_write> stats: array<f32>;  // (rows, 3): running max, running sum, target logit
@group(0) @binding(4) var<storage, read_write> losses: array<f32>; // (rows), written by the forward on the last chunk
@group(0) @binding(5) var<storage, read> loss_out: array<f32>;     // backward: (2), [mean loss, count] from crossentropy_mean

var<workgroup> reduce_max: array<f32, WORKGROUP_SIZE>;
var<workgroup> reduce_sum: array<f32, WORKGROUP_SIZE>;

fn is_out_of_range(target_class: i32) -> bool {
    return target_class >= 0 && u32(target_class) >= params.vocab;
}

// Merges two (max, sum of exp(x - max)) pairs. A sum of 0 marks a pair that has seen nothing.
// WGSL has no includes, so this repeats merge_softmax of crossentropy.wgsl.
fn merge_pairs(a_max: f32, a_sum: f32, b_max: f32, b_sum: f32) -> vec2<f32> {
    if (b_sum == 0.0) {
        return vec2<f32>(a_max, a_sum);
    }
    if (a_sum == 0.0) {
        return vec2<f32>(b_max, b_sum);
    }
    let new_max = max(a_max, b_max);
    return vec2<f32>(new_max, a_sum * exp(a_max - new_max) + b_sum * exp(b_max - new_max));
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn lmloss_chunk_forward(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) groups: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * groups.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (row >= params.rows) {
        return;
    }
    let base = row * params.cols;
    var running_max = 0.0;
    var running_sum = 0.0;
    if (lid < params.cols) {
        running_max = chunk[base + lid];
        running_sum = 1.0;
    }
    for (var c = lid + WORKGROUP_SIZE; c < params.cols; c += WORKGROUP_SIZE) {
        let x = chunk[base + c];
        if (x > running_max) {
            running_sum = running_sum * exp(running_max - x) + 1.0;
            running_max = x;
        } else {
            running_sum += exp(x - running_max);
        }
    }
    reduce_max[lid] = running_max;
    reduce_sum[lid] = running_sum;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let merged = merge_pairs(reduce_max[lid], reduce_sum[lid], reduce_max[lid + stride], reduce_sum[lid + stride]);
            reduce_max[lid] = merged.x;
            reduce_sum[lid] = merged.y;
        }
        workgroupBarrier();
    }
    if (lid != 0u) {
        return;
    }
    var pair = vec2<f32>(reduce_max[0], reduce_sum[0]);
    if (params.first == 0u) {
        pair = merge_pairs(stats[3u * row], stats[3u * row + 1u], pair.x, pair.y);
    }
    stats[3u * row] = pair.x;
    stats[3u * row + 1u] = pair.y;
    let target_class = targets[row];
    if (target_class >= 0 && u32(target_class) >= params.col_offset && u32(target_class) < params.col_offset + params.cols) {
        stats[3u * row + 2u] = chunk[base + u32(target_class) - params.col_offset];
    }
    if (params.last == 1u) {
        var loss = 0.0;
        if (is_out_of_range(target_class)) {
            loss = bitcast<f32>(QUIET_NAN_BITS);
        } else if (target_class >= 0) {
            loss = pair.x + log(pair.y) - stats[3u * row + 2u];
        }
        losses[row] = loss;
    }
}

// Each invocation handles COLUMNS_PER_INVOCATION consecutive columns of one row, so that the
// row's statistics and target are read once per group instead of once per element.
const COLUMNS_PER_INVOCATION: u32 = 4u;

@compute @workgroup_size(WORKGROUP_SIZE)
fn lmloss_chunk_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                         @builtin(num_workgroups) groups: vec3<u32>) {
    let group = gid.x + gid.y * groups.x * WORKGROUP_SIZE;
    let groups_per_row = (params.cols + COLUMNS_PER_INVOCATION - 1u) / COLUMNS_PER_INVOCATION;
    if (group >= params.rows * groups_per_row) {
        return;
    }
    let row = group / groups_per_row;
    let first_col = (group % groups_per_row) * COLUMNS_PER_INVOCATION;
    let target_class = targets[row];
    let count = loss_out[1];
    // d(mean loss)/d(loss[r]) = 1 / count; ignored rows have no gradient.
    var inverse_count = 0.0;
    if (target_class >= 0 && count > 0.0) {
        inverse_count = 1.0 / count;
    }
    let row_max = stats[3u * row];
    let row_sum = stats[3u * row + 1u];
    let invalid = is_out_of_range(target_class);
    let last_col = min(first_col + COLUMNS_PER_INVOCATION, params.cols);
    for (var col = first_col; col < last_col; col++) {
        let i = row * params.cols + col;
        let probability = exp(chunk[i] - row_max) / row_sum;
        let onehot = select(0.0, 1.0, i32(params.col_offset + col) == target_class);
        chunk[i] = select((probability - onehot) * inverse_count, bitcast<f32>(QUIET_NAN_BITS), invalid);
    }
}
