// Inverted dropout with a counter-based random stream, so the backward recomputes the mask
// instead of storing it.
//
// dropout_forward:  out = active ? keep(i) * inp / (1 - p) : inp                 (assigned)
// dropout_backward: dinp (+)= active ? keep(i) * dout / (1 - p) : dout
//
// keep(i) is 1 when hash(i, salt, seed) >= threshold, threshold = round(p * 2^32), else 0.
// `seed` holds (seed of this step, active): the host writes a new seed for every training
// micro-batch and active 0 for evaluation, so one graph serves both. `salt` tells the dropout
// sites of one graph apart. The same seed, salt and index always give the same mask, on every
// adapter, because the hash uses only 32-bit integer operations.
//
// Each invocation handles one float; work is spread over a 2-D grid of workgroups so that N may
// exceed 65535 * WORKGROUP_SIZE.

const WORKGROUP_SIZE: u32 = 256u;

struct DropoutParams {
    // N, floats in each tensor.
    len: u32,
    // Elements whose hash is below this are dropped.
    threshold: u32,
    // 1 / (1 - p), the factor on kept elements.
    scale: f32,
    // Distinguishes the dropout sites of one graph.
    salt: u32,
    // 1 adds into dinp, 0 overwrites it (backward only).
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: DropoutParams;
@group(0) @binding(1) var<storage, read> seed: array<u32>;  // (2): seed of the step, active

// An integer permutation with good avalanche: a multiply-add step followed by an
// output permutation (xorshift by a data-dependent amount, multiply, xorshift).
fn permute(x: u32) -> u32 {
    let state = x * 747796405u + 2891336453u;
    let word = ((state >> ((state >> 28u) + 4u)) ^ state) * 277803737u;
    return (word >> 22u) ^ word;
}

fn kept(i: u32) -> bool {
    let stream = permute(seed[0] ^ permute(params.salt));
    return permute(i ^ stream) >= params.threshold;
}

fn element(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * WORKGROUP_SIZE;
}

@group(0) @binding(2) var<storage, read> inp: array<f32>;         // (N)
@group(0) @binding(3) var<storage, read_write> out: array<f32>;   // (N), assigned

@compute @workgroup_size(WORKGROUP_SIZE)
fn dropout_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) groups: vec3<u32>) {
    let i = element(gid, groups);
    if (i >= params.len) {
        return;
    }
    var value = inp[i];
    if (seed[1] == 1u) {
        value = select(0.0, value * params.scale, kept(i));
    }
    out[i] = value;
}

@group(0) @binding(2) var<storage, read> dout: array<f32>;         // (N)
@group(0) @binding(3) var<storage, read_write> dinp: array<f32>;   // (N), assigned or accumulated

@compute @workgroup_size(WORKGROUP_SIZE)
fn dropout_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(num_workgroups) groups: vec3<u32>) {
    let i = element(gid, groups);
    if (i >= params.len) {
        return;
    }
    var grad = dout[i];
    if (seed[1] == 1u) {
        grad = select(0.0, grad * params.scale, kept(i));
    }
    if (params.accumulate == 1u) {
        dinp[i] = dinp[i] + grad;
    } else {
        dinp[i] = grad;
    }
}
