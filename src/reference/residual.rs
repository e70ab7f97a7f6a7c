//! Residual add.

/// `out = a + b`.
pub fn residual_forward(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + y).collect()
}

/// `out = a + scale * b`.
pub fn scaled_add(a: &[f64], b: &[f64], scale: f64) -> Vec<f64> {
    a.iter().zip(b).map(|(x, y)| x + scale * y).collect()
}
