//! Causal multi-head self-attention in the GPT-2 layout.
//!
//! `qkv` is the output of `c_attn`: q, k and v side by side along the last axis, and head h uses
//! channels `h*HS..(h+1)*HS` of each. With `scale = 1 / sqrt(HS)` ("Attention Is All You Need",
//! Vaswani et al. 2017, equation 1):
//! ```text
//! scores[b,h,t,u] = scale * sum_d q[b,t,h,d] * k[b,u,h,d]      for u <= t
//! att[b,h,t,:]    = softmax(scores[b,h,t,0..=t]), 0 for u > t  (causal mask)
//! out[b,t,h,:]    = sum_{u<=t} att[b,h,t,u] * v[b,u,h,:]
//! ```

/// Runs causal self-attention and returns `(att, out)`.
///
/// # Shapes
/// - `qkv`: (B, T, 3C), q | k | v along the last axis
/// - returns `att`: (B, NH, T, T), exactly 0 where the key comes after the query, and
///   `out`: (B, T, C), heads concatenated along channels
pub fn attention_forward(
    qkv: &[f64],
    batch: usize,
    seq_len: usize,
    channels: usize,
    num_heads: usize,
) -> (Vec<f64>, Vec<f64>) {
    let layout = Layout::new(batch, seq_len, channels, num_heads);
    assert_eq!(qkv.len(), batch * seq_len * 3 * channels, "qkv must be (B, T, 3C)");
    let hs = layout.head_size;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut att = vec![0.0; batch * num_heads * seq_len * seq_len];
    let mut out = vec![0.0; batch * seq_len * channels];
    for b in 0..batch {
        for h in 0..num_heads {
            for t in 0..seq_len {
                let row = layout.att(b, h, t, 0);
                let q = layout.qkv(b, t, 0, h);
                let mut scores = vec![0.0; t + 1];
                for (u, score) in scores.iter_mut().enumerate() {
                    let k = layout.qkv(b, u, 1, h);
                    *score = scale * (0..hs).map(|d| qkv[q + d] * qkv[k + d]).sum::<f64>();
                }
                // Softmax with the row maximum subtracted so that exp cannot overflow.
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (u, score) in scores.iter().enumerate() {
                    att[row + u] = (score - max).exp() / sum;
                }
                let o = layout.out(b, t, h);
                for u in 0..=t {
                    let v = layout.qkv(b, u, 2, h);
                    for d in 0..hs {
                        out[o + d] += att[row + u] * qkv[v + d];
                    }
                }
            }
        }
    }
    (att, out)
}

/// Backpropagates through [`attention_forward`] and returns `dqkv`.
///
/// ```text
/// datt[t,u]    = sum_d dout[t,h,d] * v[u,h,d]
/// dv[u,h,:]    = sum_{t>=u} att[t,u] * dout[t,h,:]
/// dscores[t,u] = att[t,u] * (datt[t,u] - sum_j att[t,j] * datt[t,j])   (softmax Jacobian)
/// dq[t,h,:]    = scale * sum_{u<=t} dscores[t,u] * k[u,h,:]
/// dk[u,h,:]    = scale * sum_{t>=u} dscores[t,u] * q[t,h,:]
/// ```
///
/// # Shapes
/// - `dout`: (B, T, C)
/// - `qkv`: (B, T, 3C), the forward input
/// - `att`: (B, NH, T, T), the forward's probabilities
/// - returns `dqkv`: (B, T, 3C)
pub fn attention_backward(
    dout: &[f64],
    qkv: &[f64],
    att: &[f64],
    batch: usize,
    seq_len: usize,
    channels: usize,
    num_heads: usize,
) -> Vec<f64> {
    let layout = Layout::new(batch, seq_len, channels, num_heads);
    assert_eq!(dout.len(), batch * seq_len * channels, "dout must be (B, T, C)");
    assert_eq!(qkv.len(), batch * seq_len * 3 * channels, "qkv must be (B, T, 3C)");
    assert_eq!(att.len(), batch * num_heads * seq_len * seq_len, "att must be (B, NH, T, T)");
    let hs = layout.head_size;
    let scale = 1.0 / (hs as f64).sqrt();
    let mut dqkv = vec![0.0; qkv.len()];
    for b in 0..batch {
        for h in 0..num_heads {
            for t in 0..seq_len {
                let row = layout.att(b, h, t, 0);
                let o = layout.out(b, t, h);
                let mut datt = vec![0.0; t + 1];
                for (u, g) in datt.iter_mut().enumerate() {
                    let v = layout.qkv(b, u, 2, h);
                    *g = (0..hs).map(|d| dout[o + d] * qkv[v + d]).sum::<f64>();
                    for d in 0..hs {
                        dqkv[v + d] += att[row + u] * dout[o + d];
                    }
                }
                let weighted: f64 = datt.iter().enumerate().map(|(u, g)| att[row + u] * g).sum();
                let q = layout.qkv(b, t, 0, h);
                for (u, g) in datt.iter().enumerate() {
                    let dscore = att[row + u] * (g - weighted);
                    let k = layout.qkv(b, u, 1, h);
                    for d in 0..hs {
                        dqkv[q + d] += scale * dscore * qkv[k + d];
                        dqkv[k + d] += scale * dscore * qkv[q + d];
                    }
                }
            }
        }
    }
    dqkv
}

