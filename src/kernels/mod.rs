//! Launchers for the WGSL kernel families in `shaders/`.
//!
//! Each module owns one family: its parameter structs (laid out as in WGSL, padded to 16 bytes),
//! its workgroup size, its bindings in binding order and the dispatch-count math. A launcher
//! returns a [`Dispatch`](crate::gpu::Dispatch) that the caller records into a compute pass.
//!
//! Gradient convention: kernels that write a gradient take an `accumulate` flag. With 0 they
//! assign, with 1 they add into the existing values. Parameter gradients are always accumulated
//! and zeroed by the optimizer after it applies them; activation gradients are assigned by their
//! first producer and accumulated by the rest.

pub(crate) mod adamw;
pub(crate) mod attention;
pub(crate) mod crossentropy;
pub(crate) mod decode;
pub(crate) mod deferred_update;
pub(crate) mod dropout;
pub(crate) mod embedding;
pub(crate) mod f16_weights;
pub(crate) mod gelu;
pub(crate) mod layernorm;
pub(crate) mod lmloss;
pub(crate) mod matmul;
pub(crate) mod nf4;
pub(crate) mod norm;
pub(crate) mod pooling;
pub(crate) mod residual;



/// Every shader family, for the translation test.
#[cfg(test)]
pub(crate) const FAMILIES: &[&crate::gpu::ShaderFamily] = &[
    &residual::FAMILY,
    &matmul::FAMILY,
    &matmul::SUBGROUP_FAMILY,
    &matmul::F16_SUBGROUP_FAMILY,
    &matmul::NF4_SUBGROUP_FAMILY,
    &matmul::NARROW_SUBGROUP_FAMILY,
    &matmul::TILED_FAMILY,
    &nf4::FAMILY,
    &f16_weights::FAMILY,
    &layernorm::FAMILY,
    &gelu::FAMILY,
    &attention::FAMILY,
    &embedding::FAMILY,
    &crossentropy::FAMILY,
    &lmloss::FAMILY,
    &adamw::FAMILY,
    &deferred_update::FAMILY,
    &norm::FAMILY,
    &pooling::FAMILY,
    &decode::FAMILY,
    &dropout::FAMILY,
];

/// Every launcher's entry points with the total workgroup size it assumes.
pub(crate) const ENTRY_SIZES: &[&[(&crate::gpu::KernelEntry, u32)]] = &[
    residual::ENTRIES,
    matmul::ENTRIES,
    matmul::SUBGROUP_ENTRIES,
    matmul::F16_SUBGROUP_ENTRIES,
    matmul::NF4_SUBGROUP_ENTRIES,
    matmul::NARROW_SUBGROUP_ENTRIES,
    matmul::TILED_ENTRIES,
    nf4::ENTRIES,
    f16_weights::ENTRIES,
    layernorm::ENTRIES,
    gelu::ENTRIES,
    attention::ENTRIES,
    embedding::ENTRIES,
    crossentropy::ENTRIES,
    lmloss::ENTRIES,
    adamw::ENTRIES,
    deferred_update::ENTRIES,
    norm::ENTRIES,
    pooling::ENTRIES,
    decode::ENTRIES,
    dropout::ENTRIES,
];

/// Work items per dispatch dimension for 1-D kernels spread over a 2-D grid.
pub(crate) fn grid_1d(gpu: &crate::gpu::Gpu, items: u64, workgroup_size: u32) -> [u32; 3] {
    let groups = items.div_ceil(u64::from(workgroup_size)).max(1);
    let groups = u32::try_from(groups).unwrap_or(u32::MAX);
    crate::gpu::grid_for(groups, gpu.limits().max_compute_workgroups_per_dimension)
}

/// Workgroup counts for an indirect dispatch of 1-D work (see [`grid_1d`]), where no work at all
/// is `[0, 1, 1]`.
pub(crate) fn indirect_grid_1d(gpu: &crate::gpu::Gpu, items: u64, workgroup_size: u32) -> [u32; 3] {
    if items == 0 {
        return [0, 1, 1];
    }
    grid_1d(gpu, items, workgroup_size)
}

/// Compiles the pipeline of every kernel entry point on `gpu`, so a shader that the adapter's
/// driver rejects is found before a run needs it. Returns the number of pipelines.
pub(crate) fn compile_all(gpu: &crate::gpu::Gpu) -> Result<usize, crate::gpu::GpuError> {
    let has_subgroups = gpu.features().contains(wgpu::Features::SUBGROUP);
    let mut count = 0;
    for (kernel, _) in ENTRY_SIZES.iter().flat_map(|list| list.iter()) {
        // The subgroup variants are only ever chosen on adapters with SUBGROUP, and their module
        // cannot be created without it.
        let subgroup_families = [
            matmul::SUBGROUP_FAMILY.name,
            matmul::F16_SUBGROUP_FAMILY.name,
            matmul::NF4_SUBGROUP_FAMILY.name,
            matmul::NARROW_SUBGROUP_FAMILY.name,
        ];
        let subgroup_family = subgroup_families.contains(&kernel.family.name);
        if subgroup_family && !has_subgroups {
            continue;
        }
        // Likewise, the f16 weight kernels are only chosen where the adapter converts f16 bits.
        let f16_family = [f16_weights::FAMILY.name, matmul::F16_SUBGROUP_FAMILY.name].contains(&kernel.family.name);
        if f16_family && !gpu.half_floats() {
            continue;
        }
        gpu.pipeline(kernel)?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod translation_tests;

#[cfg(test)]
mod tests {
    #[test]
    fn every_kernel_compiles_on_the_adapter() {
        let Some(gpu) = crate::testing::test_gpu() else { return };
        let count = super::compile_all(gpu).unwrap_or_else(|e| panic!("{e}"));
        assert!(count >= 20, "only {count} kernel entry points");
    }
}
