// Causal multi-head self-attention in the GPT-2 layout.
//
// qkv (B, T, 3C) holds q | k | v along its last axis, and head h uses channels h*HS..(h+1)*HS of
// each part. With scale = 1 / sqrt(HS) ("Attention Is All You Need", Vaswani et al. 2017, eq. 1):
//   scores[b,h,t,u] = scale * sum_d q[b,t,h,d] * k[b,u,h,d]             for u <= t
//   att[b,h,t,:]    = softmax(scores[b,h,t,0..=t]), exactly 0 for u > t (causal mask)
//   out[b,t,h,d]    = sum_{u<=t} att[b,h,t,u] * v[b,u,h,d]
//
// Backward, by the chain rule through the three lines above:
//   datt[t,u]    = sum_d dout[t,h,d] * v[u,h,d]
//   dscores[t,u] = att[t,u] * (datt[t,u] - sum_j att[t,j] * datt[t,j])   (softmax Jacobian)
//   dq[t,h,d]    = scale * sum_{u<=t} dscores[t,u] * k[u,h,d]
//   dk[u,h,d]    = scale * sum_{t>=u} dscores[t,u] * q[t,h,d]
//   dv[u,h,d]    = sum_{t>=u} att[t,u] * dout[t,h,d]
//
// The products are batched matrix products per (b, h). Each invocation of a tile kernel computes a
// TILE x TILE block of outputs in registers, so every loaded value serves TILE multiply-adds;
// the row kernels do the softmax work along one row of att. Entry points, in recording order:
//   forward:  attention_forward_scores   tile of (query, key) scores into att, keys <= query only
//             attention_forward_softmax  one row of att: softmax in place, 0 after the query (assigned)
//             attention_forward_values   tile of (query, channel) of out (assigned)
//   backward: attention_backward_datt    tile of (query, key) datt, keys <= query only
//             attention_backward_softmax one row: datt becomes dscores, 0 after the query (assigned)
//             attention_backward_query   tile of (query, channel) of dq
//             attention_backward_key_value tile of (key, channel) of dk and dv
//   dq, dk and dv are assigned or accumulated into dqkv.
// On adapters where the subgroup matrix products run (src/kernels/attention.rs), the launcher
// computes the six products with them instead, batched over (b, h), and uses only the two row
// kernels here: the forward softmax then scales the raw q k^T, and the backward softmax scales
// dscores, since the products apply no factor. Those products sum over every key or query,
// multiplying the masked zeros of att and dscores as well, so a non-finite value in q, k, v or
// dout of any token reaches every output of its (b, h), where the tile kernels stop at the end
// of their block; either way the step's loss or gradient norm is not finite. Rows of att and datt are att_stride floats apart
// (T rounded up to a multiple of 4, for the products' vec4 loads); the row kernels zero the
// padding.
// Every output element is written by one invocation that sums in a fixed order, so two runs give
// bitwise-identical results. Right padding needs no extra mask: padding follows the real tokens,
// and causal attention never looks ahead.

// Invocations per workgroup of the tile kernels and of the row kernels.
const TILE_WORKGROUP_SIZE: u32 = 64u;
const ROW_WORKGROUP_SIZE: u32 = 64u;
// Side of the square block of outputs one tile-kernel invocation computes (queries, keys or
// head channels).
const TILE: u32 = 8u;

struct AttentionParams {
    batch_size: u32,
    seq_len: u32,
    channels: u32,
    num_heads: u32,
    // HS = channels / num_heads.
    head_size: u32,
    // Backward: 1 adds into dqkv, 0 overwrites it.
    accumulate: u32,
    // 1 / sqrt(HS).
    scale: f32,
    // Floats between two rows of att and datt: T rounded up to a multiple of 4. The row kernels
    // write zeros after the last key, so the padding reads as zero weight.
    att_stride: u32,
    // Factor on the raw scores in attention_forward_softmax: 1 when attention_forward_scores has
    // scaled them, `scale` when the launcher's batched products wrote the plain q k^T.
    softmax_scale: f32,
    // Factor on dscores in attention_backward_softmax: 1 when the query and key kernels apply
    // `scale`, `scale` when the launcher's batched products compute dq and dk.
    dscores_scale: f32,
    _pad0: u32,
    _pad1: u32,
}

