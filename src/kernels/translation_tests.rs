//! Every shader family parses, validates and translates to SPIR-V (Vulkan), MSL (Metal), HLSL
//! (DX12) and GLSL (OpenGL) with naga, and every launcher's workgroup size matches its shader.

use super::FAMILIES;
use naga::back::{glsl, hlsl, msl, spv};
use naga::valid::{Capabilities, ValidationFlags, Validator};

fn parse(name: &str, source: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(source)
        .unwrap_or_else(|e| panic!("shaders/{name}.wgsl does not parse:\n{}", e.emit_to_string(source)));
    // Subgroup operations and f16 conversions (`unpack2x16float`) are the optional capabilities
    // the kernels may use.
    let caps = Capabilities::SUBGROUP | Capabilities::SHADER_FLOAT16 | Capabilities::SHADER_FLOAT16_IN_FLOAT32;
    let info = Validator::new(ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("shaders/{name}.wgsl does not validate:\n{}", e.emit_to_string(source)));
    (module, info)
}

#[test]
fn shaders_translate_to_every_backend() {
    for family in FAMILIES {
        let (module, info) = parse(family.name, family.source);
        assert!(!module.entry_points.is_empty(), "shaders/{}.wgsl has no entry point", family.name);

        spv::write_vec(&module, &info, &spv::Options::default(), None)
            .unwrap_or_else(|e| panic!("{}: SPIR-V translation failed: {e}", family.name));
        msl::write_string(&module, &info, &msl::Options::default(), &msl::PipelineOptions::default())
            .unwrap_or_else(|e| panic!("{}: MSL translation failed: {e}", family.name));

        for entry in &module.entry_points {
            assert_ne!(entry.name, "main", "{}: an entry point is called `main`", family.name);
            let hlsl_pipeline = hlsl::PipelineOptions {
                entry_point: Some((entry.stage, entry.name.clone())),
            };
            let hlsl_options = hlsl::Options { fake_missing_bindings: true, ..Default::default() };
            let mut hlsl_out = String::new();
            hlsl::Writer::new(&mut hlsl_out, &hlsl_options, &hlsl_pipeline)
                .write(&module, &info, None)
                .unwrap_or_else(|e| panic!("{}::{}: HLSL translation failed: {e}", family.name, entry.name));

            let glsl_pipeline = glsl::PipelineOptions {
                shader_stage: entry.stage,
                entry_point: entry.name.clone(),
                multiview: None,
            };
            let mut glsl_out = String::new();
            let glsl_options = glsl::Options::default();
            glsl::Writer::new(
                &mut glsl_out,
                &module,
                &info,
                &glsl_options,
                &glsl_pipeline,
                naga::proc::BoundsCheckPolicies::default(),
            )
            .and_then(|mut w| w.write())
            .unwrap_or_else(|e| panic!("{}::{}: GLSL translation failed: {e}", family.name, entry.name));
        }
    }
}

#[test]
fn workgroup_sizes_match_launchers() {
    for (kernel, size) in super::ENTRY_SIZES.iter().flat_map(|list| list.iter()) {
        let (module, _) = parse(kernel.family.name, kernel.family.source);
        let entry = module
            .entry_points
            .iter()
            .find(|e| e.name == kernel.entry)
            .unwrap_or_else(|| panic!("{}: entry point not found in shaders/{}.wgsl", kernel.name(), kernel.family.name));
        let total: u32 = entry.workgroup_size.iter().product();
        assert_eq!(total, *size, "{}: shader workgroup size {:?}, launcher expects {size}", kernel.name(), entry.workgroup_size);
    }
}

#[test]
fn every_entry_point_has_a_launcher() {
    for family in FAMILIES {
        let (module, _) = parse(family.name, family.source);
        for entry in &module.entry_points {
            let known = super::ENTRY_SIZES
                .iter()
                .flat_map(|list| list.iter())
                .any(|(k, _)| k.family.name == family.name && k.entry == entry.name);
            assert!(known, "{}::{} has no launcher entry", family.name, entry.name);
        }
    }
}
