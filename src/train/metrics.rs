//! Classification metrics of one data split: accuracy, loss, confusion matrix and per-label
//! precision, recall and F1.

use serde::{Deserialize, Serialize};

/// Precision, recall, F1 and support of one label.
///
/// A ratio whose denominator is 0 is reported as 0 (scikit-learn's `zero_division=0`): precision
/// when the label is never predicted, recall when it never occurs, and F1 when precision and
/// recall are both 0.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LabelMetrics {
    /// Correct predictions of the label over all predictions of it, in [0, 1].
    pub precision: f64,
    /// Correct predictions of the label over all examples that have it, in [0, 1].
    pub recall: f64,
    /// Harmonic mean of precision and recall, in [0, 1].
    pub f1: f64,
    /// Number of examples whose true label it is.
    pub support: u64,
}

/// Metrics of one split (train, validation or test).
///
/// Serializes with the keys `accuracy`, `loss`, `labels`, `confusion_matrix` and `per_label`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitMetrics {
    /// Fraction of examples predicted correctly, in [0, 1]; 0 for a split without examples.
    pub accuracy: f64,
    /// Mean cross-entropy loss per example, in nats, as passed by the caller.
    pub loss: f64,
    /// Label names in class-index order.
    pub labels: Vec<String>,
    /// Counts, shape (K, K): row = true label, column = predicted label, both in `labels` order.
    pub confusion_matrix: Vec<Vec<u64>>,
    /// Precision, recall, F1 and support of each label, in `labels` order.
    pub per_label: Vec<LabelMetrics>,
}

impl SplitMetrics {
    /// Computes the metrics from true and predicted class indices of the same examples.
    ///
    /// # Panics
    /// When `truths` and `predictions` differ in length or an index is not below
    /// `label_names.len()`; both are caller bugs, not data errors.
    pub fn from_predictions(
        label_names: &[String],
        truths: &[usize],
        predictions: &[usize],
        loss: f64,
    ) -> Self {
        assert_eq!(
            truths.len(),
            predictions.len(),
            "SplitMetrics: {} true labels but {} predictions",
            truths.len(),
            predictions.len()
        );
        let classes = label_names.len();
        let mut confusion_matrix = vec![vec![0u64; classes]; classes];
        for (row, (&truth, &prediction)) in truths.iter().zip(predictions).enumerate() {
            assert!(
                truth < classes && prediction < classes,
                "SplitMetrics: row {row} has true class {truth} and predicted class {prediction}, expected both below {classes}"
            );
            confusion_matrix[truth][prediction] += 1;
        }

        let correct: u64 = (0..classes).map(|k| confusion_matrix[k][k]).sum();
        let per_label = (0..classes)
            .map(|k| {
                let true_positives = confusion_matrix[k][k];
                let support: u64 = confusion_matrix[k].iter().sum();
                let predicted: u64 = confusion_matrix.iter().map(|row| row[k]).sum();
                let precision = ratio(true_positives, predicted);
                let recall = ratio(true_positives, support);
                let f1 = if precision + recall > 0.0 {
                    2.0 * precision * recall / (precision + recall)
                } else {
                    0.0
                };
                LabelMetrics {
                    precision,
                    recall,
                    f1,
                    support,
                }
            })
            .collect();

        Self {
            accuracy: ratio(correct, truths.len() as u64),
            loss,
            labels: label_names.to_vec(),
            confusion_matrix,
            per_label,
        }
    }

    /// Number of examples counted.
    pub fn examples(&self) -> u64 {
        self.confusion_matrix.iter().flatten().sum()
    }
}