// Each slot is declared once and shared by the entry points; an entry point binds a prefix of the
// slots, some of which it does not read.
@group(0) @binding(0) var<uniform> params: AttentionParams;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;               // (B, T, 3C)
@group(0) @binding(2) var<storage, read_write> att: array<f32>;         // (B, NH, T, att_stride), written by the forward only
@group(0) @binding(3) var<storage, read_write> out_or_datt: array<f32>; // forward: out (B, T, C); backward: datt (B, NH, T, att_stride)
@group(0) @binding(4) var<storage, read> dout: array<f32>;              // (B, T, C)
@group(0) @binding(5) var<storage, read_write> dqkv: array<f32>;        // (B, T, 3C)

fn flat_index(gid: vec3<u32>, groups: vec3<u32>, workgroup_size: u32) -> u32 {
    return gid.x + gid.y * groups.x * workgroup_size;
}

// Offset of channel 0 of head h of `part` (0 q, 1 k, 2 v) at token (b, t) in qkv.
fn qkv_offset(b: u32, t: u32, part: u32, h: u32) -> u32 {
    let c = params.channels;
    return (b * params.seq_len + t) * 3u * c + part * c + h * params.head_size;
}

// Offset of channel 0 of head h at token (b, t) in a (B, T, C) tensor.
fn btc_offset(b: u32, t: u32, h: u32) -> u32 {
    return (b * params.seq_len + t) * params.channels + h * params.head_size;
}

// Offset of row (b, h, t) in a (B, NH, T, att_stride) tensor.
fn att_row(b: u32, h: u32, t: u32) -> u32 {
    return ((b * params.num_heads + h) * params.seq_len + t) * params.att_stride;
}

fn tile_count(n: u32) -> u32 {
    return (n + TILE - 1u) / TILE;
}

// A block of work: batch b, head h, first row `row0` and first column `col0` of the block.
struct Block {
    b: u32,
    h: u32,
    row0: u32,
    col0: u32,
    valid: bool,
}

// Item i of the (query tile, key tile) pairs with key tile <= query tile, for each (b, h). The
// causal mask makes the blocks above the diagonal zero, so they are not launched.
fn triangle_block(i: u32) -> Block {
    let tiles = tile_count(params.seq_len);
    let pairs = tiles * (tiles + 1u) / 2u;
    var block: Block;
    block.valid = i < params.batch_size * params.num_heads * pairs;
    let pair = i % pairs;
    // pair = r * (r + 1) / 2 + c with c <= r; invert the triangular number, then correct the
    // float estimate by one step either way.
    var r = u32((sqrt(8.0 * f32(pair) + 1.0) - 1.0) * 0.5);
    if ((r + 1u) * (r + 2u) / 2u <= pair) {
        r += 1u;
    }
    if (r * (r + 1u) / 2u > pair) {
        r -= 1u;
    }
    block.row0 = r * TILE;
    block.col0 = (pair - r * (r + 1u) / 2u) * TILE;
    block.h = (i / pairs) % params.num_heads;
    block.b = i / (pairs * params.num_heads);
    return block;
}

// Item i of the (token tile, channel tile) blocks for each (b, h).
fn channel_block(i: u32) -> Block {
    let token_tiles = tile_count(params.seq_len);
    let channel_tiles = tile_count(params.head_size);
    var block: Block;
    block.valid = i < params.batch_size * params.num_heads * token_tiles * channel_tiles;
    block.col0 = (i % channel_tiles) * TILE;
    block.row0 = ((i / channel_tiles) % token_tiles) * TILE;
    block.h = (i / (channel_tiles * token_tiles)) % params.num_heads;
    block.b = i / (channel_tiles * token_tiles * params.num_heads);
    return block;
}

// Tokens and channels past the end are clamped to the last one, so that their loads stay in
// bounds; their results are not stored.
fn clamp_token(t: u32) -> u32 {
    return min(t, params.seq_len - 1u);
}

fn clamp_channel(d: u32) -> u32 {
    return min(d, params.head_size - 1u);
}

fn store_dqkv(index: u32, value: f32) {
    if (params.accumulate == 1u) {
        dqkv[index] = dqkv[index] + value;
    } else {
        dqkv[index] = value;
    }
}

