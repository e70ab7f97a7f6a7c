//! Softmax cross-entropy (negative log-likelihood of the target class), with ignored rows.
//!
//! A row is ignored when its target is negative. Ignored rows add nothing to the loss or the
//! gradient and are not counted in the mean. Targets must be below the class count.

/// Per-row losses and their mean over the rows that are not ignored.
#[derive(Clone, Debug)]
pub struct CrossEntropyLoss {
    /// `logsumexp(logits[r]) - logits[r, target[r]]`, 0 for ignored rows. Shape (rows).
    pub losses: Vec<f64>,
    /// Mean of `losses` over the rows that are not ignored, 0 when every row is ignored.
    pub mean: f64,
    /// Number of rows that are not ignored.
    pub count: usize,
}

/// Computes the cross-entropy loss of every row and their mean.
///
/// `loss[r] = log(sum_c exp(logits[r, c])) - logits[r, target[r]]`, evaluated with the row
/// maximum subtracted before `exp` so that large logits do not overflow.
///
/// # Shapes
/// - `logits`: (rows, classes)
/// - `targets`: (rows), a class index, or negative to ignore the row
pub fn crossentropy_forward(logits: &[f64], targets: &[i32], rows: usize, classes: usize) -> CrossEntropyLoss {
    assert_eq!(logits.len(), rows * classes, "logits must be (rows, classes)");
    assert_eq!(targets.len(), rows, "targets must be (rows)");
    let mut losses = vec![0.0; rows];
    let mut count = 0usize;
    for r in 0..rows {
        let Some(target) = class_index(targets[r], classes) else { continue };
        let row = &logits[r * classes..(r + 1) * classes];
        losses[r] = log_sum_exp(row) - row[target];
        count += 1;
    }
    let mean = if count == 0 { 0.0 } else { losses.iter().sum::<f64>() / count as f64 };
    CrossEntropyLoss { losses, mean, count }
}

/// Computes the gradient of the mean loss of [`crossentropy_forward`] with respect to the logits.
///
/// `dlogits[r, c] = (softmax(logits[r])[c] - [c == target[r]]) / count`, and 0 for ignored rows.
///
/// # Shapes
/// - `logits`: (rows, classes)
/// - `targets`: (rows)
/// - returns `dlogits`: (rows, classes)
pub fn crossentropy_backward(logits: &[f64], targets: &[i32], rows: usize, classes: usize) -> Vec<f64> {
    assert_eq!(logits.len(), rows * classes, "logits must be (rows, classes)");
    assert_eq!(targets.len(), rows, "targets must be (rows)");
    let count = targets.iter().filter(|&&t| class_index(t, classes).is_some()).count();
    let mut dlogits = vec![0.0; rows * classes];
    for r in 0..rows {
        let Some(target) = class_index(targets[r], classes) else { continue };
        let row = &logits[r * classes..(r + 1) * classes];
        let lse = log_sum_exp(row);
        for c in 0..classes {
            let p = (row[c] - lse).exp();
            let onehot = if c == target { 1.0 } else { 0.0 };
            dlogits[r * classes + c] = (p - onehot) / count as f64;
        }
    }
    dlogits
}

/// Returns the class index of a target, or `None` for an ignored row.
///
/// # Panics
/// If the target is not below `classes`.
fn class_index(target: i32, classes: usize) -> Option<usize> {
    let index = usize::try_from(target).ok()?;
    assert!(index < classes, "target {target} is not below the class count {classes}");
    Some(index)
}

/// `log(sum_i exp(x_i))` with the maximum subtracted first.
fn log_sum_exp(x: &[f64]) -> f64 {
    let max = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    max + x.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::finite_difference;

    fn seeded(len: usize, seed: u64) -> Vec<f64> {
        crate::testing::to_f64(&crate::testing::random_vec(len, seed))
    }

    #[test]
    fn crossentropy_uniform_logits_give_log_classes() {
        let out = crossentropy_forward(&[0.5; 8], &[3, -1], 2, 4);
        assert!((out.losses[0] - 4f64.ln()).abs() < 1e-12, "loss {} expected ln 4", out.losses[0]);
        assert_eq!(out.losses[1], 0.0, "an ignored row has loss 0");
        assert_eq!(out.count, 1);
        assert!((out.mean - 4f64.ln()).abs() < 1e-12, "mean {} expected ln 4", out.mean);
    }

    #[test]
    fn crossentropy_backward_matches_finite_difference() {
        for (rows, classes, targets) in [(4, 5, vec![0, 4, -1, 2]), (3, 2, vec![1, 0, 1])] {
            let logits: Vec<f64> = seeded(rows * classes, 7).iter().map(|x| 3.0 * x).collect();
            let loss = |l: &[f64]| crossentropy_forward(l, &targets, rows, classes).mean;
            let numeric = finite_difference(&logits, 1e-5, loss);
            let analytic = crossentropy_backward(&logits, &targets, rows, classes);
            for (i, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
                assert!(
                    (a - n).abs() < 1e-8,
                    "crossentropy_backward rows={rows} classes={classes} dlogits[{i}]: analytic {a}, finite difference {n}"
                );
            }
        }
    }

    #[test]
    fn crossentropy_all_ignored_is_zero() {
        let out = crossentropy_forward(&[1.0, 2.0], &[-1], 1, 2);
        assert_eq!((out.mean, out.count), (0.0, 0));
        assert_eq!(crossentropy_backward(&[1.0, 2.0], &[-1], 1, 2), vec![0.0, 0.0]);
    }
}
