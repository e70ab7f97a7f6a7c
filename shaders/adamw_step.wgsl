// adamw_count_step: counts an optimizer step on the device and writes its bias corrections. It
// runs after the global gradient norm and before the AdamW dispatches of the step's tensors
// (shaders/adamw.wgsl), in one invocation:
//
//   t = t + 1
//   bias_correction1 = 1 - beta1^t
//   bias_correction2 = 1 - beta2^t
//
// The AdamW dispatches skip a step whose norm is NaN or infinite, and this kernel does not
// count it either. So t stays the number of updates applied without the host reading the norm,
// and the host can submit the next steps before it learns that this one was skipped.
//
// beta^t is computed by repeated squaring, multiplying in the order of the f32 powi of the host's
// compiler runtime, so each product rounds as on the host and both give the same bits.
// NOTE: measured on lavapipe only. SPIR-V lets a driver fuse `1.0 - product * square` into an
// fma, which would round differently from the host by an ulp; training stays consistent, since
// every kernel reads the device's values.

// Shared with shaders/adamw.wgsl and written by the host before each step, except for the bias
// corrections and t, which this kernel writes when the session computes a norm.
struct AdamWStep {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    bias_correction1: f32,
    bias_correction2: f32,
    max_norm: f32,
    grad_scale: f32,
    // Updates applied so far: t of the last counted step.
    steps: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<storage, read_write> step: AdamWStep;
@group(0) @binding(1) var<storage, read> norm: array<f32>;   // (1), global gradient norm

fn powi(base: f32, exponent: u32) -> f32 {
    var square = base;
    var rest = exponent;
    var product = 1.0;
    loop {
        if ((rest & 1u) != 0u) {
            product = product * square;
        }
        rest = rest >> 1u;
        if (rest == 0u) {
            break;
        }
        square = square * square;
    }
    return product;
}

@compute @workgroup_size(1)
fn adamw_count_step() {
    // The skip of clip_factor() in shaders/adamw.wgsl: with max_norm > 0, a norm whose exponent
    // is all ones (NaN or infinity).
    if (step.max_norm > 0.0 && (bitcast<u32>(norm[0]) & 0x7f800000u) == 0x7f800000u) {
        return;
    }
    let t = step.steps + 1u;
    step.steps = t;
    step.bias_correction1 = 1.0 - powi(step.beta1, t);
    step.bias_correction2 = 1.0 - powi(step.beta2, t);
}
