//! Storage buffers: creation within the adapter's limits, upload and read-back.

use super::{Gpu, GpuError};

/// A range of a storage buffer bound to one kernel binding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TensorBinding<'a> {
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset; a multiple of `min_storage_buffer_offset_alignment`.
    pub offset: u64,
    /// Byte length of the bound range.
    pub size: u64,
}

impl<'a> TensorBinding<'a> {
    /// Binds the whole buffer.
    pub fn whole(buffer: &'a wgpu::Buffer) -> Self {
        TensorBinding { buffer, offset: 0, size: buffer.size() }
    }
}

impl<'a> From<&'a wgpu::Buffer> for TensorBinding<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        TensorBinding::whole(buffer)
    }
}

/// Smallest buffer created, in bytes: WGSL arrays need at least one element, and a size that is a
/// multiple of 16 keeps vec4 access in bounds.
const MIN_BUFFER_BYTES: u64 = 16;

fn padded(bytes: u64) -> u64 {
    bytes.max(MIN_BUFFER_BYTES).div_ceil(16) * 16
}

impl Gpu {
    /// Checks a storage buffer size against the binding and buffer limits.
    pub(crate) fn check_storage_size(&self, label: &str, bytes: u64) -> Result<(), GpuError> {
        let limits = &self.limits;
        if bytes > limits.max_buffer_size {
            return Err(GpuError::BufferTooLarge {
                label: label.to_string(),
                bytes,
                limit_name: "max_buffer_size",
                limit: limits.max_buffer_size,
            });
        }
        if bytes > limits.max_storage_buffer_binding_size {
            return Err(GpuError::BufferTooLarge {
                label: label.to_string(),
                bytes,
                limit_name: "max_storage_buffer_binding_size",
                limit: limits.max_storage_buffer_binding_size,
            });
        }
        Ok(())
    }

    /// Creates a zero-filled storage buffer of at least `bytes` bytes that can be copied to and from.
    pub(crate) fn storage_buffer(&self, label: &str, bytes: u64) -> Result<wgpu::Buffer, GpuError> {
        let size = padded(bytes);
        self.check_storage_size(label, size)?;
        log::debug!("allocating buffer `{label}`: {size} bytes");
        Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        }))
    }

    /// Creates a buffer for the workgroup counts of an indirect dispatch (see
    /// [`Dispatch::with_indirect`](super::Dispatch::with_indirect)), holding `[0, 1, 1]`: no work.
    pub(crate) fn indirect_buffer(&self, label: &str) -> wgpu::Buffer {
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: 12,
            usage: wgpu::BufferUsages::INDIRECT | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        self.write(&buffer, 0, &[0u32, 1, 1]);
        buffer
    }

    /// Creates a storage buffer holding `data`.
    pub(crate) fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer, GpuError> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buffer = self.storage_buffer(label, bytes.len() as u64)?;
        self.write(&buffer, 0, data);
        Ok(buffer)
    }

    /// Writes `data` into `buffer` at byte `offset`; the copy happens before the next submit.
    pub(crate) fn write<T: bytemuck::Pod>(&self, buffer: &wgpu::Buffer, offset: u64, data: &[T]) {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.is_empty() {
            return;
        }
        if bytes.len() % 4 == 0 {
            self.queue.write_buffer(buffer, offset, bytes);
        } else {
            // write_buffer needs a length that is a multiple of 4 bytes.
            let mut padded_bytes = bytes.to_vec();
            padded_bytes.resize(bytes.len().div_ceil(4) * 4, 0);
            self.queue.write_buffer(buffer, offset, &padded_bytes);
        }
    }

    /// Creates a uniform buffer holding one parameter struct.
    pub(crate) fn uniform_buffer(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        let size = padded(bytes.len() as u64);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut data = bytes.to_vec();
        data.resize(size as usize, 0);
        self.queue.write_buffer(&buffer, 0, &data);
        buffer
    }

    /// Copies `len` elements starting at element `start` of `buffer` back to the host, waiting for
    /// all submitted work first.
    pub(crate) fn read<T: bytemuck::Pod>(
        &self,
        buffer: &wgpu::Buffer,
        start: usize,
        len: usize,
    ) -> Result<Vec<T>, GpuError> {
        let elem = std::mem::size_of::<T>() as u64;
        let offset = start as u64 * elem;
        let bytes = len as u64 * elem;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        // Copies need 4-byte aligned offsets and sizes.
        let aligned_offset = offset / 4 * 4;
        let aligned_bytes = (offset + bytes).div_ceil(4) * 4 - aligned_offset;
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back staging"),
            size: aligned_bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut encoder = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("read-back") });
        encoder.copy_buffer_to_buffer(buffer, aligned_offset, &staging, 0, aligned_bytes);
        self.queue.submit(Some(encoder.finish()));
        let (sender, receiver) = std::sync::mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |result| {
            // The receiver outlives the poll below, so a failed send cannot happen.
            let _ = sender.send(result);
        });
        self.wait("read-back")?;
        let mapped = receiver
            .recv()
            .map_err(|e| GpuError::Execution { context: "read-back".into(), message: e.to_string() })?;
        mapped.map_err(|e| GpuError::Execution { context: "read-back".into(), message: e.to_string() })?;
        let view = staging
            .get_mapped_range(..)
            .map_err(|e| GpuError::Execution { context: "read-back".into(), message: e.to_string() })?;
        let skip = (offset - aligned_offset) as usize;
        let slice = &view[skip..skip + bytes as usize];
        // The staging copy may not be aligned for T, so copy byte-wise.
        let mut out = vec![T::zeroed(); len];
        bytemuck::cast_slice_mut::<T, u8>(&mut out).copy_from_slice(slice);
        drop(view);
        staging.unmap();
        Ok(out)
    }
}
