//! Kernel timing with timestamp queries, or the wall clock where the adapter has none.

use super::{Dispatch, Gpu, GpuError};
use std::time::Instant;

/// Source of a measured duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TimingSource {
    /// GPU timestamp queries written at the start and end of the compute pass.
    Timestamps,
    /// Host wall clock around submit and a blocking device poll.
    WallClock,
}

impl Gpu {
    /// Returns the timing source that [`Gpu::time_dispatches`] uses on this device.
    pub fn timing_source(&self) -> TimingSource {
        if self.features.contains(wgpu::Features::TIMESTAMP_QUERY) {
            TimingSource::Timestamps
        } else {
            TimingSource::WallClock
        }
    }

    /// Runs `dispatches` as one compute pass `warmup + repeats` times and returns the duration of
    /// each timed repeat in milliseconds.
    pub(crate) fn time_dispatches(
        &self,
        label: &str,
        dispatches: &[Dispatch],
        warmup: usize,
        repeats: usize,
    ) -> Result<Vec<f64>, GpuError> {
        for _ in 0..warmup {
            self.run(label, dispatches)?;
        }
        let mut times = Vec::with_capacity(repeats);
        match self.timing_source() {
            TimingSource::Timestamps => {
                let query_set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
                    label: Some("kernel timestamps"),
                    ty: wgpu::QueryType::Timestamp,
                    count: 2,
                });
                let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("timestamp resolve"),
                    size: 16,
                    usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                let period_ns = f64::from(self.queue.get_timestamp_period());
                for _ in 0..repeats {
                    let mut encoder = self
                        .device
                        .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
                    {
                        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some(label),
                            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                                query_set: &query_set,
                                beginning_of_pass_write_index: Some(0),
                                end_of_pass_write_index: Some(1),
                            }),
                        });
                        for dispatch in dispatches {
                            dispatch.record(&mut pass);
                        }
                    }
                    encoder.resolve_query_set(&query_set, 0..2, &resolve, 0);
                    self.queue.submit(Some(encoder.finish()));
                    let ticks: Vec<u64> = self.read(&resolve, 0, 2)?;
                    times.push(ticks[1].saturating_sub(ticks[0]) as f64 * period_ns / 1e6);
                }
            }
            TimingSource::WallClock => {
                for _ in 0..repeats {
                    let start = Instant::now();
                    self.run(label, dispatches)?;
                    times.push(start.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        Ok(times)
    }
}

/// Median of a non-empty list of durations.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[sorted.len() / 2]
}
