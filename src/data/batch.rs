//! Tokenized examples and fixed-shape (B, T) batches for training and evaluation.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{DataError, Example, Gpt2Tokenizer};

/// One tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedExample {
    /// Token ids, 1..=`seq_len` of them. Text that encodes to no tokens gets the single
    /// end-of-text id so that the classifier has a last token to pool.
    pub ids: Vec<u32>,
    /// Class index into the label names.
    pub label: usize,
}

/// Tokenized examples and the sequence length their batches use.
#[derive(Clone, Debug)]
pub struct EncodedExamples {
    /// The examples, in input order.
    pub examples: Vec<EncodedExample>,
    /// Sequence length T of every batch: the longest example in tokens, capped at `max_length`
    /// and at the model's `n_positions`.
    pub seq_len: usize,
    /// Number of examples cut to `seq_len` tokens (their first `seq_len` tokens are kept).
    pub truncated: usize,
    /// Id that right-pads batches and fills filler rows: the tokenizer's end-of-text id
    /// (50256 for GPT-2), because GPT-2 has no padding token.
    pub pad_id: u32,
}

/// Tokenizes examples and maps their labels to class indices.
///
/// The sequence length is the longest example in tokens, capped at `max_length` when given and
/// always at `n_positions`. Longer examples keep their first `seq_len` tokens and are counted in
/// [`EncodedExamples::truncated`]. An example whose text encodes to zero tokens (empty text)
/// gets the single token `tokenizer.eos_id()`.
///
/// Fails when `max_length` or `n_positions` is 0 or when a label is not in `label_names`.
pub fn encode_examples(
    tokenizer: &Gpt2Tokenizer,
    examples: &[Example],
    label_names: &[String],
    max_length: Option<usize>,
    n_positions: usize,
) -> Result<EncodedExamples, DataError> {
    if n_positions == 0 {
        return Err(DataError::InvalidArgument {
            name: "n_positions",
            value: 0,
            reason: "the model must accept at least one position".into(),
        });
    }
    if max_length == Some(0) {
        return Err(DataError::InvalidArgument {
            name: "max_length",
            value: 0,
            reason: "sequences need at least one token; leave it unset to use the longest example"
                .into(),
        });
    }

    let mut tokenized = Vec::with_capacity(examples.len());
    for example in examples {
        let Some(label) = label_names.iter().position(|name| *name == example.label) else {
            return Err(DataError::UnknownLabel {
                path: example.file.to_path_buf(),
                line: example.line,
                label: example.label.clone(),
                known: label_names.join(", "),
            });
        };
        let mut ids = tokenizer.encode(&example.text);
        if ids.is_empty() {
            ids.push(tokenizer.eos_id());
        }
        tokenized.push(EncodedExample { ids, label });
    }

    let longest = tokenized.iter().map(|e| e.ids.len()).max().unwrap_or(1);
    let cap = max_length.map_or(n_positions, |max| max.min(n_positions));
    let seq_len = longest.min(cap);
    let mut truncated = 0;
    for example in &mut tokenized {
        if example.ids.len() > seq_len {
            example.ids.truncate(seq_len);
            truncated += 1;
        }
    }
    Ok(EncodedExamples {
        examples: tokenized,
        seq_len,
        truncated,
        pad_id: tokenizer.eos_id(),
    })
}

/// A batch of a fixed shape (B, T), ready to upload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Token ids, shape (B, T) row-major, each row right-padded with the pad id (50256 for
    /// GPT-2).
    pub ids: Vec<u32>,
    /// Real token count of each row, shape (B), each in 1..=T. The classifier pools at position
    /// `lengths[b] - 1`. Lengths come from the token count: 50256 is also a real end-of-text
    /// token, so searching for it cannot find the padding.
    pub lengths: Vec<u32>,
    /// Class index of each row, shape (B), or -1 for filler rows.
    pub labels: Vec<i32>,
    /// Number of real rows: the first `real` rows are examples and the rest are filler rows.
    pub real: usize,
    /// Rows B.
    pub batch_size: usize,
    /// Positions T per row.
    pub seq_len: usize,
}

