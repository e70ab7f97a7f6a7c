//! Global L2 norm of a set of gradient tensors and the clipping coefficient derived from it.

/// Added to the norm before dividing, as `torch.nn.utils.clip_grad_norm_` does, so that a zero
/// gradient does not divide by zero.
pub const CLIP_EPSILON: f64 = 1e-6;

/// Computes the L2 norm of all elements of all tensors taken together: `sqrt(sum_i x_i^2)`.
///
/// # Shapes
/// - `tensors`: any number of flat tensors of any length
/// - returns a scalar
pub fn global_norm(tensors: &[&[f64]]) -> f64 {
    tensors.iter().flat_map(|t| t.iter()).map(|x| x * x).sum::<f64>().sqrt()
}

/// Computes the factor that clipping by global norm multiplies every gradient by:
/// `min(1, max_norm / (total_norm + CLIP_EPSILON))`, or 1 when `max_norm <= 0` (no clipping).
pub fn clip_coefficient(total_norm: f64, max_norm: f64) -> f64 {
    if max_norm <= 0.0 {
        return 1.0;
    }
    (max_norm / (total_norm + CLIP_EPSILON)).min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_norm_of_pythagorean_triple() {
        let a = [3.0];
        let b = [0.0, 4.0];
        assert_eq!(global_norm(&[&a, &b]), 5.0);
    }

    #[test]
    fn clip_coefficient_cases() {
        assert_eq!(clip_coefficient(10.0, 0.0), 1.0, "max_norm 0 disables clipping");
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0, "a norm below max_norm is left alone");
        let c = clip_coefficient(4.0, 1.0);
        assert!((c - 1.0 / (4.0 + CLIP_EPSILON)).abs() < 1e-15, "clip_coefficient(4, 1) = {c}");
    }
}