/// `numerator / denominator`, or 0 when the denominator is 0.
fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn assert_near(actual: f64, expected: f64, what: &str) {
        assert!(
            (actual - expected).abs() < 1e-12,
            "{what}: got {actual}, expected {expected}"
        );
    }

    #[test]
    fn three_class_case_by_hand() {
        // true:      a a b b b c
        // predicted: a b b b a b
        let metrics = SplitMetrics::from_predictions(
            &names(&["a", "b", "c"]),
            &[0, 0, 1, 1, 1, 2],
            &[0, 1, 1, 1, 0, 1],
            0.25,
        );
        assert_eq!(
            metrics.confusion_matrix,
            vec![vec![1, 1, 0], vec![1, 2, 0], vec![0, 1, 0]]
        );
        assert_near(metrics.accuracy, 0.5, "accuracy");
        assert_near(metrics.loss, 0.25, "loss");
        assert_eq!(metrics.examples(), 6);

        let a = &metrics.per_label[0];
        assert_near(a.precision, 0.5, "a precision");
        assert_near(a.recall, 0.5, "a recall");
        assert_near(a.f1, 0.5, "a f1");
        assert_eq!(a.support, 2);

        let b = &metrics.per_label[1];
        assert_near(b.precision, 0.5, "b precision");
        assert_near(b.recall, 2.0 / 3.0, "b recall");
        assert_near(b.f1, 4.0 / 7.0, "b f1");
        assert_eq!(b.support, 3);

        let c = &metrics.per_label[2];
        assert_near(c.precision, 0.0, "c precision (never predicted)");
        assert_near(c.recall, 0.0, "c recall");
        assert_near(c.f1, 0.0, "c f1");
        assert_eq!(c.support, 1);
    }

    #[test]
    fn binary_case_by_hand() {
        // 3 true ham predicted ham, 1 ham predicted spam, 2 spam predicted spam.
        let metrics = SplitMetrics::from_predictions(
            &names(&["ham", "spam"]),
            &[0, 0, 0, 0, 1, 1],
            &[0, 0, 0, 1, 1, 1],
            0.5,
        );
        assert_eq!(metrics.confusion_matrix, vec![vec![3, 1], vec![0, 2]]);
        assert_near(metrics.accuracy, 5.0 / 6.0, "accuracy");
        assert_near(metrics.per_label[0].precision, 1.0, "ham precision");
        assert_near(metrics.per_label[0].recall, 0.75, "ham recall");
        assert_near(metrics.per_label[0].f1, 6.0 / 7.0, "ham f1");
        assert_near(metrics.per_label[1].precision, 2.0 / 3.0, "spam precision");
        assert_near(metrics.per_label[1].recall, 1.0, "spam recall");
        assert_near(metrics.per_label[1].f1, 0.8, "spam f1");
    }

    #[test]
    fn undefined_ratios_are_zero() {
        let empty = SplitMetrics::from_predictions(&names(&["a", "b"]), &[], &[], 0.0);
        assert_near(empty.accuracy, 0.0, "accuracy of no examples");
        for (k, label) in empty.per_label.iter().enumerate() {
            assert_eq!(
                (label.precision, label.recall, label.f1, label.support),
                (0.0, 0.0, 0.0, 0),
                "label {k}"
            );
        }

        // Label b has no examples and is never predicted.
        let absent = SplitMetrics::from_predictions(&names(&["a", "b"]), &[0, 0], &[0, 0], 0.0);
        assert_near(absent.per_label[1].recall, 0.0, "recall without support");
        assert_near(absent.per_label[0].f1, 1.0, "f1 of a perfect label");
    }

    #[test]
    fn serializes_with_fixed_keys() {
        let metrics = SplitMetrics::from_predictions(&names(&["0", "1"]), &[0, 1], &[0, 0], 0.75);
        let value = serde_json::to_value(&metrics).unwrap();
        let object = value.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "accuracy",
                "confusion_matrix",
                "labels",
                "loss",
                "per_label"
            ]
        );
        let label_keys: Vec<&str> = value["per_label"][0]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut label_keys = label_keys;
        label_keys.sort_unstable();
        assert_eq!(label_keys, ["f1", "precision", "recall", "support"]);
        assert_eq!(
            value["confusion_matrix"],
            serde_json::json!([[1, 0], [1, 0]])
        );
        assert_eq!(value["labels"], serde_json::json!(["0", "1"]));

        let back: SplitMetrics = serde_json::from_value(value).unwrap();
        assert_eq!(back, metrics);
    }

    #[test]
    #[should_panic(expected = "expected both below 2")]
    fn out_of_range_class_panics() {
        SplitMetrics::from_predictions(&names(&["a", "b"]), &[0], &[2], 0.0);
    }
}
