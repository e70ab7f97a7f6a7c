//! The command-line tool end to end on lavapipe: devices, plan, and a tiny train / predict /
//! eval run of the main job.

mod common;

use common::{have_adapter, shadertune, tiny_model, sms_sample};
use assert_cmd::Command;

fn json_output(cmd: &mut Command) -> serde_json::Value {
    let out = cmd.output().expect("command runs");
    assert!(
        out.status.success(),
        "command failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

#[test]
fn devices_lists_an_adapter() {
    if !have_adapter() {
        return;
    }
    let v = json_output(shadertune().args(["devices", "--json"]));
    let list = v.as_array().expect("a JSON array");
    assert!(!list.is_empty());
    for key in ["name", "backend", "device_type", "driver", "max_storage_buffer_binding_size", "features"] {
        assert!(list[0].get(key).is_some(), "adapter entry lacks `{key}`: {}", list[0]);
    }
}

#[test]
fn plan_last_block_backward_is_under_a_fifth() {
    let plan = |train: &str| json_output(shadertune().args(["plan", "--config", "small", "--train", train, "--json"]));
    let last = plan("last-blocks:1");
    let all = plan("all");
    for key in ["forward_dispatches", "backward_dispatches", "forward_flops", "backward_flops", "trainable_params", "frozen_params", "peak_bytes"] {
        assert!(last.get(key).is_some(), "plan JSON lacks `{key}`");
    }
    let flops = |v: &serde_json::Value| v["backward_flops"].as_u64().unwrap();
    assert!(flops(&last) * 5 < flops(&all), "last-blocks:1 {} vs all {}", flops(&last), flops(&all));
    let total = last["trainable_params"].as_u64().unwrap() + last["frozen_params"].as_u64().unwrap();
    // GPT-2 small: 124,439,808 parameters plus a 2 x 768 head.
    assert_eq!(total, 124_439_808 + 2 * 768);
}

/// `--precision f16` halves the bytes of the 44 frozen linear weights of GPT-2 small (11 blocks
/// of 4 with the last block trainable) and leaves every count unchanged.
#[test]
fn plan_f16_halves_frozen_linear_weights() {
    let plan = |precision: &str| json_output(shadertune().args(["plan", "--config", "small", "--precision", precision, "--json"]));
    let (full, half) = (plan("f32"), plan("f16"));
    for key in ["trainable_params", "frozen_params", "forward_dispatches", "backward_dispatches", "forward_flops"] {
        assert_eq!(full[key], half[key], "`{key}` changed with f16");
    }
    // Each block's c_attn, attn.c_proj, c_fc and mlp.c_proj weights hold 12 x 768^2 values.
    let frozen_linear = 11 * 12 * 768 * 768;
    let bytes = |v: &serde_json::Value| v["param_bytes"].as_u64().unwrap();
    assert_eq!(bytes(&full) - bytes(&half), 2 * frozen_linear, "f32 {} and f16 {} parameter bytes", bytes(&full), bytes(&half));

    let text = shadertune().args(["plan", "--config", "small", "--precision", "f16"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("f16 frozen weights: 326.2 MiB of parameters instead of 474.7 MiB in f32"), "{stdout}");
    let out = shadertune().args(["plan", "--config", "small", "--precision", "bf16"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected f32 or f16"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn plan_rejects_bad_trainable_set() {
    let out = shadertune().args(["plan", "--config", "small", "--train", "last-blocks:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("last-blocks:N"));
}

#[test]
fn train_predict_eval_end_to_end() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = sms_sample(dir.path(), 400);
    let out = dir.path().join("run");
    let status = shadertune()
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(["--epochs", "1", "--max-length", "32", "--lr", "1e-3", "--eval-every", "5", "--eval-batches", "2"])
        .output()
        .unwrap();
    assert!(status.status.success(), "train failed:\n{}", String::from_utf8_lossy(&status.stderr));
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("confusion matrix"), "no confusion matrix in the output:\n{stdout}");

    for file in ["metrics.json", "history.jsonl", "loss.png", "accuracy.png", "confusion_matrix.png", "model/config.json", "model/model.safetensors"] {
        assert!(out.join(file).is_file(), "{file} was not written");
    }
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    for split in ["train", "validation", "test"] {
        for key in ["accuracy", "loss", "labels", "confusion_matrix", "per_label"] {
            assert!(metrics[split].get(key).is_some(), "metrics.json {split} lacks `{key}`");
        }
    }
    assert_eq!(metrics["test"]["labels"], serde_json::json!(["ham", "spam"]));
    for key in ["rows", "rows_per_label", "rows_after_balancing", "split_sizes", "max_length", "truncated"] {
        assert!(metrics["dataset"].get(key).is_some(), "metrics.json dataset lacks `{key}`");
    }
    assert_eq!(metrics["dataset"]["rows"], 400);
    assert_eq!(metrics["dataset"]["max_length"], 32);
    let test_total: u64 = metrics["test"]["confusion_matrix"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert_eq!(test_total, metrics["dataset"]["split_sizes"]["test"].as_u64().unwrap());

    // The written classifier loads again and predicts the same way twice.
    let texts = ["Free entry! Text WIN to 80086 now", "Are we still meeting for lunch?"];
    let predict = || json_output(shadertune().args(["predict", "--json", "--model"]).arg(out.join("model")).args(texts));
    let first = predict();
    assert_eq!(first, predict());
    for p in first.as_array().unwrap() {
        let probs = p["probabilities"].as_object().unwrap();
        let sum: f64 = probs.values().map(|v| v.as_f64().unwrap()).sum();
        assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
        assert!(probs.contains_key(p["label"].as_str().unwrap()));
    }

    // The written classifier, evaluated on the test split the run wrote, reproduces the run's
    // own test confusion matrix: loading it again changes no prediction.
    let eval_out = dir.path().join("eval");
    let status = shadertune()
        .args(["eval", "--model"])
        .arg(out.join("model"))
        .arg("--data")
        .arg(out.join("splits/test.jsonl"))
        .args(["--max-length", "32", "--out"])
        .arg(&eval_out)
        .output()
        .unwrap();
    assert!(status.status.success(), "eval failed:\n{}", String::from_utf8_lossy(&status.stderr));
    let eval: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(eval_out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(eval["test"]["confusion_matrix"], metrics["test"]["confusion_matrix"]);
    assert_eq!(eval["test"]["accuracy"], metrics["test"]["accuracy"]);
}

#[test]
fn train_reports_missing_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = shadertune()
        .args(["train", "--data"])
        .arg(dir.path().join("missing.tsv"))
        .arg("--out")
        .arg(dir.path().join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("missing.tsv"), "error does not name the file: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn train_rejects_a_plan_over_the_binding_limit_before_training() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("many-heads");
    std::fs::create_dir_all(&model).unwrap();
    let config = r#"{"model_type": "gpt2", "n_layer": 1, "n_head": 16, "n_embd": 32, "n_positions": 1024,
        "vocab_size": 50257, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}"#;
    std::fs::write(model.join("config.json"), config).unwrap();
    let data = sms_sample(dir.path(), 400);
    // Attention probabilities of 256 sequences x 16 heads x T x T floats exceed any storage
    // binding limit once T reaches the longest SMS (over 100 tokens): 256 * 16 * 100^2 * 4 bytes = 164 MB.
    let out = shadertune()
        .args(["train", "--model"])
        .arg(&model)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(dir.path().join("run"))
        .args(["--balance", "none", "--batch-size", "256", "--max-length", "1024"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an oversized plan must fail");
    assert!(stderr.contains("attn.probs"), "{stderr}");
    assert!(stderr.contains("storage binding limit"), "{stderr}");
    assert!(stderr.contains("reduce --batch-size or --max-length"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(!dir.path().join("run/history.jsonl").exists(), "training started before the plan was checked");
}
