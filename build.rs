//! Derives two modules (in OUT_DIR) from `shaders/matmul_subgroup.wgsl`: the same subgroup
//! products with the rhs operand, a frozen linear weight, stored as f16 pairs
//! (`matmul_f16_subgroup.wgsl`) or as NF4 codes with block scales (`matmul_nf4_subgroup.wgsl`).
//! Deriving the files keeps one copy of the 2,000 lines of unrolled products, so a change to the
//! f32 kernel reaches the others.

use std::path::Path;

const SOURCE: &str = "shaders/matmul_subgroup.wgsl";
/// The NF4 decoding functions come from the register-blocked NF4 kernel, so both decode alike.
const NF4_SOURCE: &str = "shaders/matmul_nf4.wgsl";

/// The binding that the derived modules replace, exactly as the f32 module declares it.
const RHS_BINDING: &str = "@group(0) @binding(3) var<storage, read> rhs: array<vec4<f32>>;";
/// The last field of the f32 module's parameter struct, after which the NF4 module adds its own.
const LAST_PARAM: &str = "    vec4_loads: u32,";

/// The entry point that the derived modules leave out: a frozen weight is never the rhs of a tn
/// product (its gradient is not computed).
const UNUSED_ENTRY: &str = "fn matmul_tn(";

const COMMON_HEADER: &str = "\
// Derived by build.rs from shaders/matmul_subgroup.wgsl; edit that file, not this one.
//
// The nn and nt subgroup products of that file with the rhs operand, a frozen linear weight
// (K, N), stored in a compressed form. Each load of four consecutive rhs elements (a quad, at
// quad index q) goes through rhs_quad(q), which decodes them to f32; everything else, f32
// arithmetic included, is the f32 module's code. The launcher uses these entry points only where
// that module's vec4 conditions hold, so every quad starts at an element index that is a
// multiple of 4.
";

const F16_HEADER: &str = "\
//
// Here rhs is stored in f16 as src/kernels/f16_weights.rs packs it. Element e is the low half of
// u32 e / 2 when e is even and the high half when it is odd, so a quad is one vec2<u32>.

";

const F16_RHS: &str = "\
@group(0) @binding(3) var<storage, read> rhs_f16: array<vec2<u32>>; // rhs as f16 pairs

// Elements 4 q .. 4 q + 3 of rhs, widened to f32.
fn rhs_quad(q: u32) -> vec4<f32> {
    let pair = rhs_f16[q];
    return vec4<f32>(unpack2x16float(pair.x), unpack2x16float(pair.y));
}";

const NF4_HEADER: &str = "\
//
// Here rhs is stored in NF4 as src/kernels/nf4.rs quantises it. Element e is the 4-bit code in
// bits 4 (e % 8) .. 4 (e % 8) + 3 of packed[e / 8], times the scale of its block of 64
// consecutive elements. A quad is half a code word and lies inside one block. The NF4 table and
// the functions code_values and block_scale are copied from shaders/matmul_nf4.wgsl.

";

const NF4_PARAMS: &str = concat!(
    "    // 1: block scales are 8-bit codes, decoded with scale_mean and scale_steps.\n",
    "    double_quant: u32,\n",
    "    // Mean of all block scales of the weight, subtracted before their 8-bit quantisation.\n",
    "    scale_mean: f32,\n",
    "    _pad0: u32,\n",
    "    _pad1: u32,",
);

const NF4_RHS: &str = "\
@group(0) @binding(3) var<storage, read> packed: array<u32>;       // (K * N / 8) codes of rhs
@group(0) @binding(5) var<storage, read> scales: array<u32>;       // (K * N / 64) f32, or (K * N / 256) words of 8-bit codes
@group(0) @binding(6) var<storage, read> scale_steps: array<f32>;  // (K * N / 64 / 256), read when double_quant is 1

// Weights per quantisation block and block scales per double-quantisation group.
const BLOCK_SIZE: u32 = 64u;
const GROUP_BLOCKS: u32 = 256u;

