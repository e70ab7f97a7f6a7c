//! Plain f64 CPU implementations of every kernel, forward and backward.
//!
//! These are the oracle for the GPU kernels in tests and benches. They favour obvious loops over
//! speed, index tensors row-major with the last index fastest, and use the same shape legend as
//! the kernels: B batch, T sequence length, C channels, NH heads, HS head size, V vocabulary,
//! K classes.

pub mod adamw;
pub mod attention;
pub mod crossentropy;
pub mod embedding;
pub mod gelu;
pub mod layernorm;
pub mod matmul;
pub mod norm;
pub mod pooling;
pub mod residual;

/// Central finite-difference gradient of a scalar function `f` at `x`, with step `h`.
pub fn finite_difference(x: &[f64], h: f64, mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let mut probe = x.to_vec();
    (0..x.len())
        .map(|i| {
            let original = probe[i];
            probe[i] = original + h;
            let plus = f(&probe);
            probe[i] = original - h;
            let minus = f(&probe);
            probe[i] = original;
            (plus - minus) / (2.0 * h)
        })
        .collect()
}
