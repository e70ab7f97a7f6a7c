// Residual add and gradient accumulation, with a scale on the second operand.
//
// residual_forward:  out = a + scale * b               (all (N), assigned)
// residual_backward: dst = accumulate ? dst + scale * src : scale * src
//   The gradient of out = a + s * b is dout for a and s * dout for b, so the backward of one add
//   is two calls of this entry point. The transformer's residual adds use scale 1, which
//   multiplies exactly, so they round as a plain a + b; a LoRA branch adds its product with scale
//   alpha / r.
//
// Work is spread over a 2-D grid of workgroups so that N may exceed 65535 * WORKGROUP_SIZE * 4;
// each invocation handles one vec4 (four consecutive floats).

const WORKGROUP_SIZE: u32 = 256u;

struct ResidualParams {
    // Number of f32 elements in each tensor.
    len: u32,
    // 1: add into dst; 0: overwrite dst.
    accumulate: u32,
    // Factor on b (forward) or src (backward).
    scale: f32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> params: ResidualParams;
@group(0) @binding(1) var<storage, read> a: array<f32>;        // (N)
@group(0) @binding(2) var<storage, read> b: array<f32>;        // (N)
@group(0) @binding(3) var<storage, read_write> out: array<f32>; // (N), assigned

@compute @workgroup_size(WORKGROUP_SIZE)
fn residual_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(num_workgroups) groups: vec3<u32>) {
    let base = (gid.x + gid.y * groups.x * WORKGROUP_SIZE) * 4u;
    for (var k = 0u; k < 4u; k++) {
        let i = base + k;
        if (i < params.len) {
            out[i] = a[i] + params.scale * b[i];
        }
    }
}

@group(0) @binding(1) var<storage, read> src: array<f32>;        // (N)
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;  // (N), assigned or accumulated

@compute @workgroup_size(WORKGROUP_SIZE)
fn residual_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) groups: vec3<u32>) {
    let base = (gid.x + gid.y * groups.x * WORKGROUP_SIZE) * 4u;
    for (var k = 0u; k < 4u; k++) {
        let i = base + k;
        if (i < params.len) {
            if (params.accumulate == 1u) {
                dst[i] = dst[i] + params.scale * src[i];
            } else {
                dst[i] = params.scale * src[i];
            }
        }
    }
}
