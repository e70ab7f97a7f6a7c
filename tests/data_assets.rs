//! Reads the bundled datasets and tokenizer as a user would, and checks their known counts.

use std::path::{Path, PathBuf};

use shadertune::data::{
    balance, encode_examples, read_labelled, split, Balance, BatchIter, Dataset, Gpt2Tokenizer,
    ReadOptions, GPT2_EOS_ID,
};

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

fn read_default(path: &Path) -> Dataset {
    read_labelled(path, &ReadOptions::default())
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn sms() -> Dataset {
    read_default(&assets().join("data/sms_spam/SMSSpamCollection"))
}

fn tokenizer() -> Gpt2Tokenizer {
    Gpt2Tokenizer::from_dir(&assets().join("tokenizer")).unwrap()
}

#[test]
fn sms_spam_counts() {
    let dataset = sms();
    assert_eq!(dataset.rows_read, 5574);
    assert_eq!(dataset.examples.len(), 5574);
    assert_eq!(dataset.label_names, ["ham", "spam"]);
    assert_eq!(dataset.rows_per_label["ham"], 4827);
    assert_eq!(dataset.rows_per_label["spam"], 747);
    let first = &dataset.examples[0];
    assert_eq!(first.label, "ham");
    assert!(
        first.text.starts_with("Go until jurong point"),
        "first text: {}",
        first.text
    );
    assert_eq!(dataset.examples[5573].line, 5574);
}

#[test]
fn sms_spam_directory_skips_readme() {
    let dataset = read_default(&assets().join("data/sms_spam"));
    assert_eq!(dataset.files.len(), 1, "files read: {:?}", dataset.files);
    assert_eq!(dataset.rows_read, 5574);
}

#[test]
fn sentiment_files_count_each() {
    for name in [
        "amazon_cells_labelled.txt",
        "imdb_labelled.txt",
        "yelp_labelled.txt",
    ] {
        let dataset = read_default(&assets().join("data/sentiment").join(name));
        assert_eq!(dataset.rows_read, 1000, "{name}: rows");
        assert_eq!(dataset.label_names, ["0", "1"], "{name}: labels");
        assert_eq!(dataset.rows_per_label["0"], 500, "{name}: label 0");
        assert_eq!(dataset.rows_per_label["1"], 500, "{name}: label 1");
    }
}

#[test]
fn sentiment_directory_reads_all() {
    let dataset = read_default(&assets().join("data/sentiment"));
    assert_eq!(dataset.rows_read, 3000);
    assert_eq!(dataset.files.len(), 3, "files read: {:?}", dataset.files);
    assert_eq!(dataset.rows_per_label["0"], 1500);
    assert_eq!(dataset.rows_per_label["1"], 1500);
    let first_file = dataset.files[0].file_name().unwrap();
    assert_eq!(
        first_file, "amazon_cells_labelled.txt",
        "files are read in name order"
    );
    // IMDB sentences end with two spaces before the tab, and the text keeps them.
    let imdb = dataset
        .examples
        .iter()
        .find(|e| e.file.ends_with("imdb_labelled.txt"))
        .unwrap();
    assert!(
        imdb.text.ends_with("  "),
        "IMDB text lost its trailing spaces: {:?}",
        imdb.text
    );
}

#[test]
fn sms_balance_and_split_sizes() {
    let balanced = balance(sms().examples, Balance::Undersample, 123);
    assert_eq!(balanced.len(), 1494);
    assert_eq!(balanced.iter().filter(|e| e.label == "spam").count(), 747);

    let splits = split(balanced.clone(), [0.7, 0.1, 0.2], 123).unwrap();
    assert_eq!(splits.train.len(), 1045);
    assert_eq!(splits.validation.len(), 149);
    assert_eq!(splits.test.len(), 300);

    let again = split(
        balance(sms().examples, Balance::Undersample, 123),
        [0.7, 0.1, 0.2],
        123,
    )
    .unwrap();
    assert_eq!(
        splits.train, again.train,
        "balancing and splitting must repeat for a seed"
    );
    assert_eq!(
        splits.test, again.test,
        "balancing and splitting must repeat for a seed"
    );
}

#[test]
fn sms_token_lengths() {
    let dataset = sms();
    let tokenizer = tokenizer();
    let full = encode_examples(
        &tokenizer,
        &dataset.examples,
        &dataset.label_names,
        None,
        1024,
    )
    .unwrap();
    assert_eq!(full.seq_len, 257, "longest SMS in GPT-2 tokens");
    assert_eq!(full.truncated, 0);

    let capped = encode_examples(
        &tokenizer,
        &dataset.examples,
        &dataset.label_names,
        Some(120),
        1024,
    )
    .unwrap();
    assert_eq!(capped.seq_len, 120);
    assert_eq!(capped.truncated, 13, "SMS messages longer than 120 tokens");
}

#[test]
fn sentiment_longest_sentences() {
    let tokenizer = tokenizer();
    for (name, longest) in [
        ("amazon_cells_labelled.txt", 37),
        ("imdb_labelled.txt", 103),
        ("yelp_labelled.txt", 40),
    ] {
        let dataset = read_default(&assets().join("data/sentiment").join(name));
        let encoded = encode_examples(
            &tokenizer,
            &dataset.examples,
            &dataset.label_names,
            None,
            1024,
        )
        .unwrap();
        assert_eq!(
            encoded.seq_len, longest,
            "{name}: longest sentence in tokens"
        );
    }
}

#[test]
fn sms_evaluation_batches_cover_every_example() {
    let dataset = sms();
    let encoded = encode_examples(
        &tokenizer(),
        &dataset.examples,
        &dataset.label_names,
        Some(64),
        1024,
    )
    .unwrap();
    let batches: Vec<_> = BatchIter::evaluate(&encoded, 8).unwrap().collect();
    assert_eq!(batches.len(), 5574usize.div_ceil(8));
    let real: usize = batches.iter().map(|b| b.real).sum();
    assert_eq!(real, 5574);
    let last = batches.last().unwrap();
    assert_eq!(last.real, 5574 % 8);
    for (index, batch) in batches.iter().enumerate() {
        assert_eq!(batch.ids.len(), 8 * 64, "batch {index} shape");
        for row in 0..8 {
            let length = batch.lengths[row] as usize;
            assert!(
                (1..=64).contains(&length),
                "batch {index} row {row} length {length}"
            );
            let padding = &batch.ids[row * 64 + length..(row + 1) * 64];
            assert!(
                padding.iter().all(|&id| id == GPT2_EOS_ID),
                "batch {index} row {row} padding"
            );
        }
    }
}
