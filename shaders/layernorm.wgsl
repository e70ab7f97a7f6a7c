// Layer normalization over the last dimension, as torch.nn.LayerNorm computes it.
//
// layernorm_forward:         out = (x - mean) * rstd * weight + bias, per row of C channels, with
//                            mean = sum(x) / C and rstd = 1 / sqrt(sum((x - mean)^2) / C + eps)
//                            (biased variance). out, mean and rstd are assigned.
// layernorm_backward_input:  with xhat = (x - mean) * rstd and g = dout * weight,
//                            dinp = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat)),
//                            assigned or accumulated (params.accumulate).
// layernorm_backward_params: dweight += sum_n dout * xhat and dbias += sum_n dout
//                            (params.accumulate is 1 for these parameter gradients).
//
// The row entry points run one invocation per row, and the parameter gradients run one invocation
// per four channels and sum the rows in order, so every result is deterministic without atomics.
// When C is a multiple of 4, every row starts on a 16-byte boundary and rows are read as vec4s.
// Otherwise the same loops read single floats through the vec4 arrays.
// NOTE: with one invocation per row, neighbouring invocations read addresses C floats apart. That
// suits CPU drivers, but a GPU variant would spread each row over a workgroup.
//
// Binding slots are shared by the entry points, each slot with one declaration:
//   slot  access      forward    backward_input  backward_params
//   1     read_write  out        dinp            dweight
//   2     read_write  mean       mean (read)     mean (read)
//   3     read_write  rstd       rstd (read)     rstd (read)
//   4     read        inp        inp             inp
//   5     read        weight     weight          (unused)
//   6     read        bias       dout            dout
//   7     read_write  -          -               dbias

const WORKGROUP_SIZE: u32 = 64u;

struct LayernormParams {
    // N, rows normalized independently.
    rows: u32,
    // C, channels per row.
    channels: u32,
    // Added to the variance before the square root (GPT-2's layer_norm_epsilon).
    eps: f32,
    // 1 adds into the gradient outputs, 0 overwrites them.
    accumulate: u32,
}

@group(0) @binding(0) var<uniform> params: LayernormParams;
@group(0) @binding(1) var<storage, read_write> result: array<vec4<f32>>; // (N, C) out or dinp, or (C) dweight
@group(0) @binding(2) var<storage, read_write> mean: array<f32>;         // (N)
@group(0) @binding(3) var<storage, read_write> rstd: array<f32>;         // (N)
@group(0) @binding(4) var<storage, read> inp: array<vec4<f32>>;          // (N, C)
@group(0) @binding(5) var<storage, read> weight: array<vec4<f32>>;       // (C)
@group(0) @binding(6) var<storage, read> bias_or_dout: array<vec4<f32>>; // (C) bias, or (N, C) dout
@group(0) @binding(7) var<storage, read_write> dbias: array<vec4<f32>>;  // (C)

fn inp_at(index: u32) -> f32 {
    return inp[index >> 2u][index & 3u];
}

fn weight_at(index: u32) -> f32 {
    return weight[index >> 2u][index & 3u];
}

fn bias_or_dout_at(index: u32) -> f32 {
    return bias_or_dout[index >> 2u][index & 3u];
}

// Writes or adds `value` to float `index` of the result.
fn store_result(index: u32, value: f32) {
    var v = value;
    if (params.accumulate == 1u) {
        v += result[index >> 2u][index & 3u];
    }
    result[index >> 2u][index & 3u] = v;
}

fn store_result4(quad: u32, value: vec4<f32>) {
    var v = value;
    if (params.accumulate == 1u) {
        v += result[quad];
    }
    result[quad] = v;
}

fn horizontal_sum(v: vec4<f32>) -> f32 {
    return (v.x + v.y) + (v.z + v.w);
}

// Invocation index over the 2-D grid that spreads 1-D work past 65535 workgroups per dimension.
fn flat_index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * WORKGROUP_SIZE;
}

fn rows_are_vec4() -> bool {
    return params.channels % 4u == 0u;
}

// Forward for one row, C a multiple of 4. Two passes: the mean first, then the variance of
// x - mean, which avoids the cancellation of E[x^2] - E[x]^2 when |mean| is large.
fn forward_row_vec4(row: u32) {
    let quads = params.channels / 4u;
    let base = row * quads;
    var sum = vec4<f32>();
    for (var q = 0u; q < quads; q++) {
        sum += inp[base + q];
    }
    let m = horizontal_sum(sum) / f32(params.channels);
    var squares = vec4<f32>();
    for (var q = 0u; q < quads; q++) {
        let d = inp[base + q] - m;
        squares = fma(d, d, squares);
    }
    let s = inverseSqrt(horizontal_sum(squares) / f32(params.channels) + params.eps);
    for (var q = 0u; q < quads; q++) {
        result[base + q] = (inp[base + q] - m) * s * weight[q] + bias_or_dout[q];
    }
    mean[row] = m;
    rstd[row] = s;
}

