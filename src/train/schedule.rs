//! Learning-rate schedules.

/// Shape of the learning rate after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Schedule {
    /// The peak rate for every step after warm-up.
    #[default]
    Constant,
    /// Cosine decay from the peak rate to zero at the last step.
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(format!("invalid schedule `{other}`, expected constant or cosine")),
        }
    }
}

/// Learning rate of optimizer step `step` (0-based) out of `total`: linear warm-up from
/// `peak / warmup` to `peak` over `warmup` steps, then `schedule`.
pub fn learning_rate(schedule: Schedule, peak: f32, step: usize, warmup: usize, total: usize) -> f32 {
    if step < warmup {
        return peak * (step + 1) as f32 / warmup as f32;
    }
    match schedule {
        Schedule::Constant => peak,
        Schedule::Cosine => {
            let span = total.saturating_sub(warmup).max(1);
            let progress = ((step - warmup) as f32 / span as f32).min(1.0);
            0.5 * peak * (1.0 + (std::f32::consts::PI * progress).cos())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_reaches_peak() {
        assert_eq!(learning_rate(Schedule::Constant, 1.0, 0, 4, 10), 0.25);
        assert_eq!(learning_rate(Schedule::Constant, 1.0, 3, 4, 10), 1.0);
        assert_eq!(learning_rate(Schedule::Constant, 1.0, 9, 4, 10), 1.0);
    }

    #[test]
    fn cosine_decays_to_zero() {
        assert!((learning_rate(Schedule::Cosine, 2.0, 0, 0, 10) - 2.0).abs() < 1e-6);
        assert!((learning_rate(Schedule::Cosine, 2.0, 5, 0, 10) - 1.0).abs() < 1e-6);
        assert!(learning_rate(Schedule::Cosine, 2.0, 10, 0, 10).abs() < 1e-6);
    }
}
