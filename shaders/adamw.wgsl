// AdamW with decoupled weight decay (Loshchilov and Hutter, ICLR 2019) and clipping by global
// norm, one dispatch per parameter tensor, following torch.optim.AdamW and
// torch.nn.utils.clip_grad_norm_:
//
//   g     = grad * grad_scale * clip,
//           clip = min(1, max_norm / (norm * grad_scale + CLIP_EPSILON)), or 1 when max_norm <= 0
//   (grad_scale is 1 / micro-batches when gradients of several micro-batches were summed, so g
//   and the clipped norm are those of the mean gradient)
//   param = param * (1 - lr * weight_decay)
//   m     = beta1 * m + (1 - beta1) * g
//   v     = beta2 * v + (1 - beta2) * g^2
//   param = param - lr / bias_correction1 * m / (sqrt(v) / sqrt(bias_correction2) + eps)
//   grad  = 0   (the optimizer zeroes the gradients it applied; every gradient kernel accumulates)
//
// With max_norm > 0 (the norm is computed) and a norm that is NaN or infinite, the step is
// skipped: param, m and v keep their values and only grad is zeroed, so one bad batch cannot
// poison the weights and the host can stop, or go on, from the last good state.
//
// param, m and v are updated in place. Each invocation handles one vec4 (four consecutive
// floats), because vec4 storage access moves several times more bytes per second than scalar
// access on CPU drivers; work is spread over a 2-D grid of workgroups. In the last vec4 of a
// tensor whose length is not a multiple of 4, the lanes past `len` keep their stored values.
//
// adamw_update_rows is the same update for a table whose gradient reaches only some rows per
// step, the token embedding of a classifier. `rows` lists rows (a count, then row indices, each
// row of `row_len` floats): the host lists the rows of the step's tokens, and the dispatch covers
// only those, indirectly sized by the host. Every other row has a zero gradient, for which the
// update above reduces to decaying the moments and the weight and stepping along the decayed
// moments. The kernel leaves such rows alone, and the host applies the steps they owe later with
// shaders/deferred_update.wgsl, bit for bit the same arithmetic, before anything reads the row.
// Listing a row that has no gradient costs time but changes nothing, provided the row owes no
// earlier step.
// NOTE: bit-for-bit equality assumes the driver rounds update_quad()'s expressions alike here and
// in shaders/deferred_update.wgsl. SPIR-V lets it contract a multiply and an add into an fma
// differently in each; lavapipe does not, as the tests show.

const WORKGROUP_SIZE: u32 = 256u;
// Added to the norm before dividing, the value torch.nn.utils.clip_grad_norm_ uses.
const CLIP_EPSILON: f32 = 1e-6;

struct AdamWParams {
    // Floats in the parameter tensor.
    len: u32,
    // Decoupled weight decay coefficient of this tensor (0 for biases and layer norms).
    weight_decay: f32,
    // adamw_update_rows: floats per row, a multiple of 4.
    row_len: u32,
    _pad0: u32,
}