fn forward_row_scalar(row: u32) {
    let c = params.channels;
    let base = row * c;
    var sum = 0.0;
    for (var i = 0u; i < c; i++) {
        sum += inp_at(base + i);
    }
    let m = sum / f32(c);
    var squares = 0.0;
    for (var i = 0u; i < c; i++) {
        let d = inp_at(base + i) - m;
        squares = fma(d, d, squares);
    }
    let s = inverseSqrt(squares / f32(c) + params.eps);
    for (var i = 0u; i < c; i++) {
        let index = base + i;
        result[index >> 2u][index & 3u] = (inp_at(index) - m) * s * weight_at(i) + bias_or_dout_at(i);
    }
    mean[row] = m;
    rstd[row] = s;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn layernorm_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) groups: vec3<u32>) {
    let row = flat_index(gid, groups);
    if (row >= params.rows) {
        return;
    }
    if (rows_are_vec4()) {
        forward_row_vec4(row);
    } else {
        forward_row_scalar(row);
    }
}

// Input gradient for one row, C a multiple of 4: the first pass sums g and g * xhat, the
// second writes dinp.
fn backward_row_vec4(row: u32) {
    let quads = params.channels / 4u;
    let base = row * quads;
    let m = mean[row];
    let s = rstd[row];
    var sum_g = vec4<f32>();
    var sum_gx = vec4<f32>();
    for (var q = 0u; q < quads; q++) {
        let g = bias_or_dout[base + q] * weight[q];
        sum_g += g;
        sum_gx = fma(g, (inp[base + q] - m) * s, sum_gx);
    }
    let mean_g = horizontal_sum(sum_g) / f32(params.channels);
    let mean_gx = horizontal_sum(sum_gx) / f32(params.channels);
    for (var q = 0u; q < quads; q++) {
        let g = bias_or_dout[base + q] * weight[q];
        let xhat = (inp[base + q] - m) * s;
        store_result4(base + q, s * (g - mean_g - xhat * mean_gx));
    }
}

fn backward_row_scalar(row: u32) {
    let c = params.channels;
    let base = row * c;
    let m = mean[row];
    let s = rstd[row];
    var sum_g = 0.0;
    var sum_gx = 0.0;
    for (var i = 0u; i < c; i++) {
        let g = bias_or_dout_at(base + i) * weight_at(i);
        sum_g += g;
        sum_gx = fma(g, (inp_at(base + i) - m) * s, sum_gx);
    }
    let mean_g = sum_g / f32(c);
    let mean_gx = sum_gx / f32(c);
    for (var i = 0u; i < c; i++) {
        let g = bias_or_dout_at(base + i) * weight_at(i);
        let xhat = (inp_at(base + i) - m) * s;
        store_result(base + i, s * (g - mean_g - xhat * mean_gx));
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn layernorm_backward_input(@builtin(global_invocation_id) gid: vec3<u32>,
                            @builtin(num_workgroups) groups: vec3<u32>) {
    let row = flat_index(gid, groups);
    if (row >= params.rows) {
        return;
    }
    if (rows_are_vec4()) {
        backward_row_vec4(row);
    } else {
        backward_row_scalar(row);
    }
}

// dweight[c] += sum_n dout[n, c] * xhat[n, c] and dbias[c] += sum_n dout[n, c] for four channels
// c0..c0+3 per invocation, rows summed in order.
@compute @workgroup_size(WORKGROUP_SIZE)
fn layernorm_backward_params(@builtin(global_invocation_id) gid: vec3<u32>,
                             @builtin(num_workgroups) groups: vec3<u32>) {
    let quad = flat_index(gid, groups);
    let c0 = quad * 4u;
    if (c0 >= params.channels) {
        return;
    }
    var dw = vec4<f32>();
    var db = vec4<f32>();
    if (rows_are_vec4()) {
        let quads = params.channels / 4u;
        for (var n = 0u; n < params.rows; n++) {
            let d = bias_or_dout[n * quads + quad];
            let xhat = (inp[n * quads + quad] - mean[n]) * rstd[n];
            dw = fma(d, xhat, dw);
            db += d;
        }
    } else {
        // Channels past the last one are clamped to it and their sums discarded.
        let last = params.channels - 1u;
        let cols = vec4<u32>(c0, min(c0 + 1u, last), min(c0 + 2u, last), min(c0 + 3u, last));
        for (var n = 0u; n < params.rows; n++) {
            let base = n * params.channels;
            let d = vec4<f32>(
                bias_or_dout_at(base + cols.x),
                bias_or_dout_at(base + cols.y),
                bias_or_dout_at(base + cols.z),
                bias_or_dout_at(base + cols.w),
            );
            let x = vec4<f32>(
                inp_at(base + cols.x),
                inp_at(base + cols.y),
                inp_at(base + cols.z),
                inp_at(base + cols.w),
            );
            dw = fma(d, (x - mean[n]) * rstd[n], dw);
            db += d;
        }
    }
    for (var j = 0u; j < 4u; j++) {
        let c = c0 + j;
        if (c < params.channels) {
            var w = dw[j];
            var b = db[j];
            if (params.accumulate == 1u) {
                w += result[c >> 2u][c & 3u];
                b += dbias[c >> 2u][c & 3u];
            }
            result[c >> 2u][c & 3u] = w;
            dbias[c >> 2u][c & 3u] = b;
        }
    }
}