@compute @workgroup_size(TILE_WORKGROUP_SIZE)
fn attention_forward_scores(@builtin(global_invocation_id) gid: vec3<u32>,
                            @builtin(num_workgroups) groups: vec3<u32>) {
    let block = triangle_block(flat_index(gid, groups, TILE_WORKGROUP_SIZE));
    if (!block.valid) {
        return;
    }
    var query_at: array<u32, TILE>;
    var key_at: array<u32, TILE>;
    for (var i = 0u; i < TILE; i++) {
        query_at[i] = qkv_offset(block.b, clamp_token(block.row0 + i), 0u, block.h);
        key_at[i] = qkv_offset(block.b, clamp_token(block.col0 + i), 1u, block.h);
    }
    var acc: array<array<f32, TILE>, TILE>;
    for (var d = 0u; d < params.head_size; d++) {
        var q: array<f32, TILE>;
        var k: array<f32, TILE>;
        for (var i = 0u; i < TILE; i++) {
            q[i] = qkv[query_at[i] + d];
            k[i] = qkv[key_at[i] + d];
        }
        for (var i = 0u; i < TILE; i++) {
            for (var j = 0u; j < TILE; j++) {
                acc[i][j] = fma(q[i], k[j], acc[i][j]);
            }
        }
    }
    // Only keys u <= t are stored; attention_forward_softmax zeroes the rest of each row.
    for (var i = 0u; i < TILE; i++) {
        let t = block.row0 + i;
        if (t < params.seq_len) {
            let row = att_row(block.b, block.h, t);
            for (var j = 0u; j < TILE; j++) {
                let u = block.col0 + j;
                if (u <= t) {
                    att[row + u] = acc[i][j] * params.scale;
                }
            }
        }
    }
}

@compute @workgroup_size(ROW_WORKGROUP_SIZE)
fn attention_forward_softmax(@builtin(global_invocation_id) gid: vec3<u32>,
                             @builtin(num_workgroups) groups: vec3<u32>) {
    let row = flat_index(gid, groups, ROW_WORKGROUP_SIZE);
    let t_len = params.seq_len;
    if (row >= params.batch_size * params.num_heads * t_len) {
        return;
    }
    // row = (b * NH + h) * T + t; its keys 0..=t hold scores.
    let t = row % t_len;
    let start = row * params.att_stride;
    // Subtract the row maximum so that exp cannot overflow.
    var row_max = att[start] * params.softmax_scale;
    for (var u = 1u; u <= t; u++) {
        row_max = max(row_max, att[start + u] * params.softmax_scale);
    }
    var sum = 0.0;
    for (var u = 0u; u <= t; u++) {
        let e = exp(att[start + u] * params.softmax_scale - row_max);
        att[start + u] = e;
        sum += e;
    }
    let inverse_sum = 1.0 / sum;
    for (var u = 0u; u <= t; u++) {
        att[start + u] = att[start + u] * inverse_sum;
    }
    // Causal mask: keys after the query, and the row's padding, get exactly zero weight.
    for (var u = t + 1u; u < params.att_stride; u++) {
        att[start + u] = 0.0;
    }
}

@compute @workgroup_size(TILE_WORKGROUP_SIZE)
fn attention_forward_values(@builtin(global_invocation_id) gid: vec3<u32>,
                            @builtin(num_workgroups) groups: vec3<u32>) {
    let block = channel_block(flat_index(gid, groups, TILE_WORKGROUP_SIZE));
    if (!block.valid) {
        return;
    }
    var row_at: array<u32, TILE>;
    var channel: array<u32, TILE>;
    for (var i = 0u; i < TILE; i++) {
        row_at[i] = att_row(block.b, block.h, clamp_token(block.row0 + i));
        channel[i] = clamp_channel(block.col0 + i);
    }
    // att[t, u] is 0 for u > t, so keys past the block's last query add nothing.
    let key_end = min(block.row0 + TILE, params.seq_len);
    var acc: array<array<f32, TILE>, TILE>;
    for (var u = 0u; u < key_end; u++) {
        let v_at = qkv_offset(block.b, u, 2u, block.h);
        var a: array<f32, TILE>;
        var v: array<f32, TILE>;
        for (var i = 0u; i < TILE; i++) {
            a[i] = att[row_at[i] + u];
            v[i] = qkv[v_at + channel[i]];
        }
        for (var i = 0u; i < TILE; i++) {
            for (var j = 0u; j < TILE; j++) {
                acc[i][j] = fma(a[i], v[j], acc[i][j]);
            }
        }
    }
    for (var i = 0u; i < TILE; i++) {
        let t = block.row0 + i;
        if (t < params.seq_len) {
            let o = btc_offset(block.b, t, block.h);
            for (var j = 0u; j < TILE; j++) {
                if (block.col0 + j < params.head_size) {
                    out_or_datt[o + block.col0 + j] = acc[i][j];
                }
            }
        }
    }
}

