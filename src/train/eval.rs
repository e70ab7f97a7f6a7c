//! Forward passes over labelled batches: loss, predictions and class probabilities.

use crate::data::{BatchIter, EncodedExamples};
use crate::gpu::GpuError;
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

/// Runs forward passes over the first `max_batches` batches of `data` in input order, or over
/// all of it when `None`, and collects loss and predictions of the real rows in input order. A
/// pass over all examples batches them by length, so that each batch runs on few positions. A
/// row's logits do not depend on the other rows of its batch, so the predictions are the same, up
/// to the rounding of sums over positions on drivers whose kernels sum in blocks.
pub(crate) fn evaluate(
    session: &mut Session<'_>,
    data: &EncodedExamples,
    batch_size: usize,
    num_labels: usize,
    max_batches: Option<usize>,
) -> Result<Evaluation, GpuError> {
    let mut eval = Evaluation::default();
    let batches = match max_batches {
        Some(_) => BatchIter::evaluate(data, batch_size),
        None => BatchIter::evaluate_by_length(data, batch_size),
    };
    let Ok(batches) = batches else {
        return Ok(eval);
    };
    let order = batches.order().to_vec();
    let mut rows: Vec<Option<(usize, usize, Vec<f32>)>> = vec![None; order.len()];
    let mut loss_sum = 0.0f64;
    let mut counted = 0.0f64;
    for (k, batch) in batches.take(max_batches.unwrap_or(usize::MAX)).enumerate() {
        session.set_batch(&batch)?;
        session.submit(false, None, 1.0)?;
        let out = session.read_loss()?;
        let logits = session.read_logits()?;
        loss_sum += f64::from(out.loss) * f64::from(out.counted);
        counted += f64::from(out.counted);
        for row in 0..batch.real {
            let probs = softmax(&logits[row * num_labels..(row + 1) * num_labels]);
            let example = order[k * batch_size + row];
            rows[example] = Some((batch.labels[row] as usize, argmax(&probs), probs));
        }
    }
    for (truth, predicted, probs) in rows.into_iter().flatten() {
        eval.truths.push(truth);
        eval.predictions.push(predicted);
        eval.probabilities.push(probs);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{EncodedExample, EncodedExamples};
    use crate::graph::executor::OptimizerSettings;
    use crate::model::config::Gpt2Config;
    use crate::model::gpt2::{build_graph, BatchShape, Head, Trainable};
    use crate::model::weights::{init_random, HeadKind};

    /// A full evaluation batches the examples by length and puts each result back in its input
    /// row: it agrees row by row with a pass in input order over the same examples.
    #[test]
    fn length_order_keeps_input_rows() {
        let Some(gpu) = crate::testing::test_gpu() else { return };
        let config = Gpt2Config { n_layer: 1, n_head: 2, n_embd: 32, n_positions: 24, vocab_size: 96, bos_token_id: None, eos_token_id: None, ..Gpt2Config::mini() };
        let weights = init_random(&config, HeadKind::Classifier { num_labels: 3 }, 7).unwrap();
        let (batch, seq_len) = (3, 24);
        let max_binding = gpu.limits().max_storage_buffer_binding_size;
        let graph_for = move |seq_len| build_graph(&config, Head::Classifier { num_labels: 3 }, BatchShape { batch, seq_len }, Trainable::Nothing, max_binding);
        let mut session = Session::new(gpu, graph_for(seq_len), &weights, false, OptimizerSettings::default()).unwrap();
        session.allow_shorter_batches(8, Box::new(graph_for));
        // Lengths that alternate between long and short, so that sorting moves every row.
        let lengths = [20, 2, 17, 5, 24, 1, 9, 3];
        let examples = lengths
            .iter()
            .enumerate()
            .map(|(i, &n)| EncodedExample { ids: (0..n as u32).map(|t| (t * 7 + i as u32 * 11) % 90).collect(), label: i % 3 })
            .collect();
        let data = EncodedExamples { examples, seq_len, truncated: 0, pad_id: 95 };
        let sorted = evaluate(&mut session, &data, batch, 3, None).unwrap();
        let in_order = evaluate(&mut session, &data, batch, 3, Some(usize::MAX)).unwrap();
        assert_eq!(sorted.truths, (0..8).map(|i| i % 3).collect::<Vec<_>>(), "truths in input order");
        assert_eq!(sorted.truths, in_order.truths);
        assert_eq!(sorted.predictions, in_order.predictions);
        for (row, (a, b)) in sorted.probabilities.iter().zip(&in_order.probabilities).enumerate() {
            let want: Vec<f64> = b.iter().map(|&x| f64::from(x)).collect();
            crate::testing::assert_close(&format!("probabilities of row {row}"), a, &want, 1e-6, 1e-5);
        }
        assert!((sorted.loss - in_order.loss).abs() < 1e-6, "loss {} against {}", sorted.loss, in_order.loss);
    }
}
