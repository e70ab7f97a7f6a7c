//! Adapter enumeration and device creation with the adapter's own limits.

use super::{Gpu, GpuError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Graphics API searched for adapters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// Every backend wgpu was built with; Vulkan, Metal and DX12 adapters are preferred over GL.
    #[default]
    Auto,
    /// Vulkan only.
    Vulkan,
    /// Metal only.
    Metal,
    /// DirectX 12 only.
    Dx12,
    /// OpenGL (or OpenGL ES) only.
    Gl,
}

impl BackendChoice {
    fn backends(self) -> wgpu::Backends {
        match self {
            BackendChoice::Auto => wgpu::Backends::all(),
            BackendChoice::Vulkan => wgpu::Backends::VULKAN,
            BackendChoice::Metal => wgpu::Backends::METAL,
            BackendChoice::Dx12 => wgpu::Backends::DX12,
            BackendChoice::Gl => wgpu::Backends::GL,
        }
    }

    fn describe(self) -> String {
        match self {
            BackendChoice::Auto => "vulkan, metal, dx12, gl".to_string(),
            other => format!("{other:?}").to_lowercase(),
        }
    }
}

impl std::str::FromStr for BackendChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(BackendChoice::Auto),
            "vulkan" => Ok(BackendChoice::Vulkan),
            "metal" => Ok(BackendChoice::Metal),
            "dx12" => Ok(BackendChoice::Dx12),
            "gl" => Ok(BackendChoice::Gl),
            other => Err(format!("unknown backend `{other}`, expected auto, vulkan, metal, dx12 or gl")),
        }
    }
}

/// How to pick the adapter for a run.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// Backend to search.
    pub backend: BackendChoice,
    /// Index into the adapter list of that backend, as `shadertune devices` prints it; `None`
    /// picks the first hardware adapter, or the first adapter of any kind if there is none.
    pub adapter: Option<usize>,
    /// Whether kernel variants are chosen by a timed trial (cached on disk) or fixed defaults.
    pub autotune: super::Autotune,
}

/// Description of one adapter, as `shadertune devices` prints it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct AdapterSummary {
    /// Position in the list, as taken by `--gpu`.
    pub index: usize,
    /// Adapter name.
    pub name: String,
    /// Backend (Vulkan, Metal, Dx12, Gl).
    pub backend: String,
    /// Device type (DiscreteGpu, IntegratedGpu, Cpu, ...).
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Largest buffer, in bytes.
    pub max_buffer_size: u64,
    /// Workgroup (shared) memory per workgroup, in bytes.
    pub max_compute_workgroup_storage_size: u32,
    /// Invocations per workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Workgroups per dispatch dimension.
    pub max_compute_workgroups_per_dimension: u32,
    /// Features that matter to the engine and that the adapter offers.
    pub features: Vec<String>,
}

/// Features that shadertune uses when present, in the order they are listed.
const OPTIONAL_FEATURES: &[(wgpu::Features, &str)] = &[
    (wgpu::Features::TIMESTAMP_QUERY, "TIMESTAMP_QUERY"),
    (wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES, "TIMESTAMP_QUERY_INSIDE_PASSES"),
    (wgpu::Features::SHADER_F16, "SHADER_F16"),
    (wgpu::Features::SUBGROUP, "SUBGROUP"),
    (wgpu::Features::SHADER_F64, "SHADER_F64"),
];

fn enumerate(backends: wgpu::Backends) -> Vec<wgpu::Adapter> {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    pollster::block_on(wgpu::Instance::new(desc).enumerate_adapters(backends))
}

/// Adapters of `backend` in `--gpu` order. With `auto`, Vulkan, Metal and DX12 adapters
/// come first and GL adapters after them; `everything` false skips GL when a native-API adapter
/// exists, which also spares the GL driver's start-up.
fn adapters_of(backend: BackendChoice, everything: bool) -> Vec<wgpu::Adapter> {
    if backend != BackendChoice::Auto {
        return enumerate(backend.backends());
    }
    let mut found = enumerate(wgpu::Backends::PRIMARY);
    if everything || found.is_empty() {
        found.extend(enumerate(wgpu::Backends::GL));
    }
    found
}


fn no_adapter(backend: BackendChoice) -> GpuError {
    let hint = if cfg!(target_os = "linux") {
        "Install a GPU driver with Vulkan support, or on a machine without a GPU the software \
         Vulkan driver lavapipe (Debian and Ubuntu package `mesa-vulkan-drivers`)."
    } else {
        "Install or update the GPU driver, or choose another backend with --backend."
    };
    GpuError::NoAdapter { tried: backend.describe(), hint: hint.to_string() }
}