@compute @workgroup_size(TILE_WORKGROUP_SIZE)
fn attention_backward_datt(@builtin(global_invocation_id) gid: vec3<u32>,
                           @builtin(num_workgroups) groups: vec3<u32>) {
    let block = triangle_block(flat_index(gid, groups, TILE_WORKGROUP_SIZE));
    if (!block.valid) {
        return;
    }
    var grad_at: array<u32, TILE>;
    var value_at: array<u32, TILE>;
    for (var i = 0u; i < TILE; i++) {
        grad_at[i] = btc_offset(block.b, clamp_token(block.row0 + i), block.h);
        value_at[i] = qkv_offset(block.b, clamp_token(block.col0 + i), 2u, block.h);
    }
    var acc: array<array<f32, TILE>, TILE>;
    for (var d = 0u; d < params.head_size; d++) {
        var g: array<f32, TILE>;
        var v: array<f32, TILE>;
        for (var i = 0u; i < TILE; i++) {
            g[i] = dout[grad_at[i] + d];
            v[i] = qkv[value_at[i] + d];
        }
        for (var i = 0u; i < TILE; i++) {
            for (var j = 0u; j < TILE; j++) {
                acc[i][j] = fma(g[i], v[j], acc[i][j]);
            }
        }
    }
    for (var i = 0u; i < TILE; i++) {
        let t = block.row0 + i;
        if (t < params.seq_len) {
            let row = att_row(block.b, block.h, t);
            for (var j = 0u; j < TILE; j++) {
                let u = block.col0 + j;
                if (u <= t) {
                    out_or_datt[row + u] = acc[i][j];
                }
            }
        }
    }
}

@compute @workgroup_size(ROW_WORKGROUP_SIZE)
fn attention_backward_softmax(@builtin(global_invocation_id) gid: vec3<u32>,
                              @builtin(num_workgroups) groups: vec3<u32>) {
    let row = flat_index(gid, groups, ROW_WORKGROUP_SIZE);
    let t_len = params.seq_len;
    if (row >= params.batch_size * params.num_heads * t_len) {
        return;
    }
    let t = row % t_len;
    let start = row * params.att_stride;
    // sum_j att[t,j] * datt[t,j], the softmax Jacobian's projection term.
    var weighted = 0.0;
    for (var u = 0u; u <= t; u++) {
        weighted = fma(att[start + u], out_or_datt[start + u], weighted);
    }
    for (var u = 0u; u <= t; u++) {
        out_or_datt[start + u] = att[start + u] * (out_or_datt[start + u] - weighted) * params.dscores_scale;
    }
    for (var u = t + 1u; u < params.att_stride; u++) {
        out_or_datt[start + u] = 0.0;
    }
}

