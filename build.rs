//! Derives `matmul_f16_subgroup.wgsl` (in OUT_DIR) from `shaders/matmul_subgroup.wgsl`: the same
//! subgroup products with the rhs operand, a frozen linear weight, stored as f16 pairs. Deriving
//! the file keeps one copy of the 2,000 lines of unrolled products, so a change to the f32 kernel
//! reaches the f16 one.

use std::path::Path;

const SOURCE: &str = "shaders/matmul_subgroup.wgsl";
const TARGET: &str = "matmul_f16_subgroup.wgsl";

/// The binding that the derived module replaces, exactly as the f32 module declares it.
const RHS_BINDING: &str = "@group(0) @binding(3) var<storage, read> rhs: array<vec4<f32>>;";

/// The entry point that the derived module leaves out: a frozen weight is never the rhs of a tn
/// product (its gradient is not computed).
const UNUSED_ENTRY: &str = "fn matmul_tn(";

const HEADER: &str = "\
// Derived by build.rs from shaders/matmul_subgroup.wgsl; edit that file, not this one.
//
// The nn and nt subgroup products of that file with the rhs operand stored in f16, as
// src/kernels/f16_weights.rs packs a frozen linear weight. Element e of rhs is the low half of
// u32 e / 2 when e is even and the high half when it is odd. Every load of four consecutive
// elements (a quad, at quad index q) reads one vec2<u32> and widens it with unpack2x16float;
// everything else, f32 arithmetic included, is the f32 module's code. The launcher uses it only
// where that module's vec4 conditions hold, so every quad starts at an element index that is a
// multiple of 4 and lies inside one vec2<u32>.

";

const RHS_F16: &str = "\
@group(0) @binding(3) var<storage, read> rhs_f16: array<vec2<u32>>; // rhs as f16 pairs

// Elements 4 q .. 4 q + 3 of rhs, widened to f32.
fn rhs_quad(q: u32) -> vec4<f32> {
    let pair = rhs_f16[q];
    return vec4<f32>(unpack2x16float(pair.x), unpack2x16float(pair.y));
}";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-changed=build.rs");
    let source = std::fs::read_to_string(SOURCE).unwrap_or_else(|e| panic!("cannot read {SOURCE}: {e}"));
    let derived = derive_f16(&without_entry(&source, UNUSED_ENTRY));
    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    let target = Path::new(&out_dir).join(TARGET);
    std::fs::write(&target, derived).unwrap_or_else(|e| panic!("cannot write {}: {e}", target.display()));
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

/// Replaces the rhs binding by its f16 form and every code access `rhs[q]` by `rhs_quad(q)`.
/// Comment lines are copied unchanged.
fn derive_f16(source: &str) -> String {
    let mut out = String::from(HEADER);
    let mut bindings = 0;
    let mut accesses = 0;
    for line in source.lines() {
        if line.starts_with(RHS_BINDING) {
            out.push_str(RHS_F16);
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
