//! AdamW with decoupled weight decay, one step as `torch.optim.AdamW` takes it.
//!
//! Loshchilov and Hutter, "Decoupled Weight Decay Regularization" (ICLR 2019): the decay
//! multiplies the parameter directly instead of being added to the gradient, so it is not rescaled
//! by the adaptive denominator.

/// Hyperparameters of one AdamW step.
#[derive(Clone, Copy, Debug)]
pub struct AdamWHyperparameters {
    /// Learning rate.
    pub lr: f64,
    /// Decay rate of the first-moment estimate.
    pub beta1: f64,
    /// Decay rate of the second-moment estimate.
    pub beta2: f64,
    /// Added to the denominator for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay coefficient.
    pub weight_decay: f64,
}

/// Applies step `step` (counted from 1) of AdamW to `param` in place and updates the moment
/// estimates `m` and `v`.
///
/// With `g = grad`:
/// ```text
/// param = param * (1 - lr * weight_decay)
/// m     = beta1 * m + (1 - beta1) * g
/// v     = beta2 * v + (1 - beta2) * g^2
/// param = param - lr / (1 - beta1^step) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
/// ```
/// Gradient clipping is not part of the step: scale `grad` first (see
/// [`clip_coefficient`](crate::reference::norm::clip_coefficient)).
///
/// # Shapes
/// - `param`, `grad`, `m`, `v`: (N), all the same length
pub fn adamw_update(
    param: &mut [f64],
    grad: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    step: u32,
    hyper: &AdamWHyperparameters,
) {
    assert!(step >= 1, "AdamW steps are counted from 1");
    assert_eq!(grad.len(), param.len(), "grad and param lengths differ");
    assert_eq!(m.len(), param.len(), "m and param lengths differ");
    assert_eq!(v.len(), param.len(), "v and param lengths differ");
    let bias_correction1 = 1.0 - hyper.beta1.powi(step as i32);
    let bias_correction2 = 1.0 - hyper.beta2.powi(step as i32);
    let step_size = hyper.lr / bias_correction1;
    for i in 0..param.len() {
        let g = grad[i];
        param[i] *= 1.0 - hyper.lr * hyper.weight_decay;
        m[i] = hyper.beta1 * m[i] + (1.0 - hyper.beta1) * g;
        v[i] = hyper.beta2 * v[i] + (1.0 - hyper.beta2) * g * g;
        let denominator = v[i].sqrt() / bias_correction2.sqrt() + hyper.eps;
        param[i] -= step_size * m[i] / denominator;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYPER: AdamWHyperparameters =
        AdamWHyperparameters { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };

    #[test]
    fn adamw_first_step_moves_by_lr_times_sign() {
        // After one step m_hat = g and v_hat = g^2, so the Adam term is lr * g / (|g| + eps).
        let mut param = vec![1.0, -2.0, 0.5];
        let grad = [0.3, -0.02, 4.0];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        let before = param.clone();
        adamw_update(&mut param, &grad, &mut m, &mut v, 1, &HYPER);
        for i in 0..3 {
            let decayed = before[i] * (1.0 - HYPER.lr * HYPER.weight_decay);
            let want = decayed - HYPER.lr * grad[i] / (grad[i].abs() + HYPER.eps);
            assert!((param[i] - want).abs() < 1e-12, "adamw step 1 param[{i}]: got {} expected {want}", param[i]);
            assert!((m[i] - 0.1 * grad[i]).abs() < 1e-15, "adamw step 1 m[{i}]: got {}", m[i]);
            assert!((v[i] - 0.001 * grad[i] * grad[i]).abs() < 1e-15, "adamw step 1 v[{i}]: got {}", v[i]);
        }
    }

    #[test]
    fn adamw_zero_gradient_only_decays() {
        let mut param = vec![2.0];
        let (mut m, mut v) = (vec![0.0], vec![0.0]);
        adamw_update(&mut param, &[0.0], &mut m, &mut v, 1, &HYPER);
        assert_eq!(param[0], 2.0 * (1.0 - HYPER.lr * HYPER.weight_decay));
    }
}
