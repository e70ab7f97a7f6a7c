//! Forward passes over labelled batches: loss, predictions and class probabilities.

use crate::data::{BatchIter, EncodedExamples};
use crate::gpu::GpuError;
use crate::graph::executor::StepInputs;
use crate::graph::Session;

/// Predictions of a classifier over a set of examples.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    /// Mean cross-entropy over the examples seen.
    pub loss: f64,
    /// True class of each example seen, in input order.
    pub truths: Vec<usize>,
    /// Predicted class (argmax of the logits) of each example seen.
    pub predictions: Vec<usize>,
    /// Softmax probabilities (examples, K).
    pub probabilities: Vec<Vec<f32>>,
}

impl Evaluation {
    /// Fraction of correct predictions; 0 when no example was seen.
    pub fn accuracy(&self) -> f64 {
        if self.truths.is_empty() {
            return 0.0;
        }
        let correct = self.truths.iter().zip(&self.predictions).filter(|(t, p)| t == p).count();
        correct as f64 / self.truths.len() as f64
    }
}

/// Softmax of one row of logits, max-subtracted for stability.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&x| (x - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.iter().map(|&e| e / sum).collect()
}

/// Runs forward passes over the first `max_batches` batches of `data` (all when `None`), in
/// order, and collects loss and predictions of the real rows.
pub(crate) fn evaluate(
    session: &mut Session<'_>,
    data: &EncodedExamples,
    batch_size: usize,
    num_labels: usize,
    max_batches: Option<usize>,
) -> Result<Evaluation, GpuError> {
    let mut eval = Evaluation::default();
    let Ok(batches) = BatchIter::evaluate(data, batch_size) else {
        return Ok(eval);
    };
    let mut loss_sum = 0.0f64;
    let mut counted = 0.0f64;
    for batch in batches.take(max_batches.unwrap_or(usize::MAX)) {
        session.set_inputs(&StepInputs { ids: &batch.ids, lengths: &batch.lengths, targets: &batch.labels });
        session.submit(false, None, 1.0)?;
        let out = session.read_loss()?;
        let logits = session.read_logits()?;
        loss_sum += f64::from(out.loss) * f64::from(out.counted);
        counted += f64::from(out.counted);
        for row in 0..batch.real {
            let row_logits = &logits[row * num_labels..(row + 1) * num_labels];
            let probs = softmax(row_logits);
            let predicted = argmax(&probs);
            eval.truths.push(batch.labels[row] as usize);
            eval.predictions.push(predicted);
            eval.probabilities.push(probs);
        }
    }
    eval.loss = if counted > 0.0 { loss_sum / counted } else { f64::NAN };
    Ok(eval)
}

/// Index of the largest value; the first one on ties.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}
