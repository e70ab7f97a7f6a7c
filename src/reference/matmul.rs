//! Matrix products of a linear layer `out = inp @ W + bias` and their gradients.
//!
//! The weight is stored in one of two layouts: GPT-2's Conv1D stores it (in, out) = (K, N), and
//! `nn.Linear` (the classifier head `score.weight`, the tied LM head `wte`) stores it
//! (out, in) = (N, K). In both cases `W[k, n]` below is the factor that multiplies `inp[m, k]`
//! in output column `n`.

/// Storage order of a linear layer's weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// (K, N), input index first, as GPT-2's Conv1D stores it.
    InOut,
    /// (N, K), output index first, as `nn.Linear` stores it.
    OutIn,
}

/// Sizes of one product `(M, K) @ (K, N)`.
#[derive(Clone, Copy, Debug)]
pub struct MatmulDims {
    /// M, rows of the input and of the output.
    pub rows: usize,
    /// K, the reduction length: input features.
    pub inner: usize,
    /// N, output features.
    pub cols: usize,
    /// Storage order of the weight.
    pub layout: WeightLayout,
}

impl MatmulDims {
    /// Returns the flat index of `W[k, n]` in the weight's storage.
    fn weight_index(&self, k: usize, n: usize) -> usize {
        match self.layout {
            WeightLayout::InOut => k * self.cols + n,
            WeightLayout::OutIn => n * self.inner + k,
        }
    }

    fn check_weight(&self, weight: &[f64]) {
        assert_eq!(weight.len(), self.inner * self.cols, "weight must hold K * N = {} * {} values", self.inner, self.cols);
    }
}

/// Computes `out[m, n] = sum_k inp[m, k] * W[k, n] + bias[n]`.
///
/// # Shapes
/// - `inp`: (M, K)
/// - `weight`: (K, N) for [`WeightLayout::InOut`], (N, K) for [`WeightLayout::OutIn`]
/// - `bias`: (N), or `None` for no bias
/// - returns `out`: (M, N)
pub fn matmul_forward(inp: &[f64], weight: &[f64], bias: Option<&[f64]>, dims: MatmulDims) -> Vec<f64> {
    let MatmulDims { rows, inner, cols, .. } = dims;
    assert_eq!(inp.len(), rows * inner, "inp must be (M, K) = ({rows}, {inner})");
    dims.check_weight(weight);
    if let Some(bias) = bias {
        assert_eq!(bias.len(), cols, "bias must be (N) = ({cols})");
    }
    let mut out = vec![0.0; rows * cols];
    for m in 0..rows {
        for n in 0..cols {
            let mut sum = bias.map_or(0.0, |b| b[n]);
            for k in 0..inner {
                sum += inp[m * inner + k] * weight[dims.weight_index(k, n)];
            }
            out[m * cols + n] = sum;
        }
    }
    out
}

/// Computes the input gradient `dinp[m, k] = sum_n dout[m, n] * W[k, n]`, that is `dout @ W^T`.
///
/// # Shapes
/// - `dout`: (M, N)
/// - `weight`: (K, N) for [`WeightLayout::InOut`], (N, K) for [`WeightLayout::OutIn`]
/// - returns `dinp`: (M, K)
pub fn matmul_backward_input(dout: &[f64], weight: &[f64], dims: MatmulDims) -> Vec<f64> {
    let MatmulDims { rows, inner, cols, .. } = dims;
    assert_eq!(dout.len(), rows * cols, "dout must be (M, N) = ({rows}, {cols})");
    dims.check_weight(weight);
    let mut dinp = vec![0.0; rows * inner];
    for m in 0..rows {
        for k in 0..inner {
            let mut sum = 0.0;
            for n in 0..cols {
                sum += dout[m * cols + n] * weight[dims.weight_index(k, n)];
            }
            dinp[m * inner + k] = sum;
        }
    }
    dinp
}

