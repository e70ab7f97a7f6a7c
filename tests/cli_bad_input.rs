//! Bad input on the command line: every broken data file, model directory, checkpoint and output
//! path ends with exit code 1 and one message that names the file, line or tensor and what was
//! expected, never with a panic. Input that only looks unusual (CRLF, a byte-order mark, texts
//! longer than the context) is read correctly instead.
//!
//! `train` and `eval` open the GPU before they read anything, so their tests skip without an
//! adapter (and fail with `REQUIRE_GPU=1`). `predict` opens the model first, so its failures are
//! checked on any machine.

mod common;

use common::{have_adapter, shadertune};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use shadertune::data::Gpt2Tokenizer;
use shadertune::model::config::Gpt2Config;
use shadertune::model::weights::{self, HeadKind};
use std::path::{Path, PathBuf};
use std::process::Output;

/// A GPT-2-shaped config that trains in about a second on lavapipe: one layer, 32 channels,
/// 64 positions and the GPT-2 vocabulary.
const TINY_CONFIG: &str = r#"{"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 32,
    "n_positions": 64, "vocab_size": 50257, "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new"}"#;

/// `n_positions` of [`TINY_CONFIG`], the context length.
const TINY_CONTEXT: usize = 64;

/// Settings that keep each training run short.
const FAST_TRAINING: [&str; 6] = ["--epochs", "1", "--max-length", "24", "--batch-size", "4"];

fn assets() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("assets")
}

/// Writes a model directory that holds only [`TINY_CONFIG`], so `train` starts from random
/// weights.
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("config.json"), TINY_CONFIG).unwrap();
    model
}

/// Writes the first `rows` lines of the bundled SMS Spam Collection to `sms.tsv`.
fn sms_sample(dir: &Path, rows: usize) -> PathBuf {
    let source = assets().join("data/sms_spam/SMSSpamCollection");
    let text = std::fs::read_to_string(source).unwrap();
    let sample: Vec<&str> = text.lines().take(rows).collect();
    let path = dir.join("sms.tsv");
    std::fs::write(&path, sample.join("\n")).unwrap();
    path
}

/// Writes a classifier directory as `shadertune train` leaves it, with random weights: the
/// classifier config (labels ham and spam), `model.safetensors` with `score.weight`, and the
/// bundled tokenizer.
fn classifier_dir(dir: &Path) -> PathBuf {
    let model = dir.join("classifier");
    std::fs::create_dir_all(&model).unwrap();
    let labels = ["ham".to_string(), "spam".to_string()];
    let config = Gpt2Config::from_json_str(TINY_CONFIG).unwrap().to_classifier(&labels).unwrap();
    config.save(&model).unwrap();
    let head = HeadKind::Classifier { num_labels: 2 };
    let initial = weights::init_random(&config, head, 7).unwrap();
    weights::save(&model.join("model.safetensors"), &initial, &config, true).unwrap();
    std::fs::copy(assets().join("tokenizer/tokenizer.json"), model.join("tokenizer.json")).unwrap();
    model
}

/// Writes a language-model directory (config.json and model.safetensors, as downloaded from the
/// Hugging Face hub) with random weights.
fn language_model_dir(dir: &Path) -> PathBuf {
    let model = dir.join("language-model");
    std::fs::create_dir_all(&model).unwrap();
    let config = Gpt2Config::from_json_str(TINY_CONFIG).unwrap();
    config.save(&model).unwrap();
    let initial = weights::init_random(&config, HeadKind::LanguageModel, 7).unwrap();
    weights::save(&model.join("model.safetensors"), &initial, &config, true).unwrap();
    model
}

/// Rewrites one tensor of a safetensors file with another dtype and shape, keeping its bytes.
/// The byte count must still match the new dtype and shape.
fn rewrite_tensor(path: &Path, name: &str, dtype: Dtype, shape: &[usize]) {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert!(file.names().iter().any(|n| *n == name), "{} has no tensor `{name}`", path.display());
    let views: Vec<(String, TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .map(|(stored, view)| {
            if stored == name {
                (stored, TensorView::new(dtype, shape.to_vec(), view.data()).unwrap())
            } else {
                (stored, view)
            }
        })
        .collect();
    let rewritten = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, rewritten).unwrap();
}

/// Runs `shadertune train` on a model and data file with [`FAST_TRAINING`] plus `extra`.
fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    shadertune()
        .arg("train")
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(FAST_TRAINING)
        .args(extra)
        .output()
        .unwrap()
}

/// Runs `shadertune predict` on one text.
fn predict(model: &Path) -> Output {
    shadertune().args(["predict", "--model"]).arg(model).arg("Are we still meeting for lunch?").output().unwrap()
}

