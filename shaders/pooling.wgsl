// Pooling at the last real token of each sequence (GPT-2 sequence classification).
//
// pooling_forward:  pooled[b, :] = hidden[b, last(b), :]                          (assigned)
// pooling_backward: dhidden[b, last(b), :] (+)= dpooled[b, :]
//   With accumulate = 0 every other position of dhidden is set to 0, so dhidden is assigned
//   whole. With accumulate = 1 only the pooled positions are touched.
//
// last(b) = lengths[b] - 1. Batches are right-padded, so the last real token is found from the
// stored length. A length outside 1..=T is clamped into that range so that no read or write
// leaves the row.
//
// Work is spread over a 2-D grid of workgroups; each invocation handles one float.

const WORKGROUP_SIZE: u32 = 256u;

struct PoolingParams {
    batch_size: u32,
    seq_len: u32,
    channels: u32,
    // 1: add into dhidden at the pooled positions; 0: assign all of dhidden.
    accumulate: u32,
}

// Each slot is declared once and shared by both entry points.
@group(0) @binding(0) var<uniform> params: PoolingParams;
@group(0) @binding(1) var<storage, read> input: array<f32>;        // forward: hidden (B, T, C); backward: dpooled (B, C)
@group(0) @binding(2) var<storage, read> lengths: array<u32>;      // (B)
@group(0) @binding(3) var<storage, read_write> output: array<f32>; // forward: pooled (B, C); backward: dhidden (B, T, C)

fn flat_index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * WORKGROUP_SIZE;
}

fn last_position(b: u32) -> u32 {
    return clamp(lengths[b], 1u, params.seq_len) - 1u;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn pooling_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_index(gid, groups);
    let c = params.channels;
    if (i >= params.batch_size * c) {
        return;
    }
    let b = i / c;
    let channel = i % c;
    output[i] = input[(b * params.seq_len + last_position(b)) * c + channel];
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn pooling_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(num_workgroups) groups: vec3<u32>) {
    let i = flat_index(gid, groups);
    let c = params.channels;
    let t_len = params.seq_len;
    if (params.accumulate == 1u) {
        // One invocation per element of dpooled (B, C).
        if (i >= params.batch_size * c) {
            return;
        }
        let b = i / c;
        let dst = (b * t_len + last_position(b)) * c + i % c;
        output[dst] = output[dst] + input[i];
    } else {
        // One invocation per element of dhidden (B, T, C).
        if (i >= params.batch_size * t_len * c) {
            return;
        }
        let channel = i % c;
        let t = (i / c) % t_len;
        let b = i / (c * t_len);
        output[i] = select(0.0, input[b * c + channel], t == last_position(b));
    }
}
