// Softmax cross-entropy: the negative log-likelihood of each row's target class.
//
// crossentropy_forward:  losses[r] = logsumexp(logits[r, :]) - logits[r, target[r]]  (assigned)
// crossentropy_mean:     loss_out = [sum of losses / count, count] over rows that are not ignored
//                        (assigned; the mean is 0 when every row is ignored)
// crossentropy_backward: dlogits[r, c] = (softmax(logits[r])[c] - [c == target[r]]) / count
//                        (assigned; 0 for ignored rows)
//
// A row is ignored when its target is negative. Its loss and gradient are 0 and it is not
// counted. A target >= classes names no logit, so its row gets a NaN loss and NaN gradients: an
// invalid label shows up as a non-finite loss instead of training on a wrong class. logsumexp is
// evaluated with the row maximum subtracted so that exp cannot overflow.
//
// forward and backward run one workgroup per row. Each invocation keeps a running
// (max, sum of exp(x - max)) over a strided slice of the row in one pass, rescaling the sum
// whenever the maximum grows, and a tree over the workgroup merges the pairs. The order is fixed,
// so two runs give bitwise-identical results.

const WORKGROUP_SIZE: u32 = 256u;
// Bits of a quiet f32 NaN, written for targets >= classes.
const QUIET_NAN_BITS: u32 = 0x7fc00000u;

struct CrossEntropyParams {
    rows: u32,
    classes: u32,
    _pad0: u32,
    _pad1: u32,
}

// Each slot is declared once and shared by the entry points that use it.
@group(0) @binding(0) var<uniform> params: CrossEntropyParams;
@group(0) @binding(1) var<storage, read> input: array<f32>;        // forward, backward: logits (rows, classes); mean: losses (rows)
@group(0) @binding(2) var<storage, read> targets: array<i32>;      // (rows)
@group(0) @binding(3) var<storage, read_write> output: array<f32>; // forward: losses (rows); mean: loss_out (2); backward: dlogits (rows, classes)
@group(0) @binding(4) var<storage, read> loss_out: array<f32>;     // backward: (2), [mean loss, count] from crossentropy_mean

// Per-invocation values of a workgroup reduction: (running max, sum of exp(x - max)) for the
// row kernels, (sum of losses, count) for the mean.
var<workgroup> reduce_first: array<f32, WORKGROUP_SIZE>;
var<workgroup> reduce_second: array<f32, WORKGROUP_SIZE>;

fn is_counted(target_class: i32) -> bool {
    return target_class >= 0;
}

fn is_out_of_range(target_class: i32) -> bool {
    return target_class >= 0 && u32(target_class) >= params.classes;
}

// Merges two (max, sum of exp(x - max)) pairs. A sum of 0 marks a pair that has seen no element;
// any other pair has a sum of at least 1, from its own maximum.
fn merge_softmax(a_max: f32, a_sum: f32, b_max: f32, b_sum: f32) -> vec2<f32> {
    if (b_sum == 0.0) {
        return vec2<f32>(a_max, a_sum);
    }
    if (a_sum == 0.0) {
        return vec2<f32>(b_max, b_sum);
    }
    let new_max = max(a_max, b_max);
    return vec2<f32>(new_max, a_sum * exp(a_max - new_max) + b_sum * exp(b_max - new_max));
}

// Returns (max, sum of exp(x - max)) over logits row `row`, the same value in every invocation.
// Every invocation of the workgroup must call it.
fn row_softmax_stats(row: u32, lid: u32) -> vec2<f32> {
    let base = row * params.classes;
    // The invocation's first element starts the pair; an invocation with none keeps sum 0.
    var running_max = 0.0;
    var running_sum = 0.0;
    if (lid < params.classes) {
        running_max = input[base + lid];
        running_sum = 1.0;
    }
    for (var c = lid + WORKGROUP_SIZE; c < params.classes; c += WORKGROUP_SIZE) {
        let x = input[base + c];
        if (x > running_max) {
            // Rescale the sum to the new maximum.
            running_sum = running_sum * exp(running_max - x) + 1.0;
            running_max = x;
        } else {
            running_sum += exp(x - running_max);
        }
    }
    reduce_first[lid] = running_max;
    reduce_second[lid] = running_sum;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            let merged = merge_softmax(reduce_first[lid], reduce_second[lid],
                                       reduce_first[lid + stride], reduce_second[lid + stride]);
            reduce_first[lid] = merged.x;
            reduce_second[lid] = merged.y;
        }
        workgroupBarrier();
    }
    // Each entry point calls this once and writes no workgroup memory afterwards, so slot 0 can
    // be read without another barrier.
    return vec2<f32>(reduce_first[0], reduce_second[0]);
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn crossentropy_forward(@builtin(workgroup_id) wid: vec3<u32>,
                        @builtin(num_workgroups) groups: vec3<u32>,
                        @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * groups.x;
    // Uniform across the workgroup, so the barriers below stay in uniform control flow.
    if (row >= params.rows) {
        return;
    }
    let stats = row_softmax_stats(row, lid);
    if (lid == 0u) {
        let target_class = targets[row];
        var loss = 0.0;
        if (is_out_of_range(target_class)) {
            loss = bitcast<f32>(QUIET_NAN_BITS);
        } else if (is_counted(target_class)) {
            // logsumexp = max + log(sum of exp(x - max)).
            loss = stats.x + log(stats.y) - input[row * params.classes + u32(target_class)];
        }
        output[row] = loss;
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn crossentropy_mean(@builtin(local_invocation_index) lid: u32) {
    var sum = 0.0;
    var count = 0.0;
    for (var r = lid; r < params.rows; r += WORKGROUP_SIZE) {
        if (is_counted(targets[r])) {
            sum += input[r];
            count += 1.0;
        }
    }
    reduce_first[lid] = sum;
    reduce_second[lid] = count;
    workgroupBarrier();
    for (var stride = WORKGROUP_SIZE / 2u; stride > 0u; stride = stride / 2u) {
        if (lid < stride) {
            reduce_first[lid] = reduce_first[lid] + reduce_first[lid + stride];
            reduce_second[lid] = reduce_second[lid] + reduce_second[lid + stride];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let total_count = reduce_second[0];
        output[0] = select(0.0, reduce_first[0] / total_count, total_count > 0.0);
        output[1] = total_count;
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn crossentropy_backward(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(num_workgroups) groups: vec3<u32>,
                         @builtin(local_invocation_index) lid: u32) {
    let row = wid.x + wid.y * groups.x;
    if (row >= params.rows) {
        return;
    }
    let stats = row_softmax_stats(row, lid);
    let target_class = targets[row];
    let count = loss_out[1];
    // d(mean loss)/d(loss[r]) = 1 / count; an ignored row, or a batch with no counted row, has no
    // gradient.
    var inverse_count = 0.0;
    if (is_counted(target_class) && count > 0.0) {
        inverse_count = 1.0 / count;
    }
    let inverse_sum = 1.0 / stats.y;
    let invalid = is_out_of_range(target_class);
    let base = row * params.classes;
    for (var c = lid; c < params.classes; c += WORKGROUP_SIZE) {
        let probability = exp(input[base + c] - stats.x) * inverse_sum;
        let onehot = select(0.0, 1.0, i32(c) == target_class);
        output[base + c] = select((probability - onehot) * inverse_count, bitcast<f32>(QUIET_NAN_BITS), invalid);
    }
}