// Written by the host before each optimizer step, shared by every tensor's dispatch. When the
// session computes the gradient norm, shaders/adamw_step.wgsl writes t and the bias corrections.
struct AdamWStep {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    // 1 - beta1^t for step t, counted from 1.
    bias_correction1: f32,
    // 1 - beta2^t.
    bias_correction2: f32,
    // Clipping threshold for the global norm; <= 0 turns clipping off.
    max_norm: f32,
    // Factor applied to the stored gradient and its norm: 1 / micro-batches per step.
    grad_scale: f32,
    // Updates applied so far (see shaders/adamw_step.wgsl).
    steps: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: AdamWParams;
@group(0) @binding(1) var<storage, read> step: AdamWStep;
@group(0) @binding(2) var<storage, read> norm: array<f32>;        // (1), global gradient norm
@group(0) @binding(3) var<storage, read_write> param: array<vec4<f32>>; // (N / 4), updated in place
@group(0) @binding(4) var<storage, read_write> grad: array<vec4<f32>>;  // (N / 4), zeroed
@group(0) @binding(5) var<storage, read_write> m: array<vec4<f32>>;     // (N / 4), first moment, updated in place
@group(0) @binding(6) var<storage, read_write> v: array<vec4<f32>>;     // (N / 4), second moment, updated in place
@group(0) @binding(7) var<storage, read> rows: array<u32>;              // adamw_update_rows: count, then rows

// The vec4 that invocation `gid` updates, and which of its lanes lie inside the tensor.
struct Quad {
    index: u32,
    inside: bool,
    live: vec4<bool>,
}

fn quad(gid: vec3<u32>, groups: vec3<u32>) -> Quad {
    let i = gid.x + gid.y * groups.x * WORKGROUP_SIZE;
    let first = i * 4u;
    // Lanes at or past `len` belong to the padding of the last vec4 and keep their values.
    let live = vec4<u32>(first, first + 1u, first + 2u, first + 3u) < vec4<u32>(params.len);
    return Quad(i, first < params.len, live);
}

// The factor that clipping applies to the gradient, or -1 when the step is skipped because the
// norm is NaN or infinite.
fn clip_factor() -> f32 {
    if (step.max_norm <= 0.0) {
        return 1.0;
    }
    let total = norm[0];
    // An all-ones exponent marks NaN and infinity; compare bits so that no compiler assumption
    // about NaN comparisons can change the outcome.
    if ((bitcast<u32>(total) & 0x7f800000u) == 0x7f800000u) {
        return -1.0;
    }
    return min(1.0, step.max_norm / (total * step.grad_scale + CLIP_EPSILON));
}

// param * (1 - lr * weight_decay), the decoupled weight decay; shaders/deferred_update.wgsl
// computes the same expression, so that both round alike.
fn decayed(p: vec4<f32>) -> vec4<f32> {
    return p * (1.0 - step.lr * params.weight_decay);
}

// The full update of one vec4; with a negative `clip` only the gradient is zeroed.
fn update_quad(q: Quad, clip: f32) {
    let i = q.index;
    // Every operand is loaded once into a local. The bindings may alias as far as the compiler
    // knows, so an operand read again after a store would be loaded again, and on CPU drivers
    // the loads are what this kernel spends its time on.
    let grad_old = grad[i];
    let zeroed = select(grad_old, vec4<f32>(0.0), q.live);
    if (clip < 0.0) {
        grad[i] = zeroed;
        return;
    }
    let param_old = param[i];
    let m_old = m[i];
    let v_old = v[i];
    let scale = step.grad_scale * clip;
    let step_size = step.lr / step.bias_correction1;
    let bias_correction2_sqrt = sqrt(step.bias_correction2);
    let g = grad_old * scale;
    let m_new = step.beta1 * m_old + (1.0 - step.beta1) * g;
    let v_new = step.beta2 * v_old + (1.0 - step.beta2) * g * g;
    let denominator = sqrt(v_new) / bias_correction2_sqrt + step.eps;
    let param_new = decayed(param_old) - step_size * m_new / denominator;
    param[i] = select(param_old, param_new, q.live);
    m[i] = select(m_old, m_new, q.live);
    v[i] = select(v_old, v_new, q.live);
    grad[i] = zeroed;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn adamw_update(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) groups: vec3<u32>) {
    let q = quad(gid, groups);
    if (q.inside) {
        update_quad(q, clip_factor());
    }
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn adamw_update_rows(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * WORKGROUP_SIZE;
    // Invocation i updates vec4 i % quads of listed row i / quads; rows are whole vec4s.
    let quads = params.row_len / 4u;
    let entry = i / quads;
    if (entry >= rows[0]) {
        return;
    }
    let index = rows[1u + entry] * quads + i % quads;
    update_quad(Quad(index, true, vec4<bool>(true)), clip_factor());
}
