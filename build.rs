//! Derives three modules (in OUT_DIR) from `shaders/matmul_subgroup.wgsl`: the same subgroup
//! products with the rhs operand, a frozen linear weight, stored as f16 pairs
//! (`matmul_f16_subgroup.wgsl`) or as NF4 codes with block scales (`matmul_nf4_subgroup.wgsl`),
//! and the f32 products with blocks of 32 instead of 128 result columns
//! (`matmul_narrow_subgroup.wgsl`), for the attention products with at most 64 result columns
//! (a head's channels). Deriving the files keeps one copy of the 2,000 lines of
//! unrolled products, so a change to the f32 kernel reaches the others.

use std::path::Path;

const SOURCE: &str = "shaders/matmul_subgroup.wgsl";
/// The NF4 decoding functions come from the register-blocked NF4 kernel, so both decode alike.
const NF4_SOURCE: &str = "shaders/matmul_nf4.wgsl";

/// The binding that the derived modules replace, exactly as the f32 module declares it.
const RHS_BINDING: &str = "@group(0) @binding(3) var<storage, read> rhs: array<vec4<f32>>;";
/// The last field of the f32 module's parameter struct, after which the NF4 module adds its own.
const LAST_PARAM: &str = "    out_head_stride: u32,";

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

const NARROW_HEADER: &str = "\
// Derived by build.rs from shaders/matmul_subgroup.wgsl; edit that file, not this one.
//
// The three subgroup products of that file with blocks of BLOCK_ROWS x 32 results instead of
// BLOCK_ROWS x 128: each lane keeps only its column quad q = 0 (columns 4 lane + 0..3 of the
// block), so the statements and accumulators of quads 1 to 3 are left out and acc[4 r] becomes
// acc[r]. The comments below are those of the wide module. The attention launcher uses these
// entry points for products with at most 64 result columns (a head's channels), where the wide
// block would compute 3 or 1 columns that are thrown away for every one that is kept.
";