/// Checks that a command failed with exit code 1, without a panic, and with an error message
/// that contains every part of `expected`. Returns the message.
///
/// The message is everything from the last line that starts with `error: `, because the binary
/// prints its error last, and graphics drivers may print lines of their own that start the same
/// way (the Vulkan loader's `error: XDG_RUNTIME_DIR is invalid ...`).
fn assert_fails(output: &Output, expected: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "the command panicked:\n{stderr}");
    assert_eq!(output.status.code(), Some(1), "expected exit code 1, stderr:\n{stderr}");
    let start = match stderr.rfind("\nerror: ") {
        Some(newline) => Some(newline + 1),
        None => stderr.starts_with("error: ").then_some(0),
    };
    let Some(start) = start else {
        panic!("no `error: ` line in stderr:\n{stderr}");
    };
    let message = stderr[start..].trim_end().to_string();
    for part in expected {
        assert!(message.contains(part), "the error lacks `{part}`:\n{message}");
    }
    message
}

/// Checks that a command succeeded and returns its `metrics.json`.
fn assert_trained(output: &Output, out: &Path) -> serde_json::Value {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "train failed:\n{stderr}");
    let text = std::fs::read_to_string(out.join("metrics.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Returns how often `part` occurs in `message`.
fn occurrences(message: &str, part: &str) -> usize {
    message.matches(part).count()
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

// ---------------------------------------------------------------------------------------------
// Data files
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_data_file_fails() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("empty.tsv");
    std::fs::write(&data, "").unwrap();
    let output = train(&tiny_model(dir.path()), &data, &dir.path().join("run"), &[]);
    assert_fails(&output, &[&display(&data), "is empty", "expected labelled rows"]);
}

#[test]
fn header_only_csv_fails() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("header.csv");
    std::fs::write(&data, "text,label\n").unwrap();
    let output = train(&tiny_model(dir.path()), &data, &dir.path().join("run"), &[]);
    assert_fails(&output, &[&display(&data), "line 1", "only the header row", "expected data rows"]);
}

#[test]
fn single_label_fails() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("ham.tsv");
    std::fs::write(&data, "ham\tSee you at eight\nham\tOk lar\nham\tOn my way\n").unwrap();
    let output = train(&tiny_model(dir.path()), &data, &dir.path().join("run"), &[]);
    assert_fails(&output, &[&display(&data), "all 3 rows", "`ham`", "line 1", "at least two distinct labels"]);
}

#[test]
fn unknown_text_column_fails() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sms.csv");
    std::fs::write(&data, "text,label\nSee you at eight,ham\nWIN a prize now,spam\n").unwrap();
    let output = train(&tiny_model(dir.path()), &data, &dir.path().join("run"), &["--text-column", "nope"]);
    assert_fails(&output, &[&display(&data), "line 1", "text column `nope` not found", "`text`, `label`"]);
}

#[test]
fn empty_label_value_fails() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sms.csv");
    std::fs::write(&data, "text,label\nSee you at eight,ham\nWIN a prize now,\n").unwrap();
    let output = train(&tiny_model(dir.path()), &data, &dir.path().join("run"), &[]);
    assert_fails(&output, &[&display(&data), "line 3", "the label is empty", "expected a label"]);
}

#[test]
fn tsv_line_without_tab_fails() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sms.tsv");
    std::fs::write(&data, "ham\tSee you at eight\nspam WIN a prize now\nham\tOk lar\n").unwrap();
    let output = train(&tiny_model(dir.path()), &data, &dir.path().join("run"), &[]);
    assert_fails(&output, &[&display(&data), "line 2", "no tab separator", "2 tab-separated fields"]);
}

#[test]
fn invalid_utf8_names_line() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    // Latin-1 bytes of "café", as an editor that does not write UTF-8 saves them.
    let cases: [(&str, &[u8]); 3] = [
        ("latin1.tsv", b"ham\tSee you at eight\nspam\tFree caf\xe9 voucher\n"),
        ("latin1.csv", b"text,label\nSee you at eight,ham\nFree caf\xe9 voucher,spam\n"),
        ("latin1.jsonl", b"{\"text\": \"See you\", \"label\": \"ham\"}\n{\"text\": \"caf\xe9\", \"label\": \"spam\"}\n"),
    ];
    for (name, bytes) in cases {
        let data = dir.path().join(name);
        std::fs::write(&data, bytes).unwrap();
        let expected_line = if name.ends_with(".csv") { "line 3" } else { "line 2" };
        let output = train(&model, &data, &dir.path().join("run"), &[]);
        assert_fails(&output, &[&display(&data), expected_line, "invalid UTF-8", "re-encode the file as UTF-8"]);
    }
}