/// Computes the weight gradient `dW[k, n] = sum_m inp[m, k] * dout[m, n]`, that is
/// `inp^T @ dout`, stored in the weight's own layout.
///
/// # Shapes
/// - `inp`: (M, K)
/// - `dout`: (M, N)
/// - returns `dweight`: (K, N) for [`WeightLayout::InOut`], (N, K) for [`WeightLayout::OutIn`]
pub fn matmul_backward_weight(inp: &[f64], dout: &[f64], dims: MatmulDims) -> Vec<f64> {
    let MatmulDims { rows, inner, cols, .. } = dims;
    assert_eq!(inp.len(), rows * inner, "inp must be (M, K) = ({rows}, {inner})");
    assert_eq!(dout.len(), rows * cols, "dout must be (M, N) = ({rows}, {cols})");
    let mut dweight = vec![0.0; inner * cols];
    for m in 0..rows {
        for k in 0..inner {
            let x = inp[m * inner + k];
            for n in 0..cols {
                dweight[dims.weight_index(k, n)] += x * dout[m * cols + n];
            }
        }
    }
    dweight
}

/// Computes the bias gradient `dbias[n] = sum_m dout[m, n]`.
///
/// # Shapes
/// - `dout`: (M, N)
/// - returns `dbias`: (N)
pub fn matmul_backward_bias(dout: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    assert_eq!(dout.len(), rows * cols, "dout must be (M, N) = ({rows}, {cols})");
    let mut dbias = vec![0.0; cols];
    for m in 0..rows {
        for n in 0..cols {
            dbias[n] += dout[m * cols + n];
        }
    }
    dbias
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::finite_difference;

    /// Finite-difference step. The loss is bilinear in each argument, so central differences
    /// are exact up to rounding.
    const STEP: f64 = 1e-5;
    /// Rounding error of a central difference of O(1) sums with step 1e-5: about 1e-16 / 1e-5.
    const FD_TOLERANCE: f64 = 1e-8;

    fn seeded(len: usize, seed: u64) -> Vec<f64> {
        crate::testing::to_f64(&crate::testing::random_vec(len, seed))
    }

    fn assert_matches(what: &str, analytic: &[f64], numeric: &[f64]) {
        assert_eq!(analytic.len(), numeric.len(), "{what}: length");
        for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
            assert!((a - n).abs() <= FD_TOLERANCE, "{what}[{i}]: analytic {a}, finite difference {n}");
        }
    }

    #[test]
    fn matmul_backward_matches_finite_difference() {
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            let dims = MatmulDims { rows: 3, inner: 4, cols: 5, layout };
            let inp = seeded(3 * 4, 1);
            let weight = seeded(4 * 5, 2);
            let bias = seeded(5, 3);
            // The loss sum(out * dout) has gradient dout with respect to out.
            let dout = seeded(3 * 5, 4);
            let loss = |out: Vec<f64>| -> f64 { out.iter().zip(&dout).map(|(o, d)| o * d).sum() };

            let numeric = finite_difference(&inp, STEP, |x| loss(matmul_forward(x, &weight, Some(&bias), dims)));
            assert_matches(&format!("{layout:?} dinp"), &matmul_backward_input(&dout, &weight, dims), &numeric);

            let numeric = finite_difference(&weight, STEP, |w| loss(matmul_forward(&inp, w, Some(&bias), dims)));
            assert_matches(&format!("{layout:?} dweight"), &matmul_backward_weight(&inp, &dout, dims), &numeric);

            let numeric = finite_difference(&bias, STEP, |b| loss(matmul_forward(&inp, &weight, Some(b), dims)));
            assert_matches(&format!("{layout:?} dbias"), &matmul_backward_bias(&dout, 3, 5), &numeric);
        }
    }

    #[test]
    fn matmul_layouts_agree_on_transposed_weight() {
        let (rows, inner, cols) = (2, 3, 4);
        let in_out = seeded(inner * cols, 5);
        let mut out_in = vec![0.0; inner * cols];
        for k in 0..inner {
            for n in 0..cols {
                out_in[n * inner + k] = in_out[k * cols + n];
            }
        }
        let inp = seeded(rows * inner, 6);
        let a = matmul_forward(&inp, &in_out, None, MatmulDims { rows, inner, cols, layout: WeightLayout::InOut });
        let b = matmul_forward(&inp, &out_in, None, MatmulDims { rows, inner, cols, layout: WeightLayout::OutIn });
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() < 1e-15, "out[{i}]: InOut {x}, OutIn {y}");
        }
    }
}
