//! Structure and self-consistency of the golden files written by tests/fixtures/make_fixtures.py.
//! The comparisons of the engine against these values live in the GPU parity tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use shadertune::model::config::Gpt2Config;
use shadertune::model::weights::{expected_shapes, stored_name, HeadKind};

const IGNORE_INDEX: i64 = -100;
const ENDOFTEXT: i64 = 50256;

fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}

/// A golden file read into memory: each tensor as (dtype, shape, f64 values), plus metadata.
struct Golden {
    tensors: HashMap<String, (Dtype, Vec<usize>, Vec<f64>)>,
    metadata: HashMap<String, String>,
}

impl Golden {
    fn read(name: &str) -> Golden {
        let bytes = std::fs::read(fixture(name)).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let metadata = header.metadata().clone().unwrap_or_default();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (tensor_name, view) in file.tensors() {
            let values: Vec<f64> = match view.dtype() {
                Dtype::F32 => view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                Dtype::I64 => view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                    .collect(),
                other => panic!("{name}: tensor {tensor_name} has unexpected dtype {other}"),
            };
            tensors.insert(tensor_name, (view.dtype(), view.shape().to_vec(), values));
        }
        Golden { tensors, metadata }
    }

    fn get(&self, name: &str) -> &(Dtype, Vec<usize>, Vec<f64>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("golden tensor `{name}` is missing"))
    }

    fn shape(&self, name: &str) -> &[usize] {
        &self.get(name).1
    }

    fn f32s(&self, name: &str) -> &[f64] {
        let (dtype, _, values) = self.get(name);
        assert_eq!(*dtype, Dtype::F32, "dtype of {name}");
        values
    }

    fn ints(&self, name: &str) -> Vec<i64> {
        let (dtype, _, values) = self.get(name);
        assert_eq!(*dtype, Dtype::I64, "dtype of {name}");
        values.iter().map(|&v| v as i64).collect()
    }
}

/// Checks the metadata and returns the config stored in it.
fn check_metadata(golden: &Golden, file: &str) -> Gpt2Config {
    for (key, value) in [
        ("torch", "2.15.0"),
        ("transformers", "5.25.0"),
        ("safetensors", "0.8.0"),
    ] {
        assert_eq!(
            golden.metadata.get(key).map(String::as_str),
            Some(value),
            "{file}: metadata `{key}`"
        );
    }
    assert!(
        golden.metadata.contains_key("seed"),
        "{file}: metadata lacks the seed"
    );
    Gpt2Config::from_json_str(&golden.metadata["config"]).unwrap()
}

/// Checks that `{group}.{name}` exists for every parameter with its shape, wte cut to `rows` rows.
fn check_parameter_group(
    golden: &Golden,
    group: &str,
    config: &Gpt2Config,
    head: HeadKind,
    rows: usize,
) {
    let mut count = 0;
    for (name, mut shape) in expected_shapes(config, head) {
        if name == "wte.weight" {
            shape[0] = rows;
        }
        let stored = format!("{group}.{}", stored_name(&name, true));
        assert_eq!(golden.shape(&stored), shape.as_slice(), "shape of {stored}");
        assert!(
            golden.f32s(&stored).iter().all(|v| v.is_finite()),
            "{stored} has non-finite values"
        );
        count += 1;
    }
    let prefixes = [format!("{group}.transformer."), format!("{group}.score.")];
    let stored_count = golden
        .tensors
        .keys()
        .filter(|k| prefixes.iter().any(|p| k.starts_with(p.as_str())))
        .count();
    assert_eq!(stored_count, count, "{group}: tensor count");
}

/// Checks wte_rows: sorted, unique, in range, and containing every id of the batch.
fn check_wte_rows(golden: &Golden, vocab_size: usize) -> usize {
    let rows = golden.ints("wte_rows");
    assert!(
        rows.windows(2).all(|w| w[0] < w[1]),
        "wte_rows must be sorted and unique: {rows:?}"
    );
    assert!(
        rows.iter().all(|&r| r >= 0 && (r as usize) < vocab_size),
        "{rows:?}"
    );
    for id in golden.ints("input_ids") {
        assert!(rows.contains(&id), "input id {id} is not among wte_rows");
    }
    rows.len()
}