/// The helper of the wide module that stores a block row's four quads, and its narrow
/// replacement, which stores quad 0.
const WIDE_STORE_ROW: &str = "fn store_row(";
const WIDE_STORE_ROW_COMMENT: &str = "// Stores this lane's four quads q0..q3 of block row `r`, each plus its bias quad.";
const NARROW_STORE_ROW: &str = "\
// Stores this lane's quad q0 of block row `r`, plus its bias quad.
fn store_row(origin: Origin, lane: u32, r: u32, q0: vec4<f32>, offsets: array<vec4<f32>, 4>) {
    let row = origin.row0 + r;
    if (!origin.inside || row >= params.rows) {
        return;
    }
    store_quad(origin.out_offset, row, origin.col0 + lane * 4u, q0 + offsets[0]);
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

    let decoding = ["const NF4_CODES = ", "fn block_scale(", "fn code_values("].map(|start| item(NF4_SOURCE, &nf4, start)).join("\n\n");
    let nf4_rhs = format!("{NF4_RHS}\n\n{decoding}");
    let with_params = source.replacen(LAST_PARAM, &format!("{LAST_PARAM}\n{NF4_PARAMS}"), 1);
    assert_ne!(with_params, source, "{SOURCE}: the parameter struct does not end with `{LAST_PARAM}`");
    let nf4_module = format!("{COMMON_HEADER}{NF4_HEADER}{}", with_rhs(&with_params, &nf4_rhs));

    let narrow_module = format!("{NARROW_HEADER}{}", narrow(&read(SOURCE)));

    let out_dir = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    for (name, text) in [
        ("matmul_f16_subgroup.wgsl", f16_module),
        ("matmul_nf4_subgroup.wgsl", nf4_module),
        ("matmul_narrow_subgroup.wgsl", narrow_module),
    ] {
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

/// Returns the top-level item of `source` (the text of `file`) whose first line starts with
/// `start`, up to the line that closes it (`}` for a function, `);` for a constant array).
fn item(file: &str, source: &str, start: &str) -> String {
    let lines: Vec<&str> = source.lines().collect();
    let at = lines.iter().position(|l| l.starts_with(start)).unwrap_or_else(|| panic!("{file}: `{start}` not found"));
    let end = at + lines[at..].iter().position(|l| *l == "}" || *l == ");").unwrap_or_else(|| panic!("{file}: `{start}` is not closed"));
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

/// Keeps column quad 0 of every lane in the wide module `source`: BLOCK_COLS becomes 32, the
/// statements that load or regroup rhs values of quads 1 to 3 are dropped (`qb<q>`, `qc<q><c>`,
/// `t<q><c>`, `b<s><q>` for q > 0), as are the accumulator updates of acc[n] with n % 4 != 0, and
/// every other acc[4 r] is renamed acc[r]. Every statement of a line is judged on its own. The
/// result is checked: no name of a dropped value is left, and each entry point keeps a quarter
/// of its accumulator updates and one store per block row.
fn narrow(source: &str) -> String {
    let wide_cols = "const BLOCK_COLS: u32 = 128u;";
    assert!(source.contains(wide_cols), "{SOURCE}: `{wide_cols}` not found");
    let source = source.replacen(wide_cols, "const BLOCK_COLS: u32 = 32u;", 1);
    let wide_acc = "var acc: array<vec4<f32>, 384>;";
    assert_eq!(source.matches(wide_acc).count(), ENTRY_POINTS, "{SOURCE}: expected {ENTRY_POINTS} `{wide_acc}`");
    let source = source.replace(wide_acc, "var acc: array<vec4<f32>, 96>;");
    let store_row = format!("{WIDE_STORE_ROW_COMMENT}\n{}", item(SOURCE, &source, WIDE_STORE_ROW));
    assert!(source.contains(&store_row), "{SOURCE}: `{WIDE_STORE_ROW}` does not follow `{WIDE_STORE_ROW_COMMENT}`");
    let source = source.replacen(&store_row, NARROW_STORE_ROW, 1);

    let wide_updates = source.lines().filter(|l| l.trim_start().starts_with("acc[")).count();
    let mut out = String::new();
    for line in source.lines() {
        let body = line.trim_start();
        let rewritten = !body.starts_with("//") && body.ends_with(';') && (body.starts_with("let ") || body.starts_with("acc[") || body.starts_with("store_row("));
        if !rewritten {
            assert!(body.starts_with("//") || !body.contains("acc["), "{SOURCE}: an accumulator outside a statement the narrowing rewrites: {line}");
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let indent = &line[..line.len() - body.len()];
        let statements: Vec<String> = body
            .split_inclusive(';')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .filter_map(narrow_statement)
            .collect();
        if !statements.is_empty() {
            out.push_str(indent);
            out.push_str(&statements.join(" "));
            out.push('\n');
        }
    }
    for line in out.lines().filter(|l| !l.trim_start().starts_with("//")) {
        for word in line.split(|c: char| !c.is_ascii_alphanumeric() && c != '_') {
            assert!(!dropped_name(word), "{SOURCE}: the narrow module still uses `{word}` in: {line}");
        }
    }
    let updates = out.lines().filter(|l| l.trim_start().starts_with("acc[")).count();
    assert_eq!(4 * updates, wide_updates, "{SOURCE}: the narrow module keeps {updates} of {wide_updates} accumulator updates");
    let stores = out.lines().filter(|l| l.trim_start().starts_with("store_row(origin, lane, ")).count();
    assert_eq!(stores, ENTRY_POINTS * 96, "{SOURCE}: the narrow module has {stores} block-row stores");
    out
}

/// Entry points of the wide module (matmul_nn, matmul_nt, matmul_tn).
const ENTRY_POINTS: usize = 3;

/// True for the names of values of column quads 1 to 3: qb<q>, qc<q><c>, t<q><c> and b<s><q>.
fn dropped_name(word: &str) -> bool {
    let digits = |rest: &str| rest.len() == 1 || rest.len() == 2;
    let all_digits = |rest: &str| rest.chars().all(|c| c.is_ascii_digit());
    let quad_first = |prefix: &str| {
        word.strip_prefix(prefix).is_some_and(|rest| digits(rest) && all_digits(rest) && !rest.starts_with('0'))
    };
    let quad_second = word.len() == 3
        && word.starts_with('b')
        && word[1..].chars().all(|c| c.is_ascii_digit())
        && !word.ends_with('0');
    (quad_first("qb") && word.len() == 3) || (quad_first("qc") && word.len() == 4) || (quad_first("t") && word.len() == 3) || quad_second
}

/// Rewrites one statement of the wide module for the narrow one, or returns `None` to drop it.
/// Every accumulator index must be a decimal literal; another form stops the build.
fn narrow_statement(statement: &str) -> Option<String> {
    if let Some(rest) = statement.strip_prefix("let ") {
        let name = rest.split([' ', ':']).next().unwrap_or_default();
        if dropped_name(name) {
            return None;
        }
    }
    if let Some(rest) = statement.strip_prefix("store_row(origin, lane, ") {
        // store_row(origin, lane, <r>u, acc[..], acc[..], acc[..], acc[..], offsets): quad 0 only.
        let parts: Vec<&str> = rest.trim_end_matches(");").split(", ").collect();
        assert_eq!(parts.len(), 6, "{SOURCE}: unexpected store_row call: {statement}");
        return Some(renamed_accumulators(&format!("store_row(origin, lane, {}, {}, {});", parts[0], parts[1], parts[5])));
    }
    // An accumulator update of another column quad.
    if let Some(rest) = statement.strip_prefix("acc[") {
        if !accumulator_index(rest, statement).is_multiple_of(4) {
            return None;
        }
    }
    Some(renamed_accumulators(statement))
}

/// Parses the index of the accumulator reference whose text after `acc[` is `rest`.
fn accumulator_index(rest: &str, statement: &str) -> usize {
    let digits = &rest[..rest.find(']').unwrap_or_else(|| panic!("{SOURCE}: unclosed `acc[` in: {statement}"))];
    digits.parse().unwrap_or_else(|_| panic!("{SOURCE}: accumulator index `{digits}` is not a decimal literal in: {statement}"))
}

/// `statement` with every acc[4 r] renamed acc[r]; an index of another column quad stops the
/// build.
fn renamed_accumulators(statement: &str) -> String {
    let mut out = String::new();
    let mut rest = statement;
    while let Some(at) = rest.find("acc[") {
        let after = &rest[at + "acc[".len()..];
        let index = accumulator_index(after, statement);
        assert!(index.is_multiple_of(4), "{SOURCE}: acc[{index}] of another column quad in a kept statement: {statement}");
        out.push_str(&rest[..at]);
        out.push_str(&format!("acc[{}]", index / 4));
        rest = &after[after.find(']').expect("checked by accumulator_index") + 1..];
    }
    out.push_str(rest);
    out
}
