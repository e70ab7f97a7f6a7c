//! Pooling at the last real token of each sequence, as GPT-2 sequence classification does.
//!
//! GPT-2 has no pad token, so batches are right-padded and the classifier reads the hidden state
//! at position `lengths[b] - 1`, taken from the stored length rather than from the token ids.

/// Copies the hidden state of each sequence's last real token.
///
/// `pooled[b, :] = hidden[b, lengths[b] - 1, :]`.
///
/// # Shapes
/// - `hidden`: (B, T, C)
/// - `lengths`: (B), each in `1..=T`
/// - returns `pooled`: (B, C)
pub fn pooling_forward(hidden: &[f64], lengths: &[u32], batch: usize, seq_len: usize, channels: usize) -> Vec<f64> {
    assert_eq!(hidden.len(), batch * seq_len * channels, "hidden must be (B, T, C)");
    assert_eq!(lengths.len(), batch, "lengths must be (B)");
    let mut pooled = vec![0.0; batch * channels];
    for b in 0..batch {
        let last = last_position(lengths[b], seq_len);
        let src = (b * seq_len + last) * channels;
        pooled[b * channels..(b + 1) * channels].copy_from_slice(&hidden[src..src + channels]);
    }
    pooled
}

/// Backpropagates through [`pooling_forward`]: the gradient reaches only the pooled positions.
///
/// `dhidden[b, lengths[b] - 1, :] = dpooled[b, :]`, and 0 at every other position.
///
/// # Shapes
/// - `dpooled`: (B, C)
/// - `lengths`: (B), each in `1..=T`
/// - returns `dhidden`: (B, T, C)
pub fn pooling_backward(dpooled: &[f64], lengths: &[u32], batch: usize, seq_len: usize, channels: usize) -> Vec<f64> {
    assert_eq!(dpooled.len(), batch * channels, "dpooled must be (B, C)");
    assert_eq!(lengths.len(), batch, "lengths must be (B)");
    let mut dhidden = vec![0.0; batch * seq_len * channels];
    for b in 0..batch {
        let last = last_position(lengths[b], seq_len);
        let dst = (b * seq_len + last) * channels;
        dhidden[dst..dst + channels].copy_from_slice(&dpooled[b * channels..(b + 1) * channels]);
    }
    dhidden
}

fn last_position(length: u32, seq_len: usize) -> usize {
    let length = length as usize;
    assert!((1..=seq_len).contains(&length), "length {length} is outside 1..={seq_len}");
    length - 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::finite_difference;

    fn seeded(len: usize, seed: u64) -> Vec<f64> {
        crate::testing::to_f64(&crate::testing::random_vec(len, seed))
    }

    #[test]
    fn pooling_forward_picks_last_real_token() {
        let (batch, seq_len, channels) = (3, 4, 2);
        let hidden: Vec<f64> = (0..batch * seq_len * channels).map(|i| i as f64).collect();
        let pooled = pooling_forward(&hidden, &[1, 4, 2], batch, seq_len, channels);
        assert_eq!(pooled, vec![0.0, 1.0, 14.0, 15.0, 18.0, 19.0]);
    }

    #[test]
    fn pooling_backward_matches_finite_difference() {
        let (batch, seq_len, channels) = (3, 4, 5);
        let lengths = [2u32, 4, 1];
        let hidden = seeded(batch * seq_len * channels, 1);
        let weights = seeded(batch * channels, 2);
        let loss = |h: &[f64]| -> f64 {
            pooling_forward(h, &lengths, batch, seq_len, channels).iter().zip(&weights).map(|(p, w)| p * w).sum()
        };
        let numeric = finite_difference(&hidden, 1e-5, loss);
        let analytic = pooling_backward(&weights, &lengths, batch, seq_len, channels);
        for (i, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
            assert!((a - n).abs() < 1e-8, "pooling_backward dhidden[{i}]: analytic {a}, finite difference {n}");
        }
    }
}
