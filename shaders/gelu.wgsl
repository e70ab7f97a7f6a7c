// GELU with GPT-2's tanh approximation (`gelu_new` in Hugging Face transformers).
//
// gelu_forward:  out = 0.5 * x * (1 + tanh(u)), u = sqrt(2/pi) * (x + 0.044715 * x^3)   (assigned)
// gelu_backward: dinp (+)= dout * gelu'(x), where with t = tanh(u)
//                gelu'(x) = 0.5 * (1 + t) + 0.5 * x * (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
//
// Both use 0.5 * (1 + tanh(u)) = sigmoid(2u) and 0.5 * (1 - tanh(u)) = sigmoid(-2u), so
//   gelu(x)  = x * s
//   gelu'(x) = s + 2 * x * s * (1 - s) * sqrt(2/pi) * (1 + 3 * 0.044715 * x^2),  s = sigmoid(2u).
// Evaluating s and 1 - s from exp(-|2u|) keeps both accurate in the tails, and exp never
// overflows. Computed from a rounded f32 tanh, 1 + tanh(u) keeps few or no correct digits once
// u < -8 (tanh(u) is then within 2.3e-7 of -1), which loses gradients near 1e-6 at x = -5.
//
// Each invocation handles one vec4 (four consecutive floats), and the invocation that has the
// last partial vec4 handles its floats one by one. Work is spread over a 2-D grid of workgroups so that
// N may exceed 65535 * WORKGROUP_SIZE * 4.

const WORKGROUP_SIZE: u32 = 256u;
const SQRT_2_OVER_PI: f32 = 0.7978845608;
const CUBIC_COEFFICIENT: f32 = 0.044715;

struct GeluParams {
    // N, floats in each tensor.
    len: u32,
    // 1 adds into dinp, 0 overwrites it.
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: GeluParams;
@group(0) @binding(1) var<storage, read_write> result: array<vec4<f32>>; // (N) out or dinp
@group(0) @binding(2) var<storage, read> inp: array<vec4<f32>>;          // (N)
@group(0) @binding(3) var<storage, read> dout: array<vec4<f32>>;         // (N), backward only

// sigmoid(2u) and sigmoid(-2u) = 1 - sigmoid(2u) for u = sqrt(2/pi) * (x + 0.044715 x^3).
struct Sigmoids {
    s: vec4<f32>,
    one_minus_s: vec4<f32>,
}

fn sigmoids(x: vec4<f32>) -> Sigmoids {
    let z = 2.0 * SQRT_2_OVER_PI * (x + CUBIC_COEFFICIENT * x * x * x);
    // e <= 1, so 1 + e neither overflows nor cancels.
    let e = exp(-abs(z));
    let large = 1.0 / (1.0 + e);
    let small = e / (1.0 + e);
    let positive = z >= vec4<f32>();
    return Sigmoids(select(small, large, positive), select(large, small, positive));
}

fn gelu(x: vec4<f32>) -> vec4<f32> {
    return x * sigmoids(x).s;
}

fn gelu_derivative(x: vec4<f32>) -> vec4<f32> {
    let sig = sigmoids(x);
    let du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC_COEFFICIENT * x * x);
    return sig.s + 2.0 * x * sig.s * sig.one_minus_s * du_dx;
}

// Index of this invocation's vec4 over the 2-D grid.
fn quad_index(gid: vec3<u32>, groups: vec3<u32>) -> u32 {
    return gid.x + gid.y * groups.x * WORKGROUP_SIZE;
}

// The floats of vec4 `quad` of inp (or dout) that lie below params.len, padded with zeros.
fn partial_inp(quad: u32) -> vec4<f32> {
    var v = vec4<f32>();
    for (var j = 0u; quad * 4u + j < params.len && j < 4u; j++) {
        v[j] = inp[quad][j];
    }
    return v;
}

fn partial_dout(quad: u32) -> vec4<f32> {
    var v = vec4<f32>();
    for (var j = 0u; quad * 4u + j < params.len && j < 4u; j++) {
        v[j] = dout[quad][j];
    }
    return v;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn gelu_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) groups: vec3<u32>) {
    let quad = quad_index(gid, groups);
    let first = quad * 4u;
    if (first >= params.len) {
        return;
    }
    if (first + 4u <= params.len) {
        result[quad] = gelu(inp[quad]);
        return;
    }
    let out = gelu(partial_inp(quad));
    for (var j = 0u; first + j < params.len; j++) {
        result[quad][j] = out[j];
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn gelu_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) groups: vec3<u32>) {
    let quad = quad_index(gid, groups);
    let first = quad * 4u;
    if (first >= params.len) {
        return;
    }
    if (first + 4u <= params.len) {
        var grad = dout[quad] * gelu_derivative(inp[quad]);
        if (params.accumulate == 1u) {
            grad += result[quad];
        }
        result[quad] = grad;
        return;
    }
    let grad = partial_dout(quad) * gelu_derivative(partial_inp(quad));
    for (var j = 0u; first + j < params.len; j++) {
        var value = grad[j];
        if (params.accumulate == 1u) {
            value += result[quad][j];
        }
        result[quad][j] = value;
    }
}