#[test]
fn maximum_column_index_fails() {
    if !have_adapter() {
        return;
    }
    // The field count for this index overflows, which once ended in an index-out-of-bounds
    // panic.
    let dir = tempfile::tempdir().unwrap();
    let data = sms_sample(dir.path(), 20);
    let index = usize::MAX.to_string();
    let output = train(
        &tiny_model(dir.path()),
        &data,
        &dir.path().join("run"),
        &["--text-column", &index, "--label-column", "0"],
    );
    assert_fails(&output, &[&display(&data), "line 1", &format!("text column index {index} not found"), "indices 0 to 1"]);
}

#[test]
fn missing_data_file_error_is_printed_once() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("missing.tsv");
    let output = train(&tiny_model(dir.path()), &data, &dir.path().join("run"), &[]);
    let message = assert_fails(&output, &[&display(&data), "failed to read"]);
    assert_eq!(occurrences(&message, "No such file or directory"), 1, "the cause is repeated:\n{message}");
}

#[test]
fn long_texts_are_truncated_and_counted() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = Gpt2Tokenizer::from_dir(&assets().join("tokenizer")).unwrap();
    let long_text = "the meeting moved to room four ".repeat(40);
    assert!(tokenizer.encode(&long_text).len() > TINY_CONTEXT, "the long text must exceed the context");

    // 10 rows per label, 5 of each longer than the context, so balancing keeps all 20 rows.
    // The validation and test splits hold 6 rows, so at least 4 long texts land in the
    // training split, whose longest example sets the sequence length.
    let mut lines = Vec::new();
    for label in ["ham", "spam"] {
        for i in 0..10 {
            let text = if i < 5 { long_text.clone() } else { format!("short {label} message number {i}") };
            assert!(i < 5 || tokenizer.encode(&text).len() <= TINY_CONTEXT);
            lines.push(format!("{label}\t{text}"));
        }
    }
    let data = dir.path().join("long.tsv");
    std::fs::write(&data, lines.join("\n")).unwrap();

    // Without --max-length the sequence length is the longest example, capped at the context.
    let out = dir.path().join("run");
    let output = shadertune()
        .arg("train")
        .arg("--model")
        .arg(tiny_model(dir.path()))
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--epochs", "1", "--batch-size", "4"])
        .output()
        .unwrap();
    let metrics = assert_trained(&output, &out);
    let dataset = &metrics["dataset"];
    assert_eq!(dataset["rows"], 20);
    assert_eq!(dataset["rows_after_balancing"], 20);
    assert_eq!(dataset["max_length"], TINY_CONTEXT);
    assert_eq!(dataset["truncated"], 10, "dataset summary: {dataset}");
}

/// Returns `contents` with CRLF line endings and a UTF-8 byte-order mark in front.
fn crlf_with_bom(contents: &str) -> Vec<u8> {
    let mut bytes = b"\xEF\xBB\xBF".to_vec();
    bytes.extend_from_slice(contents.replace('\n', "\r\n").as_bytes());
    bytes
}