/// Offsets into the attention tensors.
struct Layout {
    seq_len: usize,
    channels: usize,
    num_heads: usize,
    head_size: usize,
}

impl Layout {
    fn new(batch: usize, seq_len: usize, channels: usize, num_heads: usize) -> Self {
        assert!(batch > 0, "attention needs B >= 1");
        assert!(seq_len > 0, "attention needs T >= 1");
        assert!(num_heads > 0, "attention needs NH >= 1");
        assert_eq!(channels % num_heads, 0, "C = {channels} is not a multiple of NH = {num_heads}");
        Layout { seq_len, channels, num_heads, head_size: channels / num_heads }
    }

    /// First element of head `h` of `part` (0 q, 1 k, 2 v) at token (b, t) in qkv (B, T, 3C).
    fn qkv(&self, b: usize, t: usize, part: usize, h: usize) -> usize {
        (b * self.seq_len + t) * 3 * self.channels + part * self.channels + h * self.head_size
    }

    /// Element (b, h, t, u) of att (B, NH, T, T).
    fn att(&self, b: usize, h: usize, t: usize, u: usize) -> usize {
        ((b * self.num_heads + h) * self.seq_len + t) * self.seq_len + u
    }

    /// First element of head `h` at token (b, t) in out (B, T, C).
    fn out(&self, b: usize, t: usize, h: usize) -> usize {
        (b * self.seq_len + t) * self.channels + h * self.head_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::finite_difference;

    fn seeded(len: usize, seed: u64) -> Vec<f64> {
        crate::testing::to_f64(&crate::testing::random_vec(len, seed))
    }

    #[test]
    fn attention_rows_are_causal_distributions() {
        let (batch, seq_len, channels, num_heads) = (2, 5, 6, 3);
        let qkv = seeded(batch * seq_len * 3 * channels, 1);
        let (att, _) = attention_forward(&qkv, batch, seq_len, channels, num_heads);
        for row in 0..batch * num_heads * seq_len {
            let t = row % seq_len;
            let values = &att[row * seq_len..(row + 1) * seq_len];
            let sum: f64 = values.iter().sum();
            assert!((sum - 1.0).abs() < 1e-12, "att row {row} sums to {sum}");
            assert!(values[t + 1..].iter().all(|&p| p == 0.0), "att row {row} has weight after query {t}: {values:?}");
        }
    }

    #[test]
    fn attention_backward_matches_finite_difference() {
        for (batch, seq_len, channels, num_heads) in [(2, 3, 4, 2), (1, 4, 3, 1), (1, 1, 2, 2)] {
            let qkv: Vec<f64> = seeded(batch * seq_len * 3 * channels, 2).iter().map(|x| 2.0 * x).collect();
            let weights = seeded(batch * seq_len * channels, 3);
            let loss = |x: &[f64]| -> f64 {
                let (_, out) = attention_forward(x, batch, seq_len, channels, num_heads);
                out.iter().zip(&weights).map(|(o, w)| o * w).sum()
            };
            let numeric = finite_difference(&qkv, 1e-5, loss);
            let (att, _) = attention_forward(&qkv, batch, seq_len, channels, num_heads);
            let analytic = attention_backward(&weights, &qkv, &att, batch, seq_len, channels, num_heads);
            for (i, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
                assert!(
                    (a - n).abs() < 1e-8,
                    "attention_backward B={batch} T={seq_len} C={channels} NH={num_heads} dqkv[{i}]: analytic {a}, finite difference {n}"
                );
            }
        }
    }
}