@compute @workgroup_size(TILE_WORKGROUP_SIZE)
fn attention_backward_query(@builtin(global_invocation_id) gid: vec3<u32>,
                            @builtin(num_workgroups) groups: vec3<u32>) {
    let block = channel_block(flat_index(gid, groups, TILE_WORKGROUP_SIZE));
    if (!block.valid) {
        return;
    }
    var row_at: array<u32, TILE>;
    var channel: array<u32, TILE>;
    for (var i = 0u; i < TILE; i++) {
        row_at[i] = att_row(block.b, block.h, clamp_token(block.row0 + i));
        channel[i] = clamp_channel(block.col0 + i);
    }
    // dscores[t, u] is 0 for u > t.
    let key_end = min(block.row0 + TILE, params.seq_len);
    var acc: array<array<f32, TILE>, TILE>;
    for (var u = 0u; u < key_end; u++) {
        let k_at = qkv_offset(block.b, u, 1u, block.h);
        var ds: array<f32, TILE>;
        var k: array<f32, TILE>;
        for (var i = 0u; i < TILE; i++) {
            ds[i] = out_or_datt[row_at[i] + u];
            k[i] = qkv[k_at + channel[i]];
        }
        for (var i = 0u; i < TILE; i++) {
            for (var j = 0u; j < TILE; j++) {
                acc[i][j] = fma(ds[i], k[j], acc[i][j]);
            }
        }
    }
    for (var i = 0u; i < TILE; i++) {
        let t = block.row0 + i;
        if (t < params.seq_len) {
            let q_out = qkv_offset(block.b, t, 0u, block.h);
            for (var j = 0u; j < TILE; j++) {
                if (block.col0 + j < params.head_size) {
                    store_dqkv(q_out + block.col0 + j, acc[i][j] * params.scale);
                }
            }
        }
    }
}

@compute @workgroup_size(TILE_WORKGROUP_SIZE)
fn attention_backward_key_value(@builtin(global_invocation_id) gid: vec3<u32>,
                                @builtin(num_workgroups) groups: vec3<u32>) {
    let block = channel_block(flat_index(gid, groups, TILE_WORKGROUP_SIZE));
    if (!block.valid) {
        return;
    }
    // The block's rows are keys u = row0 + j; they receive gradient from queries t >= u, read
    // down columns u of dscores and att. Entries with t < u are 0, so the sum starts at row0.
    let head = att_row(block.b, block.h, 0u);
    var key_column: array<u32, TILE>;
    var channel: array<u32, TILE>;
    for (var j = 0u; j < TILE; j++) {
        key_column[j] = clamp_token(block.row0 + j);
        channel[j] = clamp_channel(block.col0 + j);
    }

    // dk[u, d] = scale * sum_t dscores[t, u] * q[t, d].
    var acc: array<array<f32, TILE>, TILE>;
    for (var t = block.row0; t < params.seq_len; t++) {
        let row = head + t * params.att_stride;
        let q_at = qkv_offset(block.b, t, 0u, block.h);
        var ds: array<f32, TILE>;
        var q: array<f32, TILE>;
        for (var j = 0u; j < TILE; j++) {
            ds[j] = out_or_datt[row + key_column[j]];
            q[j] = qkv[q_at + channel[j]];
        }
        for (var i = 0u; i < TILE; i++) {
            for (var j = 0u; j < TILE; j++) {
                acc[i][j] = fma(ds[i], q[j], acc[i][j]);
            }
        }
    }
    for (var i = 0u; i < TILE; i++) {
        let u = block.row0 + i;
        if (u < params.seq_len) {
            let k_out = qkv_offset(block.b, u, 1u, block.h);
            for (var j = 0u; j < TILE; j++) {
                if (block.col0 + j < params.head_size) {
                    store_dqkv(k_out + block.col0 + j, acc[i][j] * params.scale);
                }
            }
        }
    }

    // dv[u, d] = sum_t att[t, u] * dout[t, d].
    acc = array<array<f32, TILE>, TILE>();
    for (var t = block.row0; t < params.seq_len; t++) {
        let row = head + t * params.att_stride;
        let g_at = btc_offset(block.b, t, block.h);
        var a: array<f32, TILE>;
        var g: array<f32, TILE>;
        for (var j = 0u; j < TILE; j++) {
            a[j] = att[row + key_column[j]];
            g[j] = dout[g_at + channel[j]];
        }
        for (var i = 0u; i < TILE; i++) {
            for (var j = 0u; j < TILE; j++) {
                acc[i][j] = fma(a[i], g[j], acc[i][j]);
            }
        }
    }
    for (var i = 0u; i < TILE; i++) {
        let u = block.row0 + i;
        if (u < params.seq_len) {
            let v_out = qkv_offset(block.b, u, 2u, block.h);
            for (var j = 0u; j < TILE; j++) {
                if (block.col0 + j < params.head_size) {
                    store_dqkv(v_out + block.col0 + j, acc[i][j]);
                }
            }
        }
    }
}