impl Batch {
    /// The batch cut to its first `seq_len` positions, which must hold every row's tokens.
    ///
    /// # Panics
    /// When a row is longer than `seq_len` or `seq_len` exceeds the batch's.
    pub fn shortened(&self, seq_len: usize) -> Batch {
        assert!(seq_len <= self.seq_len, "cannot lengthen a batch of {} positions to {seq_len}", self.seq_len);
        let longest = self.lengths.iter().copied().max().unwrap_or(0) as usize;
        assert!(longest <= seq_len, "a row of {longest} tokens does not fit in {seq_len} positions");
        let ids = self.ids.chunks_exact(self.seq_len).flat_map(|row| &row[..seq_len]).copied().collect();
        Batch { ids, lengths: self.lengths.clone(), labels: self.labels.clone(), real: self.real, batch_size: self.batch_size, seq_len }
    }
}

/// Label of a filler row. Losses and metrics must skip rows with this label.
pub const FILLER_LABEL: i32 = -1;

/// Iterator over the batches of one pass through encoded examples.
///
/// Every batch has the same shape (B, T), with T = [`EncodedExamples::seq_len`], so one
/// compiled graph serves them all. Training batches ([`BatchIter::train`]) come in a shuffled
/// order and drop the last partial batch. Evaluation batches ([`BatchIter::evaluate`]) keep the
/// input order and fill the last batch with filler rows (length 1, the pad id, label -1).
#[derive(Clone, Debug)]
pub struct BatchIter<'a> {
    data: &'a EncodedExamples,
    order: Vec<usize>,
    batch_size: usize,
    next: usize,
    emitted: usize,
    drop_last: bool,
}

impl<'a> BatchIter<'a> {
    /// Batches for one training epoch.
    ///
    /// The order is a shuffle by a ChaCha8 generator seeded with `seed` on stream `epoch`, so
    /// each epoch has its own order and a run resumed at an epoch boundary gets the same order
    /// as an uninterrupted run. Fails when `batch_size` is 0 or larger than the number of
    /// examples, because then no full batch exists.
    pub fn train(
        data: &'a EncodedExamples,
        batch_size: usize,
        seed: u64,
        epoch: u64,
    ) -> Result<Self, DataError> {
        check_batch_size(batch_size)?;
        if data.examples.len() < batch_size {
            return Err(DataError::TooFewExamples {
                examples: data.examples.len(),
                batch_size,
            });
        }
        let mut order: Vec<usize> = (0..data.examples.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        order.shuffle(&mut rng);
        Ok(Self {
            data,
            order,
            batch_size,
            next: 0,
            emitted: 0,
            drop_last: true,
        })
    }

    /// Batches for evaluation, in input order, with the last batch filled up by filler rows.
    /// No batch is produced for zero examples. Fails when `batch_size` is 0.
    pub fn evaluate(data: &'a EncodedExamples, batch_size: usize) -> Result<Self, DataError> {
        check_batch_size(batch_size)?;
        Ok(Self {
            data,
            order: (0..data.examples.len()).collect(),
            batch_size,
            next: 0,
            emitted: 0,
            drop_last: false,
        })
    }

    /// Batches for evaluation with the examples sorted by token count (stable, so equal counts
    /// keep input order), with the last batch filled up by filler rows. Each batch then contains
    /// texts of similar length, so that little of it is padding. [`BatchIter::order`] maps its
    /// rows back to the examples. Fails when `batch_size` is 0.
    pub fn evaluate_by_length(data: &'a EncodedExamples, batch_size: usize) -> Result<Self, DataError> {
        let mut iter = Self::evaluate(data, batch_size)?;
        iter.order.sort_by_key(|&i| data.examples[i].ids.len());
        Ok(iter)
    }

    /// Example indices in the order the batches take them: row r of batch k is example
    /// `order()[k * batch_size + r]`.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Number of batches in the whole pass.
    pub fn num_batches(&self) -> usize {
        if self.drop_last {
            self.order.len() / self.batch_size
        } else {
            self.order.len().div_ceil(self.batch_size)
        }
    }
}

fn check_batch_size(batch_size: usize) -> Result<(), DataError> {
    if batch_size == 0 {
        return Err(DataError::InvalidArgument {
            name: "batch_size",
            value: 0,
            reason: "a batch needs at least one row".into(),
        });
    }
    Ok(())
}

impl Iterator for BatchIter<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        let remaining = self.order.len() - self.next;
        if remaining == 0 || (self.drop_last && remaining < self.batch_size) {
            return None;
        }
        let real = remaining.min(self.batch_size);
        let rows = &self.order[self.next..self.next + real];
        self.next += real;
        self.emitted += 1;
        Some(make_batch(self.data, rows, self.batch_size))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.num_batches() - self.emitted;
        (left, Some(left))
    }
}

