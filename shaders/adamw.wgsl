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

const WORKGROUP_SIZE: u32 = 256u;
// Added to the norm before dividing, the value torch.nn.utils.clip_grad_norm_ uses.
const CLIP_EPSILON: f32 = 1e-6;

struct AdamWParams {
    // Floats in the parameter tensor.
    len: u32,
    // Decoupled weight decay coefficient of this tensor (0 for biases and layer norms).
    weight_decay: f32,
    _pad0: u32,
    _pad1: u32,
}

// Written by the host before each optimizer step, shared by every tensor's dispatch.
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
}

@group(0) @binding(0) var<uniform> params: AdamWParams;
@group(0) @binding(1) var<storage, read> step: AdamWStep;
@group(0) @binding(2) var<storage, read> norm: array<f32>;        // (1), global gradient norm
@group(0) @binding(3) var<storage, read_write> param: array<vec4<f32>>; // (N / 4), updated in place
@group(0) @binding(4) var<storage, read_write> grad: array<vec4<f32>>;  // (N / 4), zeroed
@group(0) @binding(5) var<storage, read_write> m: array<vec4<f32>>;     // (N / 4), first moment, updated in place
@group(0) @binding(6) var<storage, read_write> v: array<vec4<f32>>;     // (N / 4), second moment, updated in place

@compute @workgroup_size(WORKGROUP_SIZE)
fn adamw_update(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * WORKGROUP_SIZE;
    let first = i * 4u;
    if (first >= params.len) {
        return;
    }
    // Lanes at or past `len` belong to the padding of the last vec4 and keep their values.
    let live = vec4<u32>(first, first + 1u, first + 2u, first + 3u) < vec4<u32>(params.len);
    var clip = 1.0;
    if (step.max_norm > 0.0) {
        // An all-ones exponent marks NaN and infinity; compare bits so that no compiler
        // assumption about NaN comparisons can change the outcome.
        if ((bitcast<u32>(norm[0]) & 0x7f800000u) == 0x7f800000u) {
            grad[i] = select(grad[i], vec4<f32>(0.0), live);
            return;
        }
        clip = min(1.0, step.max_norm / (norm[0] * step.grad_scale + CLIP_EPSILON));
    }
    let scale = step.grad_scale * clip;
    let decay = 1.0 - step.lr * params.weight_decay;
    let step_size = step.lr / step.bias_correction1;
    let bias_correction2_sqrt = sqrt(step.bias_correction2);
    let g = grad[i] * scale;
    let m_new = step.beta1 * m[i] + (1.0 - step.beta1) * g;
    let v_new = step.beta2 * v[i] + (1.0 - step.beta2) * g * g;
    let denominator = sqrt(v_new) / bias_correction2_sqrt + step.eps;
    let param_new = param[i] * decay - step_size * m_new / denominator;
    param[i] = select(param[i], param_new, live);
    m[i] = select(m[i], m_new, live);
    v[i] = select(v[i], v_new, live);
    grad[i] = select(grad[i], vec4<f32>(0.0), live);
}