// Elements 4 q .. 4 q + 3 of rhs, dequantised.
fn rhs_quad(q: u32) -> vec4<f32> {
    let word = packed[q / 2u] >> (16u * (q % 2u));
    let codes = (vec4<u32>(word) >> vec4<u32>(0u, 4u, 8u, 12u)) & vec4<u32>(15u);
    return code_values(codes) * block_scale(q / (BLOCK_SIZE / 4u));
}";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed={NF4_SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {path}: {e}"));
    let source = without_entry(&read(SOURCE), UNUSED_ENTRY);
    let nf4 = read(NF4_SOURCE);

    let f16_module = format!("{COMMON_HEADER}{F16_HEADER}{}", with_rhs(&source, F16_RHS));

    let decoding = ["const NF4_CODES = ", "fn block_scale(", "fn code_values("].map(|start| item(&nf4, start)).join("\n\n");
    let nf4_rhs = format!("{NF4_RHS}\n\n{decoding}");
    let with_params = source.replacen(LAST_PARAM, &format!("{LAST_PARAM}\n{NF4_PARAMS}"), 1);
    assert_ne!(with_params, source, "{SOURCE}: the parameter struct does not end with `{LAST_PARAM}`");
    let nf4_module = format!("{COMMON_HEADER}{NF4_HEADER}{}", with_rhs(&with_params, &nf4_rhs));

    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    for (name, text) in [("matmul_f16_subgroup.wgsl", f16_module), ("matmul_nf4_subgroup.wgsl", nf4_module)] {
        let target = Path::new(&out_dir).join(name);
        std::fs::write(&target, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", target.display()));
    }
}

/// Removes the entry point whose signature starts with `signature`, with the attribute, comment
/// and blank lines above it, up to its closing brace at the start of a line.
fn without_entry(source: &str, signature: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let at = lines.iter().position(|l| l.starts_with(signature)).unwrap_or_else(|| panic!("{SOURCE}: `{signature}` not found"));
    let mut start = at;
    while start > 0 && (lines[start - 1].is_empty() || lines[start - 1].starts_with("@compute") || lines[start - 1].starts_with("//")) {
        start -= 1;
    }
    let end = at + lines[at..].iter().position(|l| *l == "}").unwrap_or_else(|| panic!("{SOURCE}: `{signature}` is not closed"));
    let mut kept: Vec<&str> = lines[..start].to_vec();
    kept.extend(&lines[end + 1..]);
    kept.join("\n") + "\n"
}

/// Returns the top-level item of `source` whose first line starts with `start`, up to the line
/// that closes it (`}` for a function, `);` for a constant array).
fn item(source: &str, start: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let at = lines.iter().position(|l| l.starts_with(start)).unwrap_or_else(|| panic!("{NF4_SOURCE}: `{start}` not found"));
    let end = at + lines[at..].iter().position(|l| *l == "}" || *l == ");").unwrap_or_else(|| panic!("{NF4_SOURCE}: `{start}` is not closed"));
    lines[at..=end].join("\n")
}

/// Replaces the rhs binding by `rhs` and every code access `rhs[q]` by `rhs_quad(q)`. Comment
/// lines are copied unchanged.
fn with_rhs(source: &str, rhs: &str) -> String {
    let mut out = String::new();
    let mut bindings = 0;
    let mut accesses = 0;
    for line in source.lines() {
        if line.starts_with(RHS_BINDING) {
            out.push_str(rhs);
            bindings += 1;
        } else if line.trim_start().starts_with("//") {
            out.push_str(line);
        } else {
            let mut rest = line;
            while let Some(start) = rest.find("rhs[") {
                let index_start = start + "rhs[".len();
                let end = index_start + rest[index_start..].find(']').unwrap_or_else(|| panic!("{SOURCE}: unclosed `rhs[` in: {line}"));
                let index = &rest[index_start..end];
                assert!(!index.contains('['), "{SOURCE}: nested brackets in an rhs index: {line}");
                out.push_str(&rest[..start]);
                out.push_str("rhs_quad(");
                out.push_str(index);
                out.push(')');
                rest = &rest[end + 1..];
                accesses += 1;
            }
            out.push_str(rest);
        }
        out.push('\n');
    }
    assert_eq!(bindings, 1, "{SOURCE}: expected one line starting with `{RHS_BINDING}`");
    assert!(accesses > 0, "{SOURCE}: no rhs access found");
    out
}
