//! Shader modules, compute pipelines with explicit bind group layouts, and recorded dispatches.

use super::{Gpu, GpuError, TensorBinding};
use std::sync::Arc;

/// One WGSL source file holding a kernel family.
pub(crate) struct ShaderFamily {
    pub name: &'static str,
    pub source: &'static str,
}

/// Access mode of one kernel binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BindingKind {
    /// `var<uniform>`: the parameter struct.
    Uniform,
    /// `var<storage, read>`.
    ReadOnly,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// One entry point of a family and its bindings in binding order (0, 1, ...).
pub(crate) struct KernelEntry {
    pub family: &'static ShaderFamily,
    pub entry: &'static str,
    pub bindings: &'static [BindingKind],
}

impl KernelEntry {
    pub fn name(&self) -> String {
        format!("{}::{}", self.family.name, self.entry)
    }
}

pub(crate) struct CachedPipeline {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// A dispatch with its pipeline and bind group created, ready to record into a compute pass.
pub(crate) struct Dispatch {
    pub label: String,
    pipeline: Arc<CachedPipeline>,
    bind_group: wgpu::BindGroup,
    pub workgroups: [u32; 3],
    // Keeps the parameter buffer alive as long as the bind group that uses it.
    _params: Option<wgpu::Buffer>,
    /// Holds the workgroup counts instead of `workgroups`, for work whose size the host changes
    /// between steps without recreating the dispatch.
    indirect: Option<wgpu::Buffer>,
}

impl Dispatch {
    pub fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        log::trace!("dispatch {} {:?}{}", self.label, self.workgroups, if self.indirect.is_some() { " at most" } else { "" });
        pass.set_pipeline(&self.pipeline.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        match &self.indirect {
            Some(counts) => pass.dispatch_workgroups_indirect(counts, 0),
            None => pass.dispatch_workgroups(self.workgroups[0], self.workgroups[1], self.workgroups[2]),
        }
    }

    /// Makes the dispatch read its workgroup counts (three u32) from `counts`, a buffer made by
    /// [`Gpu::indirect_buffer`], each time it is recorded. `workgroups` then keeps the largest
    /// counts the dispatch was sized for.
    pub fn with_indirect(mut self, counts: &wgpu::Buffer) -> Dispatch {
        self.indirect = Some(counts.clone());
        self
    }
}

/// Splits `count` workgroups into an (x, y) grid that fits `limit` per dimension; kernels that
/// take 1-D work recombine them as `id.x + id.y * num_workgroups.x * workgroup_size`.
pub(crate) fn grid_for(count: u32, limit: u32) -> [u32; 3] {
    if count <= limit {
        [count.max(1), 1, 1]
    } else {
        let y = count.div_ceil(limit);
        [count.div_ceil(y), y, 1]
    }
}

impl Gpu {
    fn module(&self, family: &'static ShaderFamily) -> Result<Arc<wgpu::ShaderModule>, GpuError> {
        let mut modules = self.modules.lock().expect("shader module cache lock poisoned");
        if let Some(module) = modules.get(family.name) {
            return Ok(module.clone());
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(family.name),
            source: wgpu::ShaderSource::Wgsl(family.source.into()),
        });
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Pipeline { kernel: family.name.to_string(), message: error.to_string() });
        }
        let module = Arc::new(module);
        modules.insert(family.name, module.clone());
        Ok(module)
    }

    pub(crate) fn pipeline(&self, kernel: &'static KernelEntry) -> Result<Arc<CachedPipeline>, GpuError> {
        let key = (kernel.family.name, kernel.entry);
        if let Some(cached) = self.pipelines.lock().expect("pipeline cache lock poisoned").get(&key) {
            return Ok(cached.clone());
        }
        let module = self.module(kernel.family)?;
        let name = kernel.name();
        let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
            .bindings
            .iter()
            .enumerate()
            .map(|(i, kind)| wgpu::BindGroupLayoutEntry {
                binding: i as u32,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: match kind {
                        BindingKind::Uniform => wgpu::BufferBindingType::Uniform,
                        BindingKind::ReadOnly => wgpu::BufferBindingType::Storage { read_only: true },
                        BindingKind::ReadWrite => wgpu::BufferBindingType::Storage { read_only: false },
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            })
            .collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let layout = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some(&name),
            entries: &entries,
        });
        let pipeline_layout = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(&name),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        log::debug!("compiling kernel {name}");
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&name),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some(kernel.entry),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Pipeline { kernel: name, message: error.to_string() });
        }
        let cached = Arc::new(CachedPipeline { pipeline, layout });
        self.pipelines.lock().expect("pipeline cache lock poisoned").insert(key, cached.clone());
        Ok(cached)
    }

    /// Creates the bind group for one dispatch of `kernel`. `params` is the kernel's uniform
    /// parameter struct when its first binding is a uniform; `buffers` are the storage bindings
    /// in order.
    pub(crate) fn dispatch(
        &self,
        kernel: &'static KernelEntry,
        label: impl Into<String>,
        params: Option<&[u8]>,
        buffers: &[TensorBinding<'_>],
        workgroups: [u32; 3],
    ) -> Result<Dispatch, GpuError> {
        let label = label.into();
        let limit = self.limits.max_compute_workgroups_per_dimension;
        for &count in &workgroups {
            if count > limit {
                return Err(GpuError::TooManyWorkgroups { label, count, limit });
            }
        }
        let has_uniform = kernel.bindings.first() == Some(&BindingKind::Uniform);
        let expected = kernel.bindings.len() - usize::from(has_uniform);
        if buffers.len() != expected || has_uniform != params.is_some() {
            return Err(GpuError::BindingCount {
                label,
                kernel: kernel.name(),
                expected,
                given: buffers.len(),
            });
        }
        let cached = self.pipeline(kernel)?;
        let params_buffer = params.map(|bytes| self.uniform_buffer(&format!("{label} params"), bytes));
        let mut entries = Vec::with_capacity(kernel.bindings.len());
        if let Some(buffer) = &params_buffer {
            entries.push(wgpu::BindGroupEntry { binding: 0, resource: buffer.as_entire_binding() });
        }
        let first = entries.len() as u32;
        for (i, binding) in buffers.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: first + i as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: binding.buffer,
                    offset: binding.offset,
                    size: std::num::NonZeroU64::new(binding.size),
                }),
            });
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&label),
            layout: &cached.layout,
            entries: &entries,
        });
        if let Some(error) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Pipeline { kernel: format!("{} ({label})", kernel.name()), message: error.to_string() });
        }
        Ok(Dispatch { label, pipeline: cached, bind_group, workgroups, _params: params_buffer, indirect: None })
    }
}
