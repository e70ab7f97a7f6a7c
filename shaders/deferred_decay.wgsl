// Deferred weight decay for the rows of a table that adamw_update_rows (shaders/adamw.wgsl)
// leaves alone.
//
// A row whose flag is 0 there has a zero gradient and zero moments, so its whole AdamW update at
// step s is the decoupled weight decay param *= 1 - lr_s * weight_decay, or nothing when the
// step is skipped. Applying that at every step is a pass over the whole table (6.4 million floats
// for the GPT-2 vocabulary at n_embd 128) although a batch reads a few hundred rows. So
// adamw_update_rows does not touch such rows; the host remembers, per row, the first step whose
// decay the row still owes, and before a batch reads the row, or the host reads the table, this
// kernel applies the owed factors one step at a time, in step order. Each factor is computed by
// the expression adamw.wgsl uses, so the row ends bit for bit where decaying it at every step
// would have left it.
//
//   steps[s] = (lr, norm) of optimizer step s since the log was last emptied: the learning rate,
//              written by the host, and the global gradient norm, copied after the step.
//   list     = [count, end, row_0, from_0, row_1, from_1, ...]: row r_k owes the factors of steps
//              from_k .. end - 1.
//
// Step s is skipped exactly when adamw.wgsl's clip_factor() skips it: with max_norm > 0 and a norm
// that is NaN or infinite. Each invocation updates one vec4 of one listed row.
// NOTE: bit-for-bit equality assumes the driver rounds the factor and the product alike here and
// in adamw.wgsl's `decayed`; see the note there.

const WORKGROUP_SIZE: u32 = 256u;

struct DecayParams {
    // Floats in the table.
    len: u32,
    // Decoupled weight decay coefficient of the table.
    weight_decay: f32,
    // Floats per row, a multiple of 4.
    row_len: u32,
    // Clipping threshold of the run's steps (AdamWStep.max_norm); <= 0: no step is ever skipped.
    max_norm: f32,
}

@group(0) @binding(0) var<uniform> params: DecayParams;
@group(0) @binding(1) var<storage, read> steps: array<vec2<f32>>;     // (lr, norm) per logged step
@group(0) @binding(2) var<storage, read> list: array<u32>;            // count, end, then (row, from) pairs
@group(0) @binding(3) var<storage, read_write> param: array<vec4<f32>>; // (len / 4), updated in place

fn skipped(norm: f32) -> bool {
    // The same tests as clip_factor(), negated: a threshold that is not <= 0 (so NaN too), and
    // the bits of the norm, where an all-ones exponent marks NaN and infinity.
    return !(params.max_norm <= 0.0) && (bitcast<u32>(norm) & 0x7f800000u) == 0x7f800000u;
}

@compute @workgroup_size(WORKGROUP_SIZE)
fn decay_rows(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) groups: vec3<u32>) {
    let i = gid.x + gid.y * groups.x * WORKGROUP_SIZE;
    let quads = params.row_len / 4u;
    let entry = i / quads;
    if (entry >= list[0]) {
        return;
    }
    let end = list[1];
    let row = list[2u + 2u * entry];
    let index = row * quads + i % quads;
    var p = param[index];
    for (var s = list[3u + 2u * entry]; s < end; s++) {
        let logged = steps[s];
        if (!skipped(logged.y)) {
            p = p * (1.0 - logged.x * params.weight_decay);
        }
    }
    param[index] = p;
}
