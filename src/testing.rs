//! Helpers shared by the unit tests: one device per test process, seeded inputs, tolerances.

use crate::gpu::{Gpu, GpuOptions};
use rand::{Rng, SeedableRng};
use std::sync::OnceLock;

/// Returns the device shared by every GPU test of this process, or `None` (after printing why) when no
/// adapter exists and `REQUIRE_GPU` is not set to 1.
pub(crate) fn test_gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::new(&GpuOptions::default()) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            if std::env::var("REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("REQUIRE_GPU=1 but no device could be opened: {e}");
            }
            eprintln!("skipping GPU test: {e}");
            None
        }
    })
    .as_ref()
}

/// `len` floats drawn uniformly from [-1, 1) with a seeded ChaCha generator.
pub(crate) fn random_vec(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// Asserts `|got - want| <= atol + rtol * |want|` for every element, and names the worst element
/// with both values and the maximum errors when it fails.
#[track_caller]
pub(crate) fn assert_close(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length {} but expected {}", got.len(), want.len());
    let mut worst: Option<(usize, f64)> = None;
    let mut max_abs: f64 = 0.0;
    let mut max_rel: f64 = 0.0;
    let mut failures = 0usize;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let g = f64::from(g);
        let err = (g - w).abs();
        max_abs = max_abs.max(err);
        if w != 0.0 {
            max_rel = max_rel.max(err / w.abs());
        }
        let excess = err - (atol + rtol * w.abs());
        if !(excess <= 0.0) {
            failures += 1;
            if worst.is_none_or(|(_, e)| excess > e || excess.is_nan()) {
                worst = Some((i, excess));
            }
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: {failures} of {} elements outside atol {atol:e} + rtol {rtol:e}; worst at index {i}: \
             got {} expected {}; max abs error {max_abs:e}, max rel error {max_rel:e}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// f64 copy of an f32 slice.
pub(crate) fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}
