//! Adapter and device selection, buffers, pipelines and dispatch recording.
//!
//! Everything that touches wgpu directly lives here, so the kernel launchers and the executor
//! work with [`Gpu`], [`KernelEntry`], [`TensorBinding`] and [`Dispatch`] alone.

mod adapter;
mod autotune;
mod buffers;
mod pipelines;
mod profile;

pub use adapter::{list_adapters, AdapterSummary, BackendChoice, GpuOptions};
pub use autotune::{cache_dir, Autotune, CACHE_DIR_VARIABLE};
pub(crate) use buffers::TensorBinding;
pub(crate) use pipelines::{grid_for, BindingKind, Dispatch, KernelEntry, ShaderFamily};
pub(crate) use profile::median;
pub use profile::TimingSource;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Errors raised by adapter selection, resource creation and kernel execution.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuError {
    /// No adapter was found on any of the backends that were tried.
    #[error(
        "no GPU adapter found on backends {tried}. {hint}"
    )]
    NoAdapter {
        /// The backends that were asked for adapters.
        tried: String,
        /// The next step: what to install or change.
        hint: String,
    },
    /// The requested adapter index does not exist.
    #[error("adapter index {index} is out of range: {count} adapter(s) found on {backends}; run `shadertune devices` to list them")]
    AdapterIndex {
        /// The requested index.
        index: usize,
        /// How many adapters were found.
        count: usize,
        /// The backends searched.
        backends: String,
    },
    /// The device could not be created from the adapter.
    #[error("failed to create a device on adapter `{adapter}`: {message}")]
    RequestDevice {
        /// The adapter name.
        adapter: String,
        /// The driver's message.
        message: String,
    },
    /// A shader module or compute pipeline failed validation or compilation.
    #[error("kernel `{kernel}` failed to compile: {message}")]
    Pipeline {
        /// `family::entry_point` of the failing kernel.
        kernel: String,
        /// The validation or compilation message.
        message: String,
    },
    /// A buffer is larger than the device allows.
    #[error("buffer `{label}` needs {bytes} bytes, more than the adapter's {limit_name} of {limit} bytes; reduce the batch size or sequence length")]
    BufferTooLarge {
        /// The buffer label.
        label: String,
        /// Requested size in bytes.
        bytes: u64,
        /// Name of the exceeded limit.
        limit_name: &'static str,
        /// The limit in bytes.
        limit: u64,
    },
    /// A planned tensor does not fit in one storage binding of the adapter.
    #[error("tensor `{tensor}` with shape {shape} needs {bytes} bytes, more than the adapter's storage binding limit of {limit} bytes; reduce --batch-size or --max-length, or train fewer layers with --train")]
    PlanTooLarge {
        /// The tensor name.
        tensor: String,
        /// Its shape.
        shape: String,
        /// Its size in bytes.
        bytes: u64,
        /// The binding limit in bytes.
        limit: u64,
    },
    /// A dispatch needs more workgroups than the device allows per dimension.
    #[error("dispatch `{label}` needs {count} workgroups in one dimension, more than the adapter's max_compute_workgroups_per_dimension of {limit}")]
    TooManyWorkgroups {
        /// The dispatch label.
        label: String,
        /// The requested workgroup count.
        count: u32,
        /// The device limit.
        limit: u32,
    },
    /// A binding list does not match the kernel's declared bindings.
    #[error("dispatch `{label}` binds {given} buffers, kernel `{kernel}` declares {expected}")]
    BindingCount {
        /// The dispatch label.
        label: String,
        /// `family::entry_point`.
        kernel: String,
        /// Declared storage bindings.
        expected: usize,
        /// Given storage bindings.
        given: usize,
    },
    /// The driver reported an error while executing submitted work.
    #[error("the GPU reported an error while running `{context}`: {message}")]
    Execution {
        /// The work that was running.
        context: String,
        /// The driver's message.
        message: String,
    },
    /// The device was lost (driver reset, out of memory, or the adapter went away).
    #[error("the GPU device was lost while running `{context}`: {message}")]
    DeviceLost {
        /// The work that was running.
        context: String,
        /// The driver's message.
        message: String,
    },
    /// A weight cannot be stored in the encoding the plan gives it.
    #[error("weight `{name}` cannot be stored as {encoding}: {message}")]
    WeightEncoding {
        /// The weight.
        name: String,
        /// The encoding, such as NF4.
        encoding: String,
        /// Why not.
        message: String,
    },
}

