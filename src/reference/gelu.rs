//! GELU with GPT-2's tanh approximation (`gelu_new` in Hugging Face transformers):
//! `gelu(x) = 0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`.

/// `sqrt(2 / pi)`, the scale inside the tanh.
pub const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
/// Coefficient of the cubic term inside the tanh.
pub const CUBIC_COEFFICIENT: f64 = 0.044_715;

fn tanh_argument(x: f64) -> f64 {
    SQRT_2_OVER_PI * (x + CUBIC_COEFFICIENT * x * x * x)
}

/// Applies GELU elementwise.
///
/// # Shapes
/// - `inp`: any, N elements
/// - returns `out`: same as `inp`
pub fn gelu_forward(inp: &[f64]) -> Vec<f64> {
    inp.iter().map(|&x| 0.5 * x * (1.0 + tanh_argument(x).tanh())).collect()
}

/// Computes `dinp = dout * gelu'(inp)`.
///
/// With `u = sqrt(2/pi) * (x + 0.044715 x^3)` and `t = tanh(u)`, the forward `0.5 x (1 + t)`
/// has derivative `0.5 (1 + t) + 0.5 x (1 - t^2) * sqrt(2/pi) * (1 + 3 * 0.044715 x^2)`.
///
/// # Shapes
/// - `inp`, `dout`: N elements
/// - returns `dinp`: N elements
pub fn gelu_backward(inp: &[f64], dout: &[f64]) -> Vec<f64> {
    assert_eq!(inp.len(), dout.len(), "inp and dout must have the same length");
    inp.iter()
        .zip(dout)
        .map(|(&x, &d)| {
            let t = tanh_argument(x).tanh();
            let du_dx = SQRT_2_OVER_PI * (1.0 + 3.0 * CUBIC_COEFFICIENT * x * x);
            d * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du_dx)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::finite_difference;

    /// Finite-difference step: gelu is smooth with O(1) derivatives on [-3, 3].
    const STEP: f64 = 1e-5;
    /// Truncation error (about STEP^2 times the third derivative) plus rounding (about 1e-16 / STEP).
    const FD_TOLERANCE: f64 = 1e-8;

    #[test]
    fn gelu_backward_matches_finite_difference() {
        let inp: Vec<f64> = crate::testing::to_f64(&crate::testing::random_vec(12, 1)).iter().map(|x| 3.0 * x).collect();
        // The loss sum(out * dout) has gradient dout with respect to out.
        let dout = crate::testing::to_f64(&crate::testing::random_vec(12, 2));
        let analytic = gelu_backward(&inp, &dout);
        let numeric = finite_difference(&inp, STEP, |x| gelu_forward(x).iter().zip(&dout).map(|(o, d)| o * d).sum());
        for (i, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
            assert!((a - n).abs() <= FD_TOLERANCE, "gelu dinp[{i}]: analytic {a}, finite difference {n}");
        }
    }

    #[test]
    fn gelu_matches_known_values() {
        // gelu(0) is 0, and gelu(x) tends to x for large x and to 0 for large -x. The value at 1
        // is 0.5 * (1 + tanh(sqrt(2/pi) * 1.044715)), evaluated independently.
        let out = gelu_forward(&[0.0, 1.0, 10.0, -10.0]);
        let at_one = 0.5 * (1.0 + (0.797_884_560_802_865_4_f64 * 1.044_715).tanh());
        assert_eq!(out[0], 0.0, "gelu(0)");
        assert!((out[1] - at_one).abs() < 1e-15, "gelu(1) = {}, expected {at_one}", out[1]);
        assert!((out[2] - 10.0).abs() < 1e-12, "gelu(10) = {}, expected 10", out[2]);
        assert!(out[3].abs() < 1e-12, "gelu(-10) = {}, expected 0", out[3]);
    }
}