/// Lists every adapter on the chosen backend, in the order `--gpu` indexes them.
pub fn list_adapters(backend: BackendChoice) -> Vec<AdapterSummary> {
    adapters_of(backend, true)
        .iter()
        .enumerate()
        .map(|(index, adapter)| {
            let info = adapter.get_info();
            let limits = adapter.limits();
            let features = adapter.features();
            AdapterSummary {
                index,
                name: info.name.clone(),
                backend: format!("{:?}", info.backend),
                device_type: format!("{:?}", info.device_type),
                driver: format!("{} {}", info.driver, info.driver_info).trim().to_string(),
                max_storage_buffer_binding_size: limits.max_storage_buffer_binding_size,
                max_buffer_size: limits.max_buffer_size,
                max_compute_workgroup_storage_size: limits.max_compute_workgroup_storage_size,
                max_compute_invocations_per_workgroup: limits.max_compute_invocations_per_workgroup,
                max_compute_workgroups_per_dimension: limits.max_compute_workgroups_per_dimension,
                features: OPTIONAL_FEATURES
                    .iter()
                    .filter(|(f, _)| features.contains(*f))
                    .map(|(_, name)| name.to_string())
                    .collect(),
            }
        })
        .collect()
}

impl Gpu {
    /// Opens a device on the adapter chosen by `options`, with the adapter's own limits and
    /// every optional feature from the engine's list that the adapter offers.
    pub fn new(options: &GpuOptions) -> Result<Gpu, GpuError> {
        // With an explicit index, enumerate everything so that indices match `shadertune devices`.
        let found = adapters_of(options.backend, options.adapter.is_some());
        if found.is_empty() {
            return Err(no_adapter(options.backend));
        }
        let adapter = match options.adapter {
            Some(index) => found.get(index).ok_or_else(|| GpuError::AdapterIndex {
                index,
                count: found.len(),
                backends: options.backend.describe(),
            })?,
            None => found
                .iter()
                .find(|a| a.get_info().device_type != wgpu::DeviceType::Cpu)
                .unwrap_or(&found[0]),
        };
        let info = adapter.get_info();
        if info.device_type == wgpu::DeviceType::Cpu {
            log::warn!(
                "using the software adapter `{}`: kernels run on the CPU and are much slower than on a GPU, and the first run on a machine spends a few minutes compiling them (later runs reuse the driver's shader cache)",
                info.name
            );
        }
        let offered = adapter.features();
        let mut features = wgpu::Features::empty();
        for (feature, _) in OPTIONAL_FEATURES {
            if offered.contains(*feature) {
                features |= *feature;
            }
        }
        let limits = adapter.limits();
        let downlevel = adapter.get_downlevel_capabilities().flags;
        let half_floats = downlevel.contains(wgpu::DownlevelFlags::SHADER_F16_IN_F32);
        let indirect_dispatch = downlevel.contains(wgpu::DownlevelFlags::INDIRECT_EXECUTION);
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("shadertune device"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| GpuError::RequestDevice { adapter: info.name.clone(), message: e.to_string() })?;

        let uncaptured = Arc::new(Mutex::new(Vec::new()));
        let sink = uncaptured.clone();
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            log::error!("GPU error: {error}");
            sink.lock().expect("error list lock poisoned").push(error.to_string());
        }));
        let lost = Arc::new(Mutex::new(None));
        let lost_sink = lost.clone();
        device.set_device_lost_callback(move |reason, message| {
            log::error!("GPU device lost ({reason:?}): {message}");
            *lost_sink.lock().expect("lost-device lock poisoned") = Some(format!("{reason:?}: {message}"));
        });
        log::info!(
            "adapter: {} ({:?}, {:?}, driver {} {})",
            info.name,
            info.backend,
            info.device_type,
            info.driver,
            info.driver_info
        );
        Ok(Gpu {
            device,
            queue,
            info,
            limits,
            features,
            half_floats,
            indirect_dispatch,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            uncaptured,
            lost,
            placeholder: std::sync::OnceLock::new(),
            autotune: options.autotune,
            autotune_cache: super::cache_dir().map(|dir| dir.join("autotune.json")),
            tuned: Mutex::new(HashMap::new()),
        })
    }
}
