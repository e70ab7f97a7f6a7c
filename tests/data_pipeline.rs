//! The public path from a labelled file to batches, metrics and the report files, in the order a
//! training run calls it.

use std::path::Path;

use shadertune::data::{
    balance, encode_examples, read_labelled, split, Balance, BatchIter, Gpt2Tokenizer, ReadOptions,
};
use shadertune::train::metrics::SplitMetrics;
use shadertune::train::report::{
    append_history, format_confusion_table, format_per_label, plot_accuracy, plot_confusion_matrix,
    plot_losses, read_history, HistoryRecord,
};

#[test]
fn yelp_file_to_report() {
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
    let dataset = read_labelled(
        &assets.join("data/sentiment/yelp_labelled.txt"),
        &ReadOptions::default(),
    )
    .unwrap();
    let balanced = balance(dataset.examples.clone(), Balance::Undersample, 5);
    assert_eq!(balanced.len(), 1000, "yelp is already balanced 500/500");
    let splits = split(balanced, [0.8, 0.1, 0.1], 5).unwrap();
    assert_eq!(
        (
            splits.train.len(),
            splits.validation.len(),
            splits.test.len()
        ),
        (800, 100, 100)
    );

    let tokenizer = Gpt2Tokenizer::from_dir(&assets.join("tokenizer")).unwrap();
    let train = encode_examples(
        &tokenizer,
        &splits.train,
        &dataset.label_names,
        Some(32),
        1024,
    )
    .unwrap();
    let test = encode_examples(
        &tokenizer,
        &splits.test,
        &dataset.label_names,
        Some(32),
        1024,
    )
    .unwrap();
    assert_eq!(BatchIter::train(&train, 16, 5, 0).unwrap().len(), 50);

    // A stand-in classifier that predicts class 1 for every real row.
    let mut truths = Vec::new();
    let mut predictions = Vec::new();
    for batch in BatchIter::evaluate(&test, 16).unwrap() {
        for row in 0..batch.real {
            truths.push(batch.labels[row] as usize);
            predictions.push(1);
        }
    }
    assert_eq!(
        truths.len(),
        100,
        "evaluation must see each test example once"
    );
    let metrics = SplitMetrics::from_predictions(&dataset.label_names, &truths, &predictions, 0.69);
    let positives = truths.iter().filter(|&&t| t == 1).count() as f64;
    assert!(
        (metrics.accuracy - positives / 100.0).abs() < 1e-12,
        "accuracy {}",
        metrics.accuracy
    );
    assert_eq!(
        metrics.confusion_matrix[0][0], 0,
        "class 0 is never predicted"
    );

    let out = tempfile::tempdir().unwrap();
    let history_path = out.path().join("history.jsonl");
    for step in [10u64, 20, 30] {
        let record = HistoryRecord {
            step,
            epoch: 0,
            train_loss: 1.0 / step as f64,
            validation_loss: Some(1.2 / step as f64),
            train_accuracy: Some(0.5),
            validation_accuracy: Some(metrics.accuracy),
            seconds: step as f64,
        };
        append_history(&history_path, &record).unwrap();
    }
    let history = read_history(&history_path).unwrap();
    assert_eq!(history.len(), 3);
    plot_losses(&out.path().join("loss.png"), &history).unwrap();
    plot_accuracy(&out.path().join("accuracy.png"), &history).unwrap();
    plot_confusion_matrix(&out.path().join("confusion_matrix.png"), &metrics).unwrap();
    for name in ["loss.png", "accuracy.png", "confusion_matrix.png"] {
        let bytes = std::fs::read(out.path().join(name)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{name} is not a PNG");
    }

    let table = format_confusion_table(&metrics);
    assert_eq!(
        table.lines().count(),
        3,
        "header and one row per label:\n{table}"
    );
    let per_label = format_per_label(&metrics);
    assert!(
        per_label.lines().nth(1).unwrap().starts_with("0 "),
        "first label row:\n{per_label}"
    );
}
