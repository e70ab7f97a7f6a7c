//! Layer normalization over the last dimension, as `torch.nn.LayerNorm` computes it.
//!
//! `out = (x - mean) * rstd * weight + bias` per row, where `mean` is the row mean and
//! `rstd = 1 / sqrt(var + eps)` with the biased variance (divided by C, not C - 1).

/// Outputs of [`layernorm_forward`]. The backward pass reuses `mean` and `rstd`.
#[derive(Clone, Debug)]
pub struct LayernormOutput {
    /// Normalized, scaled and shifted rows. Shape (N, C).
    pub out: Vec<f64>,
    /// Mean of each input row. Shape (N).
    pub mean: Vec<f64>,
    /// `1 / sqrt(var + eps)` of each input row. Shape (N).
    pub rstd: Vec<f64>,
}

/// Normalizes each row of `inp` and applies the elementwise affine transform.
///
/// # Shapes
/// - `inp`: (N, C)
/// - `weight`, `bias`: (C)
pub fn layernorm_forward(
    inp: &[f64],
    weight: &[f64],
    bias: &[f64],
    rows: usize,
    channels: usize,
    eps: f64,
) -> LayernormOutput {
    assert_eq!(inp.len(), rows * channels, "inp must be (N, C) = ({rows}, {channels})");
    assert_eq!(weight.len(), channels, "weight must be (C) = ({channels})");
    assert_eq!(bias.len(), channels, "bias must be (C) = ({channels})");
    let c = channels as f64;
    let mut out = vec![0.0; rows * channels];
    let mut mean = vec![0.0; rows];
    let mut rstd = vec![0.0; rows];
    for n in 0..rows {
        let x = &inp[n * channels..(n + 1) * channels];
        let m = x.iter().sum::<f64>() / c;
        let var = x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / c;
        let s = 1.0 / (var + eps).sqrt();
        for i in 0..channels {
            out[n * channels + i] = (x[i] - m) * s * weight[i] + bias[i];
        }
        mean[n] = m;
        rstd[n] = s;
    }
    LayernormOutput { out, mean, rstd }
}

/// Computes the gradients of [`layernorm_forward`] and returns `(dinp, dweight, dbias)`.
///
/// With `xhat = (x - mean) * rstd` and `g = dout * weight`, the forward `out = xhat * weight + bias`
/// gives `dweight = sum_n dout * xhat`, `dbias = sum_n dout`, and, differentiating through the
/// row's mean and variance, `dinp = rstd * (g - mean_c(g) - xhat * mean_c(g * xhat))`.
///
/// # Shapes
/// - `dout`, `inp`: (N, C)
/// - `weight`: (C)
/// - `mean`, `rstd`: (N), from [`layernorm_forward`]
/// - returns `dinp`: (N, C), `dweight`: (C), `dbias`: (C)
pub fn layernorm_backward(
    dout: &[f64],
    inp: &[f64],
    weight: &[f64],
    mean: &[f64],
    rstd: &[f64],
    rows: usize,
    channels: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    assert_eq!(dout.len(), rows * channels, "dout must be (N, C) = ({rows}, {channels})");
    assert_eq!(inp.len(), rows * channels, "inp must be (N, C) = ({rows}, {channels})");
    assert_eq!(weight.len(), channels, "weight must be (C) = ({channels})");
    assert_eq!(mean.len(), rows, "mean must be (N) = ({rows})");
    assert_eq!(rstd.len(), rows, "rstd must be (N) = ({rows})");
    let c = channels as f64;
    let mut dinp = vec![0.0; rows * channels];
    let mut dweight = vec![0.0; channels];
    let mut dbias = vec![0.0; channels];
    for n in 0..rows {
        let row = n * channels..(n + 1) * channels;
        let xhat: Vec<f64> = inp[row.clone()].iter().map(|x| (x - mean[n]) * rstd[n]).collect();
        let d = &dout[row.clone()];
        let g: Vec<f64> = d.iter().zip(weight).map(|(d, w)| d * w).collect();
        let mean_g = g.iter().sum::<f64>() / c;
        let mean_gx = g.iter().zip(&xhat).map(|(g, x)| g * x).sum::<f64>() / c;
        for i in 0..channels {
            dinp[n * channels + i] = rstd[n] * (g[i] - mean_g - xhat[i] * mean_gx);
            dweight[i] += d[i] * xhat[i];
            dbias[i] += d[i];
        }
    }
    (dinp, dweight, dbias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::finite_difference;

    /// GPT-2's `layer_norm_epsilon`.
    const EPS: f64 = 1e-5;
    /// Finite-difference step: the loss is smooth with O(1) curvature for O(1) inputs.
    const STEP: f64 = 1e-5;
    /// Truncation error (about STEP^2 times the third derivative) plus rounding (about 1e-16 / STEP).
    const FD_TOLERANCE: f64 = 1e-7;

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
    fn layernorm_backward_matches_finite_difference() {
        let (rows, channels) = (3, 5);
        let inp = seeded(rows * channels, 1);
        let weight = seeded(channels, 2);
        let bias = seeded(channels, 3);
        // The loss sum(out * dout) has gradient dout with respect to out.
        let dout = seeded(rows * channels, 4);
        let loss = |out: LayernormOutput| -> f64 { out.out.iter().zip(&dout).map(|(o, d)| o * d).sum() };
        let forward = layernorm_forward(&inp, &weight, &bias, rows, channels, EPS);
        let (dinp, dweight, dbias) =
            layernorm_backward(&dout, &inp, &weight, &forward.mean, &forward.rstd, rows, channels);

        let numeric = finite_difference(&inp, STEP, |x| loss(layernorm_forward(x, &weight, &bias, rows, channels, EPS)));
        assert_matches("layernorm dinp", &dinp, &numeric);
        let numeric = finite_difference(&weight, STEP, |w| loss(layernorm_forward(&inp, w, &bias, rows, channels, EPS)));
        assert_matches("layernorm dweight", &dweight, &numeric);
        let numeric = finite_difference(&bias, STEP, |b| loss(layernorm_forward(&inp, &weight, b, rows, channels, EPS)));
        assert_matches("layernorm dbias", &dbias, &numeric);
    }

    #[test]
    fn layernorm_rows_have_zero_mean_and_unit_variance() {
        let (rows, channels) = (2, 6);
        let inp = seeded(rows * channels, 5);
        let out = layernorm_forward(&inp, &[1.0; 6], &[0.0; 6], rows, channels, 0.0);
        for n in 0..rows {
            let row = &out.out[n * channels..(n + 1) * channels];
            let mean = row.iter().sum::<f64>() / channels as f64;
            let var = row.iter().map(|x| x * x).sum::<f64>() / channels as f64 - mean * mean;
            assert!(mean.abs() < 1e-12, "row {n}: mean {mean}, expected 0");
            assert!((var - 1.0).abs() < 1e-12, "row {n}: biased variance {var}, expected 1");
        }
    }
}