/// Mean cross-entropy in f64 over the rows of `logits` (N, V) whose target is not ignored.
fn mean_cross_entropy(logits: &[f64], vocab: usize, targets: &[i64]) -> f64 {
    let mut total = 0.0;
    let mut count = 0;
    for (row, &target) in logits.chunks_exact(vocab).zip(targets) {
        if target == IGNORE_INDEX {
            continue;
        }
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
        total += log_sum - row[target as usize];
        count += 1;
    }
    total / count as f64
}

#[test]
fn lm_golden_parses() {
    let golden = Golden::read("tiny_lm_golden.safetensors");
    let config = check_metadata(&golden, "tiny_lm_golden");
    let checkpoint = Gpt2Config::from_file(&fixture("tiny_lm/config.json")).unwrap();
    assert_eq!(config.num_params(), checkpoint.num_params());

    let (batch, seq_len) = (3, 9);
    assert_eq!(golden.shape("input_ids"), [batch, seq_len]);
    assert_eq!(golden.shape("targets"), [batch, seq_len]);
    let ids = golden.ints("input_ids");
    let targets = golden.ints("targets");
    let lengths = golden.ints("lengths");
    assert_eq!(lengths, [9, 5, 1]);
    for b in 0..batch {
        let length = lengths[b] as usize;
        for t in 0..seq_len {
            let (id, target) = (ids[b * seq_len + t], targets[b * seq_len + t]);
            if t < length {
                assert_ne!(
                    id, ENDOFTEXT,
                    "input_ids[{b}, {t}] is <|endoftext|> inside the text"
                );
            } else {
                assert_eq!(id, ENDOFTEXT, "input_ids[{b}, {t}] must be padding");
            }
            let want = if t + 1 < length {
                ids[b * seq_len + t + 1]
            } else {
                IGNORE_INDEX
            };
            assert_eq!(target, want, "targets[{b}, {t}]");
        }
    }

    let real_positions: usize = lengths.iter().map(|&l| l as usize).sum();
    let vocab = config.vocab_size;
    assert_eq!(golden.shape("logits"), [real_positions, vocab]);
    let real_targets: Vec<i64> = (0..batch)
        .flat_map(|b| (0..lengths[b] as usize).map(move |t| b * seq_len + t))
        .map(|i| targets[i])
        .collect();
    let loss = golden.f32s("loss")[0];
    let recomputed = mean_cross_entropy(golden.f32s("logits"), vocab, &real_targets);
    assert!(
        (loss - recomputed).abs() <= 1e-5 * loss.abs(),
        "loss {loss} but the logits give {recomputed}"
    );

    let rows = check_wte_rows(&golden, vocab);
    check_parameter_group(&golden, "grad", &config, HeadKind::LanguageModel, rows);
    check_parameter_group(&golden, "adamw", &config, HeadKind::LanguageModel, rows);
    let losses = golden.f32s("adamw.losses");
    assert_eq!(losses.len(), 3);
    assert_eq!(losses[0], loss, "the first AdamW loss is the golden loss");
    let loss_after = golden.f32s("adamw.loss_after")[0];
    assert!(
        losses[1] < losses[0] && losses[2] < losses[1] && loss_after < losses[2],
        "{losses:?} then {loss_after}"
    );

    let prompt = golden.ints("generate.prompt_ids");
    let output = golden.ints("generate.output_ids");
    assert_eq!(golden.shape("generate.output_ids"), [1, prompt.len() + 8]);
    assert_eq!(
        &output[..prompt.len()],
        prompt.as_slice(),
        "generation starts with the prompt"
    );
}

