//! Class balancing and the train/validation/test split, both reproducible from a seed.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{DataError, Example};

/// Label balancing mode of [`balance`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balance {
    /// Keep a random subset of each label as large as the rarest label's count.
    #[default]
    Undersample,
    /// Keep every example.
    None,
}

/// Train, validation and test examples.
#[derive(Clone, Debug, Default)]
pub struct Splits {
    /// Examples to train on.
    pub train: Vec<Example>,
    /// Examples for model selection during training.
    pub validation: Vec<Example>,
    /// Held-out examples for the final score.
    pub test: Vec<Example>,
}

/// Tolerance on the sum of the split fractions, which must be 1.
pub const FRACTION_SUM_TOLERANCE: f64 = 1e-6;

/// Balances the labels of `examples`.
///
/// With [`Balance::Undersample`], every label keeps a random subset of the size of the rarest
/// label. Labels are visited in sorted order and each label's examples are shuffled with one
/// ChaCha8 generator seeded with `seed`, so the same input and seed give the same result. The
/// kept examples stay in their input order. With [`Balance::None`], `examples` is returned as is.
pub fn balance(examples: Vec<Example>, mode: Balance, seed: u64) -> Vec<Example> {
    if mode == Balance::None {
        return examples;
    }
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, example) in examples.iter().enumerate() {
        by_label
            .entry(example.label.as_str())
            .or_default()
            .push(index);
    }
    let Some(rarest) = by_label.values().map(Vec::len).min() else {
        return examples;
    };

    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut keep = vec![false; examples.len()];
    for indices in by_label.values_mut() {
        indices.shuffle(&mut rng);
        for &index in &indices[..rarest] {
            keep[index] = true;
        }
    }
    examples
        .into_iter()
        .zip(keep)
        .filter_map(|(example, kept)| kept.then_some(example))
        .collect()
}

/// Shuffles `examples` with a ChaCha8 generator seeded with `seed` and cuts them into train,
/// validation and test parts.
///
/// `fractions` is `[train, validation, test]`. Each must be finite and at least 0, and they must
/// sum to 1 within [`FRACTION_SUM_TOLERANCE`]. The train part gets `floor(n * train)` examples,
/// the validation part `floor(n * validation)` and the test part the rest, so 1,494 examples
/// split 0.7/0.1/0.2 give 1,045/149/300. Fails when the train part would be empty.
pub fn split(examples: Vec<Example>, fractions: [f64; 3], seed: u64) -> Result<Splits, DataError> {
    validate_fractions(fractions)?;
    let [train_fraction, validation_fraction, _] = fractions;
    let total = examples.len();
    // Truncation toward zero is intended: it is the floor of a non-negative product.
    let train_len = (total as f64 * train_fraction) as usize;
    let validation_len = ((total as f64 * validation_fraction) as usize).min(total - train_len);
    if train_len == 0 {
        return Err(invalid_fractions(
            fractions,
            format!("the train part of {total} examples would be empty; use a larger train fraction or more data"),
        ));
    }

    let mut shuffled = examples;
    shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    let test = shuffled.split_off(train_len + validation_len);
    let validation = shuffled.split_off(train_len);
    Ok(Splits {
        train: shuffled,
        validation,
        test,
    })
}

/// Checks that split fractions are finite, non-negative and sum to 1.
pub fn validate_fractions(fractions: [f64; 3]) -> Result<(), DataError> {
    let names = ["train", "validation", "test"];
    for (name, value) in names.iter().zip(fractions) {
        if !value.is_finite() || value < 0.0 {
            return Err(invalid_fractions(
                fractions,
                format!("the {name} fraction {value} must be a finite number of at least 0"),
            ));
        }
    }
    let sum: f64 = fractions.iter().sum();
    if (sum - 1.0).abs() > FRACTION_SUM_TOLERANCE {
        return Err(invalid_fractions(
            fractions,
            format!("the fractions sum to {sum}, expected 1 (within {FRACTION_SUM_TOLERANCE})"),
        ));
    }
    if fractions[0] == 0.0 {
        return Err(invalid_fractions(
            fractions,
            "the train fraction must be above 0".into(),
        ));
    }
    Ok(())
}