#[test]
fn crlf_and_bom_read_like_lf() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mut tsv = String::new();
    let mut csv = String::from("text,label\n");
    for i in 0..8 {
        tsv.push_str(&format!("ham\tSee you at {i} tonight\nspam\tWIN prize number {i} now\n"));
        csv.push_str(&format!("See you at {i} tonight,ham\nWIN prize number {i} now,spam\n"));
    }

    for (extension, lf) in [("tsv", tsv), ("csv", csv)] {
        let mut runs = Vec::new();
        for (variant, bytes) in [("lf", lf.as_bytes().to_vec()), ("crlf_bom", crlf_with_bom(&lf))] {
            let data = dir.path().join(format!("{variant}.{extension}"));
            std::fs::write(&data, bytes).unwrap();
            let out = dir.path().join(format!("run_{variant}_{extension}"));
            let metrics = assert_trained(&train(&model, &data, &out, &[]), &out);
            runs.push((out, metrics));
        }
        let (lf_out, lf_metrics) = &runs[0];
        let (crlf_out, crlf_metrics) = &runs[1];

        assert_eq!(crlf_metrics["dataset"]["rows"], 16, "{extension}");
        assert_eq!(crlf_metrics["dataset"]["rows_per_label"], serde_json::json!({"ham": 8, "spam": 8}), "{extension}");
        assert_eq!(crlf_metrics["test"]["labels"], serde_json::json!(["ham", "spam"]), "{extension}");
        for key in ["rows", "rows_per_label", "split_sizes", "max_length", "truncated"] {
            assert_eq!(crlf_metrics["dataset"][key], lf_metrics["dataset"][key], "{extension} dataset.{key}");
        }
        // The splits hold every text and label as read, so equal files mean equal rows.
        for split in ["train", "validation", "test"] {
            let file = format!("splits/{split}.jsonl");
            let lf_rows = std::fs::read_to_string(lf_out.join(&file)).unwrap();
            let crlf_rows = std::fs::read_to_string(crlf_out.join(&file)).unwrap();
            assert_eq!(crlf_rows, lf_rows, "{extension} {file} differs between LF and CRLF with BOM");
            assert!(!crlf_rows.contains('\u{feff}'), "{extension} {file} kept the byte-order mark");
            assert!(!crlf_rows.contains("\\r"), "{extension} {file} kept a carriage return");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Model directories
// ---------------------------------------------------------------------------------------------

#[test]
fn intact_classifier_predicts() {
    if !have_adapter() {
        return;
    }
    // The directory that the failure tests below damage works before it is damaged.
    let dir = tempfile::tempdir().unwrap();
    let output = predict(&classifier_dir(dir.path()));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "predict failed:\n{stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.starts_with("ham\t") || stdout.starts_with("spam\t"), "no prediction: {stdout}");
}

#[test]
fn predict_without_model_safetensors_fails() {
    let dir = tempfile::tempdir().unwrap();
    let model = classifier_dir(dir.path());
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    assert_fails(&predict(&model), &[&display(&model.join("model.safetensors")), "not found"]);
}

#[test]
fn truncated_model_safetensors_fails() {
    let dir = tempfile::tempdir().unwrap();
    let model = classifier_dir(dir.path());
    let weights_path = model.join("model.safetensors");
    let bytes = std::fs::read(&weights_path).unwrap();
    let half = bytes.len() / 2;
    std::fs::write(&weights_path, &bytes[..half]).unwrap();
    let message = assert_fails(
        &predict(&model),
        &[
            &display(&weights_path),
            &format!("has {half} bytes"),
            &format!("describes {} bytes", bytes.len()),
            "truncated",
            "Download or export it again",
        ],
    );
    assert_eq!(occurrences(&message, "truncated"), 1, "the cause is repeated:\n{message}");
}

#[test]
fn wrong_dtype_tensor_fails() {
    let dir = tempfile::tempdir().unwrap();
    let model = classifier_dir(dir.path());
    let weights_path = model.join("model.safetensors");
    // I32 has 4 bytes per element like F32, so only the dtype changes.
    rewrite_tensor(&weights_path, "transformer.wte.weight", Dtype::I32, &[50257, 32]);
    assert_fails(
        &predict(&model),
        &[&display(&weights_path), "`transformer.wte.weight`", "dtype I32", "expected F32, F16 or BF16"],
    );
}

#[test]
fn wrong_shape_tensor_fails() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = language_model_dir(dir.path());
    let weights_path = model.join("model.safetensors");
    // c_attn stored as (3C, C), as an nn.Linear would store it, instead of Conv1D's (C, 3C).
    rewrite_tensor(&weights_path, "transformer.h.0.attn.c_attn.weight", Dtype::F32, &[96, 32]);
    let data = sms_sample(dir.path(), 40);
    let output = train(&model, &data, &dir.path().join("run"), &[]);
    assert_fails(
        &output,
        &[
            &display(&weights_path),
            "`transformer.h.0.attn.c_attn.weight`",
            "shape (96, 32)",
            "expected (32, 96)",
            "Conv1D weights as (in, out)",
        ],
    );
}

#[test]
fn heads_not_dividing_channels_fails() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let config = TINY_CONFIG.replace("\"n_head\": 2", "\"n_head\": 5");
    std::fs::write(model.join("config.json"), config).unwrap();
    let output = train(&model, &sms_sample(dir.path(), 40), &dir.path().join("run"), &[]);
    assert_fails(
        &output,
        &[&display(&model.join("config.json")), "n_embd = 32 is not divisible by n_head = 5", "set n_head to a divisor of n_embd"],
    );
}

#[test]
fn tokenizer_vocab_mismatch_fails() {
    if !have_adapter() {
        return;
    }
    // A 21-token model beside the 50,257-token GPT-2 tokenizer.
    let dir = tempfile::tempdir().unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf_tiny_gpt2_vocab21");
    let model = dir.path().join("vocab21");
    std::fs::create_dir_all(&model).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture.join(file), model.join(file)).unwrap();
    }
    std::fs::copy(assets().join("tokenizer/tokenizer.json"), model.join("tokenizer.json")).unwrap();
    let output = train(&model, &sms_sample(dir.path(), 40), &dir.path().join("run"), &[]);
    assert_fails(&output, &[&display(&model), "tokenizer has 50257 tokens", "vocab_size 21", "use the tokenizer the model was trained with"]);
}