#[test]
fn cls_golden_parses() {
    let golden = Golden::read("tiny_cls_golden.safetensors");
    let config = check_metadata(&golden, "tiny_cls_golden");
    let head = HeadKind::from_config(&config);
    assert_eq!(head, HeadKind::Classifier { num_labels: 3 });
    let checkpoint = Gpt2Config::from_file(&fixture("tiny_cls/config.json")).unwrap();
    assert_eq!(config.num_params(), checkpoint.num_params());

    let shape = golden.shape("input_ids").to_vec();
    let (batch, seq_len) = (shape[0], shape[1]);
    assert_eq!(batch, 3);
    let ids = golden.ints("input_ids");
    let lengths = golden.ints("lengths");
    for b in 0..batch {
        let length = lengths[b] as usize;
        assert!(length >= 1, "lengths[{b}] = {length}, expected at least 1");
        assert!(
            length <= seq_len,
            "lengths[{b}] = {length}, expected at most {seq_len}"
        );
        for t in 0..seq_len {
            // transformers pools at the last id that is not pad_token_id, so <|endoftext|> may
            // appear only as padding for the golden logits to match pooling at length - 1.
            assert_eq!(
                ids[b * seq_len + t] == ENDOFTEXT,
                t >= length,
                "input_ids[{b}, {t}]"
            );
        }
    }
    let labels = golden.ints("labels");
    assert!(labels.iter().all(|&l| (0..3).contains(&l)), "{labels:?}");

    assert_eq!(golden.shape("logits"), [batch, 3]);
    let logits = golden.f32s("logits");
    let probabilities = golden.f32s("probabilities");
    let mut total = 0.0;
    for b in 0..batch {
        let row = &logits[b * 3..b * 3 + 3];
        let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = row.iter().map(|v| (v - max).exp()).sum();
        for k in 0..3 {
            let want = (row[k] - max).exp() / sum;
            let have = probabilities[b * 3 + k];
            assert!(
                (want - have).abs() <= 1e-6,
                "probabilities[{b}, {k}] = {have}, softmax of logits gives {want}"
            );
        }
        total += sum.ln() + max - row[labels[b] as usize];
    }
    let loss = golden.f32s("loss")[0];
    let recomputed = total / batch as f64;
    assert!(
        (loss - recomputed).abs() <= 1e-5 * loss.abs(),
        "loss {loss} but the logits give {recomputed}"
    );

    let rows = check_wte_rows(&golden, config.vocab_size);
    check_parameter_group(&golden, "grad", &config, head, rows);
    check_parameter_group(&golden, "adamw", &config, head, rows);
    let losses = golden.f32s("adamw.losses");
    assert_eq!(losses.len(), 3);
    assert_eq!(losses[0], loss, "the first AdamW loss is the golden loss");
}

#[test]
fn cls_frozen_gradients_match_full() {
    let golden = Golden::read("tiny_cls_golden.safetensors");
    let config = check_metadata(&golden, "tiny_cls_golden");
    let last = config.n_layer - 1;
    let trainable = |name: &str| {
        name.starts_with(&format!("h.{last}."))
            || name.starts_with("ln_f.")
            || name == "score.weight"
    };
    let head = HeadKind::from_config(&config);
    let mut count = 0;
    for (name, _) in expected_shapes(&config, head) {
        let stored = stored_name(&name, true);
        let frozen = format!("frozen_grad.{stored}");
        if !trainable(&name) {
            assert!(
                !golden.tensors.contains_key(&frozen),
                "{frozen} exists for a frozen parameter"
            );
            continue;
        }
        let full = golden.f32s(&format!("grad.{stored}"));
        let partial = golden.f32s(&frozen);
        assert_eq!(full.len(), partial.len(), "length of {frozen}");
        for (i, (a, b)) in full.iter().zip(partial).enumerate() {
            assert!(
                (a - b).abs() <= 1e-7 + 1e-5 * a.abs(),
                "{stored}[{i}]: full {a}, frozen {b}"
            );
        }
        count += 1;
    }
    // Block 1 has 12 parameters, plus ln_f weight and bias and score.
    assert_eq!(count, 15);
    let stored = golden
        .tensors
        .keys()
        .filter(|k| k.starts_with("frozen_grad."))
        .count();
    assert_eq!(stored, count, "frozen_grad tensor count");
}