fn invalid_fractions(fractions: [f64; 3], reason: String) -> DataError {
    DataError::InvalidFractions {
        train: fractions[0],
        validation: fractions[1],
        test: fractions[2],
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;

    fn examples(counts: &[(&str, usize)]) -> Vec<Example> {
        let file: Arc<Path> = Arc::from(Path::new("memory.tsv"));
        let mut out = Vec::new();
        for (label, count) in counts {
            for i in 0..*count {
                out.push(Example {
                    text: format!("{label} text {i}"),
                    label: label.to_string(),
                    file: Arc::clone(&file),
                    line: out.len() + 1,
                });
            }
        }
        out
    }

    fn count(examples: &[Example], label: &str) -> usize {
        examples.iter().filter(|e| e.label == label).count()
    }

    #[test]
    fn undersample_matches_rarest_label() {
        let balanced = balance(
            examples(&[("ham", 40), ("spam", 7), ("x", 9)]),
            Balance::Undersample,
            1,
        );
        assert_eq!(count(&balanced, "ham"), 7);
        assert_eq!(count(&balanced, "spam"), 7);
        assert_eq!(count(&balanced, "x"), 7);
        let lines: Vec<usize> = balanced.iter().map(|e| e.line).collect();
        let mut sorted = lines.clone();
        sorted.sort_unstable();
        assert_eq!(lines, sorted, "kept examples must stay in input order");
    }

    #[test]
    fn undersample_is_deterministic_per_seed() {
        let input = examples(&[("ham", 100), ("spam", 10)]);
        let first = balance(input.clone(), Balance::Undersample, 123);
        let again = balance(input.clone(), Balance::Undersample, 123);
        let other = balance(input, Balance::Undersample, 124);
        assert_eq!(first, again, "same seed must keep the same examples");
        assert_ne!(
            first, other,
            "a different seed should keep other ham examples"
        );
    }

    #[test]
    fn balance_none_keeps_everything() {
        let input = examples(&[("ham", 5), ("spam", 2)]);
        assert_eq!(balance(input.clone(), Balance::None, 0), input);
    }

    #[test]
    fn split_sizes_follow_floor_rule() {
        let input = examples(&[("ham", 747), ("spam", 747)]);
        let splits = split(input, [0.7, 0.1, 0.2], 123).unwrap();
        assert_eq!(splits.train.len(), 1045);
        assert_eq!(splits.validation.len(), 149);
        assert_eq!(splits.test.len(), 300);
    }

    #[test]
    fn split_is_deterministic_and_disjoint() {
        let input = examples(&[("a", 30), ("b", 20)]);
        let first = split(input.clone(), [0.6, 0.2, 0.2], 7).unwrap();
        let again = split(input.clone(), [0.6, 0.2, 0.2], 7).unwrap();
        let other = split(input.clone(), [0.6, 0.2, 0.2], 8).unwrap();
        assert_eq!(first.train, again.train);
        assert_eq!(first.validation, again.validation);
        assert_eq!(first.test, again.test);
        assert_ne!(
            first.train, other.train,
            "a different seed should reorder the data"
        );

        let mut lines: Vec<usize> = first
            .train
            .iter()
            .chain(&first.validation)
            .chain(&first.test)
            .map(|e| e.line)
            .collect();
        lines.sort_unstable();
        let expected: Vec<usize> = (1..=50).collect();
        assert_eq!(
            lines, expected,
            "every example must land in exactly one part"
        );
    }

    #[test]
    fn split_rejects_bad_fractions() {
        let cases: [([f64; 3], &str); 5] = [
            ([0.7, 0.1, 0.1], "sum to"),
            ([1.2, -0.1, -0.1], "validation fraction -0.1"),
            ([f64::NAN, 0.5, 0.5], "train fraction NaN"),
            ([0.0, 0.5, 0.5], "train fraction must be above 0"),
            ([0.5, 0.5, f64::INFINITY], "test fraction inf"),
        ];
        for (fractions, expected) in cases {
            let err = split(examples(&[("a", 5), ("b", 5)]), fractions, 0)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(expected),
                "fractions {fractions:?}: message `{err}` lacks `{expected}`"
            );
            for name in ["train=", "validation=", "test="] {
                assert!(
                    err.contains(name),
                    "fractions {fractions:?}: message `{err}` lacks `{name}`"
                );
            }
        }
    }

    #[test]
    fn split_rejects_empty_train_part() {
        let err = split(examples(&[("a", 1), ("b", 1)]), [0.4, 0.3, 0.3], 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("train part of 2 examples would be empty"),
            "message: {err}"
        );
    }

    #[test]
    fn split_accepts_rounding_in_sum() {
        let splits = split(examples(&[("a", 5), ("b", 5)]), [0.7, 0.2, 0.1 + 1e-9], 0).unwrap();
        assert_eq!(
            splits.train.len() + splits.validation.len() + splits.test.len(),
            10
        );
    }
}