impl ExactSizeIterator for BatchIter<'_> {}

/// Builds one (B, T) batch from the examples at `rows`, adding filler rows up to `batch_size`.
///
/// # Panics
/// When `rows` has more than `batch_size` entries, or an example has 0 or more than `seq_len`
/// tokens. [`encode_examples`] never produces such an example.
pub fn make_batch(data: &EncodedExamples, rows: &[usize], batch_size: usize) -> Batch {
    assert!(
        rows.len() <= batch_size,
        "a batch of {batch_size} rows cannot hold {} examples",
        rows.len()
    );
    let seq_len = data.seq_len;
    let mut ids = vec![data.pad_id; batch_size * seq_len];
    let mut lengths = vec![1u32; batch_size];
    let mut labels = vec![FILLER_LABEL; batch_size];
    for (row, &index) in rows.iter().enumerate() {
        let example = &data.examples[index];
        let length = example.ids.len();
        assert!(
            (1..=seq_len).contains(&length),
            "example {index} has {length} tokens, expected 1..={seq_len} after encoding"
        );
        ids[row * seq_len..row * seq_len + length].copy_from_slice(&example.ids);
        lengths[row] = u32::try_from(length).expect("a sequence length fits in u32");
        labels[row] = i32::try_from(example.label).expect("a class index fits in i32");
    }
    Batch {
        ids,
        lengths,
        labels,
        real: rows.len(),
        batch_size,
        seq_len,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::GPT2_EOS_ID;
    use std::path::Path;
    use std::sync::Arc;

    fn tokenizer() -> Gpt2Tokenizer {
        Gpt2Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer"))
            .unwrap()
    }

    fn example(text: &str, label: &str, line: usize) -> Example {
        Example {
            text: text.into(),
            label: label.into(),
            file: Arc::from(Path::new("memory.tsv")),
            line,
        }
    }

    fn labels() -> Vec<String> {
        vec!["ham".into(), "spam".into()]
    }

    /// Encoded examples with the given token counts and labels 0, 1, 0, and so on. Token ids
    /// count up from 1, so padding is easy to tell apart.
    fn synthetic(lengths: &[usize], seq_len: usize) -> EncodedExamples {
        EncodedExamples {
            examples: lengths
                .iter()
                .enumerate()
                .map(|(i, &n)| EncodedExample {
                    ids: (1..=n as u32).collect(),
                    label: i % 2,
                })
                .collect(),
            seq_len,
            truncated: 0,
            pad_id: GPT2_EOS_ID,
        }
    }

    #[test]
    fn encode_uses_longest_example() {
        let examples = [
            example("Hello, world! Is this spam?", "spam", 1),
            example("Hello", "ham", 2),
        ];
        let encoded = encode_examples(&tokenizer(), &examples, &labels(), None, 1024).unwrap();
        assert_eq!(encoded.seq_len, 8);
        assert_eq!(encoded.truncated, 0);
        assert_eq!(
            encoded.examples[0].ids,
            [15496, 11, 995, 0, 1148, 428, 18084, 30]
        );
        assert_eq!(encoded.examples[0].label, 1);
        assert_eq!(encoded.examples[1].ids, [15496]);
        assert_eq!(encoded.examples[1].label, 0);
        assert_eq!(encoded.pad_id, GPT2_EOS_ID);
    }

    #[test]
    fn encode_truncates_to_max_length_and_positions() {
        let examples = [
            example("Hello, world! Is this spam?", "spam", 1),
            example("Hello, world", "ham", 2),
            example("Hello", "ham", 3),
        ];
        let capped = encode_examples(&tokenizer(), &examples, &labels(), Some(3), 1024).unwrap();
        assert_eq!(capped.seq_len, 3);
        assert_eq!(capped.truncated, 1, "only the 8-token example exceeds 3");
        assert_eq!(
            capped.examples[0].ids,
            [15496, 11, 995],
            "truncation keeps the first tokens"
        );

        let by_positions =
            encode_examples(&tokenizer(), &examples, &labels(), Some(100), 2).unwrap();
        assert_eq!(by_positions.seq_len, 2, "n_positions caps max_length");
        assert_eq!(by_positions.truncated, 2);
    }

    #[test]
    fn empty_text_gets_end_of_text() {
        let examples = [example("", "ham", 1), example("Hello", "spam", 2)];
        let encoded = encode_examples(&tokenizer(), &examples, &labels(), None, 1024).unwrap();
        assert_eq!(encoded.examples[0].ids, [GPT2_EOS_ID]);
        assert_eq!(encoded.seq_len, 1);
    }

    #[test]
    fn encode_rejects_unknown_label_and_zero_sizes() {
        let examples = [example("Hello", "eggs", 7)];
        let err = encode_examples(&tokenizer(), &examples, &labels(), None, 1024)
            .unwrap_err()
            .to_string();
        assert!(err.contains("memory.tsv line 7"), "message: {err}");
        assert!(err.contains("`eggs`"), "message: {err}");
        assert!(err.contains("ham, spam"), "message: {err}");

        let ok = [example("Hello", "ham", 1)];
        let err = encode_examples(&tokenizer(), &ok, &labels(), Some(0), 1024)
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_length 0"), "message: {err}");
        let err = encode_examples(&tokenizer(), &ok, &labels(), None, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("n_positions 0"), "message: {err}");
    }

    #[test]
    fn batch_pads_right_with_lengths() {
        let data = synthetic(&[3, 1, 4], 4);
        let batch = make_batch(&data, &[0, 1, 2], 3);
        let pad = GPT2_EOS_ID;
        assert_eq!(batch.ids, [1, 2, 3, pad, 1, pad, pad, pad, 1, 2, 3, 4]);
        assert_eq!(batch.lengths, [3, 1, 4]);
        assert_eq!(batch.labels, [0, 1, 0]);
        assert_eq!(batch.real, 3);
        assert_eq!((batch.batch_size, batch.seq_len), (3, 4));
    }

    #[test]
    fn lengths_count_real_end_of_text_tokens() {
        // A real 50256 inside the text must count toward the length.
        let mut data = synthetic(&[3], 4);
        data.examples[0].ids = vec![5, GPT2_EOS_ID, GPT2_EOS_ID];
        let batch = make_batch(&data, &[0], 1);
        assert_eq!(batch.lengths, [3]);
        assert_eq!(batch.ids, [5, GPT2_EOS_ID, GPT2_EOS_ID, GPT2_EOS_ID]);
    }

    #[test]
    fn evaluation_fills_last_batch() {
        let data = synthetic(&[2, 2, 2, 2, 2], 2);
        let mut iter = BatchIter::evaluate(&data, 2).unwrap();
        assert_eq!(iter.len(), 3);
        let first = iter.next().unwrap();
        assert_eq!(iter.len(), 2, "two batches left after the first");
        let mut batches = vec![first];
        batches.extend(iter);
        assert_eq!(batches.len(), 3);
        assert_eq!(batches[0].ids, [1, 2, 1, 2]);
        let last = &batches[2];
        assert_eq!(last.real, 1);
        assert_eq!(last.ids, [1, 2, GPT2_EOS_ID, GPT2_EOS_ID]);
        assert_eq!(last.lengths, [2, 1], "filler rows have length 1");
        assert_eq!(last.labels, [0, FILLER_LABEL]);
        for (i, batch) in batches.iter().enumerate() {
            assert_eq!(batch.ids.len(), 4, "batch {i} changed shape");
        }
    }

    #[test]
    fn evaluation_keeps_order() {
        let data = synthetic(&[1, 2, 3], 3);
        let lengths: Vec<u32> = BatchIter::evaluate(&data, 2)
            .unwrap()
            .flat_map(|b| b.lengths[..b.real].to_vec())
            .collect();
        assert_eq!(lengths, [1, 2, 3]);
    }

    #[test]
    fn evaluation_by_length_sorts_stably() {
        let data = synthetic(&[3, 1, 3, 2, 1], 3);
        let iter = BatchIter::evaluate_by_length(&data, 2).unwrap();
        assert_eq!(iter.order(), [1, 4, 3, 0, 2], "shortest first, ties in input order");
        let batches: Vec<Batch> = iter.collect();
        assert_eq!(batches.len(), 3);
        let lengths: Vec<u32> = batches.iter().flat_map(|b| b.lengths[..b.real].to_vec()).collect();
        assert_eq!(lengths, [1, 1, 2, 3, 3]);
        assert_eq!(batches[2].real, 1, "the last batch is filled up");
    }

    #[test]
    fn shortened_batch_keeps_rows() {
        let data = synthetic(&[2, 3], 5);
        let batch = make_batch(&data, &[0, 1], 2);
        let short = batch.shortened(3);
        assert_eq!(short.seq_len, 3);
        assert_eq!(short.ids, [1, 2, GPT2_EOS_ID, 1, 2, 3]);
        assert_eq!((short.lengths.clone(), short.labels.clone(), short.real), (batch.lengths, batch.labels, batch.real));
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn shortened_batch_rejects_cut_rows() {
        let data = synthetic(&[2, 3], 5);
        make_batch(&data, &[0, 1], 2).shortened(2);
    }

    #[test]
    fn training_drops_partial_batch_and_shuffles() {
        let lengths: Vec<usize> = (1..=10).collect();
        let data = synthetic(&lengths, 10);
        let iter = BatchIter::train(&data, 3, 42, 0).unwrap();
        assert_eq!(iter.num_batches(), 3);
        assert_eq!(iter.len(), 3);
        let epoch0: Vec<Batch> = iter.collect();
        assert_eq!(epoch0.len(), 3);
        assert!(epoch0
            .iter()
            .all(|b| b.real == 3 && b.labels.iter().all(|&l| l >= 0)));

        let again: Vec<Batch> = BatchIter::train(&data, 3, 42, 0).unwrap().collect();
        assert_eq!(
            epoch0, again,
            "same seed and epoch must give the same batches"
        );
        let epoch1: Vec<Batch> = BatchIter::train(&data, 3, 42, 1).unwrap().collect();
        assert_ne!(epoch0, epoch1, "each epoch should have its own order");

        let mut seen: Vec<u32> = epoch0.iter().flat_map(|b| b.lengths.clone()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen.len(),
            9,
            "nine distinct examples in three full batches"
        );
    }

    #[test]
    fn training_rejects_too_few_examples() {
        let data = synthetic(&[1, 1], 1);
        let err = BatchIter::train(&data, 3, 0, 0).unwrap_err().to_string();
        assert!(err.contains("2 training examples"), "message: {err}");
        assert!(err.contains("batch size 3"), "message: {err}");
        let err = BatchIter::evaluate(&data, 0).unwrap_err().to_string();
        assert!(err.contains("batch_size 0"), "message: {err}");
    }
}