/// An open device with its queue, limits and a cache of compiled kernels.
pub struct Gpu {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    limits: wgpu::Limits,
    features: wgpu::Features,
    /// Whether shaders may convert between f32 and f16 bits (`unpack2x16float`).
    half_floats: bool,
    /// Whether dispatches may read their workgroup counts from a buffer.
    indirect_dispatch: bool,
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<(&'static str, &'static str), Arc<pipelines::CachedPipeline>>>,
    /// Errors reported outside an error scope, kept until the next [`Gpu::check_errors`].
    uncaptured: Arc<Mutex<Vec<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    /// A small zeroed buffer bound where a kernel's optional input is absent.
    placeholder: std::sync::OnceLock<wgpu::Buffer>,
    /// Whether kernel variants are chosen by measurement.
    autotune: Autotune,
    /// The autotune cache file, `None` where no cache directory is known.
    pub(crate) autotune_cache: Option<std::path::PathBuf>,
    /// Variant chosen per kernel family on this device, once asked for.
    tuned: Mutex<HashMap<String, String>>,
}

impl Gpu {
    /// Name, backend, device type and driver of the adapter behind this device.
    pub fn info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// Returns the limits the device was created with (the adapter's own limits).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Returns the features enabled on the device.
    pub fn features(&self) -> wgpu::Features {
        self.features
    }

    /// Returns whether shaders may use `unpack2x16float`, which the f16 weight kernels need. wgpu
    /// 30 grants it to every adapter except llvmpipe's Vulkan driver without `SHADER_F16`.
    pub fn half_floats(&self) -> bool {
        self.half_floats
    }

    /// Returns whether dispatches may read their workgroup counts from a buffer
    /// ([`Dispatch::with_indirect`]), wgpu's `DownlevelFlags::INDIRECT_EXECUTION`, which WebGL2,
    /// OpenGL ES 3.0 and the oldest Metal GPUs lack.
    pub fn indirect_dispatch(&self) -> bool {
        self.indirect_dispatch
    }

    /// Returns one line naming the adapter, backend and driver, for logs and reports.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?}, driver {} {})",
            self.info.name,
            self.info.backend,
            self.info.device_type,
            self.info.driver,
            self.info.driver_info
        )
    }

    /// Returns an error if the driver reported an uncaptured error or a lost device since the
    /// last call.
    pub fn check_errors(&self, context: &str) -> Result<(), GpuError> {
        if let Some(message) = self.lost.lock().expect("lost-device lock poisoned").clone() {
            return Err(GpuError::DeviceLost { context: context.to_string(), message });
        }
        let mut errors = self.uncaptured.lock().expect("error list lock poisoned");
        if errors.is_empty() {
            return Ok(());
        }
        let message = errors.join("; ");
        errors.clear();
        Err(GpuError::Execution { context: context.to_string(), message })
    }

    /// Blocks until all submitted work has finished.
    pub fn wait(&self, context: &str) -> Result<(), GpuError> {
        self.device
            .poll(wgpu::PollType::Wait { submission_index: None, timeout: None })
            .map_err(|e| GpuError::Execution { context: context.to_string(), message: e.to_string() })?;
        self.check_errors(context)
    }

    /// Compiles the pipeline of every kernel entry point, so that a shader this adapter's driver
    /// rejects is found before a run needs it. Returns the number of pipelines compiled.
    pub fn compile_kernels(&self) -> Result<usize, GpuError> {
        crate::kernels::compile_all(self)
    }

    /// A 16-byte zeroed storage buffer to bind in place of an absent optional input (a bias,
    /// for example); kernels read it only when their parameters mark the input as present.
    pub(crate) fn placeholder(&self) -> TensorBinding<'_> {
        let buffer = self.placeholder.get_or_init(|| {
            self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("absent optional input"),
                size: 16,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        });
        TensorBinding::whole(buffer)
    }

    /// Records `dispatches` into one compute pass, submits, and waits for completion.
    pub(crate) fn run(&self, label: &str, dispatches: &[Dispatch]) -> Result<(), GpuError> {
        let mut encoder =
            self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(label),
                timestamp_writes: None,
            });
            for dispatch in dispatches {
                dispatch.record(&mut pass);
            }
        }
        self.queue.submit(Some(encoder.finish()));
        self.wait(label)
    }
}
