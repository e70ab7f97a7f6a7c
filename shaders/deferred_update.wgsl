// Deferred AdamW updates for the rows of a table that adamw_update_rows (shaders/adamw.wgsl)
// leaves alone.
//
// A token embedding's gradient is zero outside the rows of the step's tokens. For such a row the
// AdamW update of step s reduces to decaying the moments (m *= beta1, v *= beta2), the decoupled
// weight decay and the step along the decayed moments; for a row whose moments are still 0, to
// the weight decay alone; and to nothing when the step is skipped. Applying that at every step is
// a pass over the whole table (6.4 million floats for the GPT-2 vocabulary at n_embd 128, and
// three arrays of them) although a batch reads a few hundred rows. So adamw_update_rows updates
// only the rows of the step's tokens; the host remembers, per row, the first step that the row
// still owes, and before a batch reads the row, or the host reads the table, this kernel applies
// the owed steps one at a time, in step order, keeping the row's values in registers. Each step
// is computed by the expressions adamw.wgsl uses with a zero gradient, so the row ends bit for
// bit where updating it at every step would have left it.
//
//   steps[s] = (lr, norm, bias_correction1, bias_correction2) of optimizer step s since the log
//              was last emptied: the learning rate written by the host; the global gradient
//              norm copied after the step, and the bias corrections too where the device counts
//              the steps (shaders/adamw_step.wgsl), else written by the host.
//   list     = [count, end, row_0, from_0, row_1, from_1, ...]: row r_k owes steps from_k .. end - 1.
//              MOMENTS_FLAG set in from_k marks a row whose moments may be nonzero; without it
//              the row's moments are 0 and only its weight decay is applied (m and v unread).
//
// Step s is skipped exactly when adamw.wgsl's clip_factor() skips it: with max_norm > 0 and a norm
// that is NaN or infinite. Each invocation updates one vec4 of one listed row.
// NOTE: bit-for-bit equality assumes the driver rounds these expressions alike here and in
// adamw.wgsl's update_quad; see the note there.

const WORKGROUP_SIZE: u32 = 256u;
const MOMENTS_FLAG: u32 = 0x80000000u;

struct SettleParams {
    // Floats in the table.
    len: u32,
    // Decoupled weight decay coefficient of the table.
    weight_decay: f32,
    // Floats per row, a multiple of 4.
    row_len: u32,
    // Clipping threshold of the run's steps (AdamWStep.max_norm); <= 0: no step is ever skipped.
    max_norm: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> params: SettleParams;
@group(0) @binding(1) var<storage, read> steps: array<vec4<f32>>;     // per logged step, see above
@group(0) @binding(2) var<storage, read> list: array<u32>;            // count, end, then (row, from) pairs
@group(0) @binding(3) var<storage, read_write> param: array<vec4<f32>>; // (len / 4), updated in place
@group(0) @binding(4) var<storage, read_write> m: array<vec4<f32>>;     // (len / 4), first moment
@group(0) @binding(5) var<storage, read_write> v: array<vec4<f32>>;     // (len / 4), second moment

fn skipped(norm: f32) -> bool {
    // The same tests as clip_factor(), negated: a threshold that is not <= 0 (so NaN too), and
    // the bits of the norm, where an all-ones exponent marks NaN and infinity.
    return !(params.max_norm <= 0.0) && (bitcast<u32>(norm) & 0x7f800000u) == 0x7f800000u;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn settle_rows(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * WORKGROUP_SIZE;
    let quads = params.row_len / 4u;
    let entry = i / quads;
    if (entry >= list[0]) {
        return;
    }
    let end = list[1];
    let row = list[2u + 2u * entry];
    let first = list[3u + 2u * entry];
    let index = row * quads + i % quads;
    var p = param[index];
    if ((first & MOMENTS_FLAG) == 0u) {
        for (var s = first; s < end; s++) {
            let logged = steps[s];
            if (!skipped(logged.y)) {
                p = p * (1.0 - logged.x * params.weight_decay);
            }
        }
        param[index] = p;
        return;
    }
    var m_row = m[index];
    var v_row = v[index];
    // The gradient of a row outside the step's tokens.
    let g = vec4<f32>(0.0);
    for (var s = first & ~MOMENTS_FLAG; s < end; s++) {
        let logged = steps[s];
        if (skipped(logged.y)) {
            continue;
        }
        // update_quad() of adamw.wgsl, term by term.
        let step_size = logged.x / logged.z;
        let bias_correction2_sqrt = sqrt(logged.w);
        m_row = params.beta1 * m_row + (1.0 - params.beta1) * g;
        v_row = params.beta2 * v_row + (1.0 - params.beta2) * g * g;
        let denominator = sqrt(v_row) / bias_correction2_sqrt + params.eps;
        p = p * (1.0 - logged.x * params.weight_decay) - step_size * m_row / denominator;
    }
    param[index] = p;
    m[index] = m_row;
    v[index] = v_row;
}
