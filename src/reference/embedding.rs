//! Token plus position embedding, GPT-2's input layer.

/// Looks up the token and position embeddings and adds them.
///
/// `out[b, t, :] = wte[ids[b, t], :] + wpe[t, :]`.
///
/// # Shapes
/// - `ids`: (B, T), each below V
/// - `wte`: (V, C)
/// - `wpe`: (n_positions, C), with T <= n_positions
/// - returns `out`: (B, T, C)
pub fn embedding_forward(
    ids: &[u32],
    wte: &[f64],
    wpe: &[f64],
    batch: usize,
    seq_len: usize,
    channels: usize,
) -> Vec<f64> {
    assert_eq!(ids.len(), batch * seq_len, "ids must be (B, T)");
    assert!(wpe.len() >= seq_len * channels, "wpe has fewer than T rows");
    let mut out = vec![0.0; batch * seq_len * channels];
    for (position, &id) in ids.iter().enumerate() {
        let t = position % seq_len;
        let token = &wte[id as usize * channels..(id as usize + 1) * channels];
        let place = &wpe[t * channels..(t + 1) * channels];
        for c in 0..channels {
            out[position * channels + c] = token[c] + place[c];
        }
    }
    out
}

/// Backpropagates through [`embedding_forward`] and returns `(dwte, dwpe)`.
///
/// `dwte[v, :] = sum over (b, t) with ids[b, t] = v of dout[b, t, :]` and
/// `dwpe[t, :] = sum_b dout[b, t, :]`. Rows of `dwpe` from T on are 0.
///
/// # Shapes
/// - `ids`: (B, T)
/// - `dout`: (B, T, C)
/// - returns `dwte`: (V, C) with V = `vocab_size`, and `dwpe`: (n_positions, C)
pub fn embedding_backward(
    ids: &[u32],
    dout: &[f64],
    vocab_size: usize,
    n_positions: usize,
    batch: usize,
    seq_len: usize,
    channels: usize,
) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(ids.len(), batch * seq_len, "ids must be (B, T)");
    assert_eq!(dout.len(), batch * seq_len * channels, "dout must be (B, T, C)");
    let mut dwte = vec![0.0; vocab_size * channels];
    let mut dwpe = vec![0.0; n_positions * channels];
    for (position, &id) in ids.iter().enumerate() {
        let t = position % seq_len;
        for c in 0..channels {
            let g = dout[position * channels + c];
            dwte[id as usize * channels + c] += g;
            dwpe[t * channels + c] += g;
        }
    }
    (dwte, dwpe)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::finite_difference;

    fn seeded(len: usize, seed: u64) -> Vec<f64> {
        crate::testing::to_f64(&crate::testing::random_vec(len, seed))
    }

    #[test]
    fn embedding_backward_matches_finite_difference() {
        let (batch, seq_len, channels, vocab, n_positions) = (2, 3, 4, 5, 4);
        // Token 1 appears three times, so its gradient sums several positions.
        let ids = [1u32, 3, 1, 0, 1, 4];
        let wte = seeded(vocab * channels, 1);
        let wpe = seeded(n_positions * channels, 2);
        let weights = seeded(batch * seq_len * channels, 3);
        let weighted = |out: Vec<f64>| -> f64 { out.iter().zip(&weights).map(|(o, w)| o * w).sum() };
        let (dwte, dwpe) = embedding_backward(&ids, &weights, vocab, n_positions, batch, seq_len, channels);

        let numeric_wte = finite_difference(&wte, 1e-5, |x| {
            weighted(embedding_forward(&ids, x, &wpe, batch, seq_len, channels))
        });
        for (i, (a, n)) in dwte.iter().zip(&numeric_wte).enumerate() {
            assert!((a - n).abs() < 1e-8, "embedding_backward dwte[{i}]: analytic {a}, finite difference {n}");
        }
        let numeric_wpe = finite_difference(&wpe, 1e-5, |x| {
            weighted(embedding_forward(&ids, &wte, x, batch, seq_len, channels))
        });
        for (i, (a, n)) in dwpe.iter().zip(&numeric_wpe).enumerate() {
            assert!((a - n).abs() < 1e-8, "embedding_backward dwpe[{i}]: analytic {a}, finite difference {n}");
        }
    }
}