// ---------------------------------------------------------------------------------------------
// LoRA adapters
// ---------------------------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[test]
fn adapter_for_another_base_model_fails() {
    // The PEFT fixture adapter belongs to a 2-layer model with n_embd 48; this base has one
    // layer of n_embd 2.
    let adapter = fixture("tiny_cls_lora");
    let base = fixture("hf_fake_gpt2");
    let output = shadertune().args(["predict", "--model"]).arg(&base).arg("--adapter").arg(&adapter).arg("Hello there").output().unwrap();
    assert_fails(
        &output,
        &[&display(&adapter.join("adapter_model.safetensors")), "n_embd 48", "another base model", "tests/fixtures/tiny_cls"],
    );
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let output = shadertune().args(["merge", "--model"]).arg(&base).arg("--adapter").arg(&adapter).arg("--out").arg(&out).output().unwrap();
    assert_fails(&output, &["n_embd 48", "another base model"]);
    assert!(!out.join("model.safetensors").exists(), "a failed merge wrote weights");
}

#[test]
fn adapter_without_its_config_fails() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    std::fs::copy(fixture("tiny_cls_lora/adapter_model.safetensors"), adapter.join("adapter_model.safetensors")).unwrap();
    let output = shadertune().args(["predict", "--model"]).arg(fixture("tiny_cls")).arg("--adapter").arg(&adapter).arg("Hello").output().unwrap();
    assert_fails(&output, &[&display(&adapter.join("adapter_config.json")), "No such file"]);
}

// ---------------------------------------------------------------------------------------------
// Checkpoints and output directories
// ---------------------------------------------------------------------------------------------

fn resume(run: &Path) -> Output {
    shadertune().args(["train", "--resume"]).arg(run).output().unwrap()
}

#[test]
fn resume_with_other_model_fails() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = sms_sample(dir.path(), 40);
    let run = dir.path().join("A");
    assert_trained(&train(&model, &data, &run, &["--save-every", "1"]), &run);
    let checkpoint = run.join("checkpoint");
    assert!(checkpoint.join("state.json").is_file(), "the run wrote no checkpoint");

    // The model the run started from now has two layers.
    let two_layers = TINY_CONFIG.replace("\"n_layer\": 1", "\"n_layer\": 2");
    std::fs::write(model.join("config.json"), &two_layers).unwrap();
    assert_fails(
        &resume(&run),
        &[&display(&checkpoint), "checkpoint is for a model with 1 layers", "this run's model has 2 layers", "resume with the model the run started from"],
    );
    std::fs::write(model.join("config.json"), TINY_CONFIG).unwrap();

    // The checkpoint's own config now disagrees with the weights stored beside it.
    let checkpoint_config = checkpoint.join("config.json");
    let original = std::fs::read_to_string(&checkpoint_config).unwrap();
    let wider = original.replace("\"n_embd\": 32", "\"n_embd\": 64");
    assert_ne!(wider, original, "the checkpoint config has no `\"n_embd\": 32`");
    std::fs::write(&checkpoint_config, wider).unwrap();
    assert_fails(
        &resume(&run),
        &[&display(&checkpoint.join("model.safetensors")), "`score.weight`", "shape (2, 32)", "expected (2, 64)"],
    );
    std::fs::write(&checkpoint_config, original).unwrap();

    // With both restored, the same checkpoint resumes.
    let output = resume(&run);
    assert!(output.status.success(), "resume failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn unwritable_out_dir_fails_fast() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("some_file.txt");
    std::fs::write(&blocker, "a regular file, not a directory").unwrap();
    let out = blocker.join("run");
    let output = shadertune()
        .env("RUST_LOG", "info")
        .arg("train")
        .arg("--model")
        .arg(tiny_model(dir.path()))
        .arg("--data")
        .arg(sms_sample(dir.path(), 40))
        .arg("--out")
        .arg(&out)
        .args(FAST_TRAINING)
        .output()
        .unwrap();
    let message = assert_fails(&output, &[&display(&out), "failed to write", "choose another --out"]);
    assert!(!message.contains("\n"), "expected one error line, found:\n{message}");
    // Every log line of the training itself (data, split, model, steps) comes from the trainer
    // module, and none may appear before the output directory is checked.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("shadertune::train::classifier"), "training started before the check:\n{stderr}");
    assert!(!out.exists());
}
