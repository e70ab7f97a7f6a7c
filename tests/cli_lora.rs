//! LoRA from the command line. Training writes a PEFT adapter and a merged model that agree, and
//! `merge` reproduces PEFT's merge of a PEFT adapter. A killed LoRA run with dropout resumes to an
//! identical adapter, and wrong LoRA settings fail with a clear message.

mod common;

use common::{have_adapter, kill_after_checkpoint, shadertune, sms_sample, tiny_model_of_width};
use shadertune::model::config::Gpt2Config;
use shadertune::model::weights::{self, HeadKind, LoadOptions};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn lora_train_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["train", "--model"].iter().map(|s| s.to_string()).collect();
    args.push(fixture("tiny_lm").display().to_string());
    args.extend(["--data".into(), data.display().to_string(), "--out".into(), out.display().to_string()]);
    for (flag, value) in [("--epochs", "1"), ("--batch-size", "4"), ("--max-length", "24"), ("--eval-every", "100"), ("--lora-rank", "4")] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn predict_json(args: &[&str]) -> serde_json::Value {
    let output = shadertune().arg("predict").args(args).arg("--json").output().unwrap();
    assert!(output.status.success(), "predict {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).expect("predict --json prints JSON")
}

#[test]
fn lora_train_adapter_matches_merged_model() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = sms_sample(dir.path(), 120);
    let out = dir.path().join("run");
    let output = shadertune().args(lora_train_args(&data, &out, &["--lora-targets", "c_attn,mlp.c_proj"])).output().unwrap();
    assert!(output.status.success(), "LoRA train failed: {}", String::from_utf8_lossy(&output.stderr));

    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap()).unwrap();
    for (key, want) in [
        ("peft_type", serde_json::json!("LORA")),
        ("task_type", serde_json::json!("SEQ_CLS")),
        ("r", serde_json::json!(4)),
        ("lora_alpha", serde_json::json!(8.0)),
        ("fan_in_fan_out", serde_json::json!(true)),
        ("modules_to_save", serde_json::json!(["score"])),
        ("target_modules", serde_json::json!(["c_attn", "mlp.c_proj"])),
    ] {
        assert_eq!(config[key], want, "adapter_config.json `{key}`");
    }
    let bytes = std::fs::read(out.join("adapter/adapter_model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = file.names().into_iter().map(String::from).collect();
    names.sort();
    let mut want = vec!["base_model.model.score.weight".to_string()];
    for i in 0..2 {
        for m in ["attn.c_attn", "mlp.c_proj"] {
            for ab in ["A", "B"] {
                want.push(format!("base_model.model.transformer.h.{i}.{m}.lora_{ab}.weight"));
            }
        }
    }
    want.sort();
    assert_eq!(names, want, "adapter tensor names");
    let a = file.tensor("base_model.model.transformer.h.0.mlp.c_proj.lora_A.weight").unwrap();
    assert_eq!(a.shape(), [4, 192], "lora_A of mlp.c_proj is (r, n_inner)");

    // The merged model changes only the targeted weights and the head.
    let base_config = Gpt2Config::from_file(&fixture("tiny_lm/config.json")).unwrap();
    let base = weights::load(&fixture("tiny_lm/model.safetensors"), &base_config, HeadKind::LanguageModel, LoadOptions::default()).unwrap();
    let merged_config = Gpt2Config::from_file(&out.join("model/config.json")).unwrap();
    let head = HeadKind::Classifier { num_labels: 2 };
    let merged = weights::load(&out.join("model/model.safetensors"), &merged_config, head, LoadOptions::default()).unwrap();
    for (name, tensor) in &base.tensors {
        let changed = merged.get(name).unwrap() != tensor;
        let targeted = name.ends_with("attn.c_attn.weight") || name.ends_with("mlp.c_proj.weight");
        assert_eq!(changed, targeted, "`{name}`: changed {changed}, targeted {targeted}");
    }

    // The base model with the adapter predicts what the merged model predicts.
    let text = "WINNER! Claim your free prize now";
    let with_adapter = predict_json(&["--model", &fixture("tiny_lm").display().to_string(), "--adapter", &out.join("adapter").display().to_string(), text]);
    let plain = predict_json(&["--model", &out.join("model").display().to_string(), text]);
    assert_eq!(with_adapter[0]["label"], plain[0]["label"]);
    for label in ["ham", "spam"] {
        let p = with_adapter[0]["probabilities"][label].as_f64().unwrap();
        let q = plain[0]["probabilities"][label].as_f64().unwrap();
        assert!((p - q).abs() < 1e-5, "P({label}) with the adapter {p}, merged {q}");
    }
}

#[test]
fn merge_peft_adapter_matches_peft() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let output = shadertune()
        .args(["merge", "--model"])
        .arg(fixture("tiny_cls"))
        .arg("--adapter")
        .arg(fixture("tiny_cls_lora"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(output.status.success(), "merge failed: {}", String::from_utf8_lossy(&output.stderr));
    let config = Gpt2Config::from_file(&out.join("config.json")).unwrap();
    let merged = weights::load(&out.join("model.safetensors"), &config, HeadKind::Classifier { num_labels: 3 }, LoadOptions::default()).unwrap();
    let bytes = std::fs::read(fixture("tiny_cls_lora_golden.safetensors")).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut compared = 0;
    for (key, view) in golden.tensors() {
        let Some(name) = key.strip_prefix("merged.") else { continue };
        let want: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let got = &merged.get(name).unwrap_or_else(|| panic!("merged model lacks `{name}`")).data;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() <= 1e-6 + 1e-5 * w.abs(), "`{name}`[{i}]: merged here {g}, by PEFT {w}");
        }
        compared += 1;
    }
    assert_eq!(compared, 9, "8 merged Conv1D weights and the head");
}

#[test]
fn lora_dropout_resume_is_bitwise() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = sms_sample(dir.path(), 400);
    let extra = ["--lora-dropout", "0.2", "--save-every", "1"];
    let straight = dir.path().join("straight");
    let output = shadertune().args(lora_train_args(&data, &straight, &extra)).output().unwrap();
    assert!(output.status.success(), "train failed: {}", String::from_utf8_lossy(&output.stderr));

    let killed = dir.path().join("killed");
    let at = kill_after_checkpoint(&lora_train_args(&data, &killed, &extra), &killed, 5);
    assert!(killed.join("checkpoint/adapter_model.safetensors").is_file(), "a LoRA checkpoint holds the adapter");
    assert!(!killed.join("checkpoint/model.safetensors").exists(), "a LoRA checkpoint does not copy the frozen base");
    assert!(!killed.join("adapter").exists(), "killed at step {at}, after the run finished; the test needs an interrupted run");

    let output = shadertune().args(["train", "--resume"]).arg(&killed).output().unwrap();
    assert!(output.status.success(), "resume failed: {}", String::from_utf8_lossy(&output.stderr));
    let a = std::fs::read(straight.join("adapter/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("adapter/adapter_model.safetensors")).unwrap();
    assert!(a == b, "resumed from step {at}: the final adapter differs from the uninterrupted run");
}

#[test]
fn lora_bad_settings_fail() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = sms_sample(dir.path(), 40);
    let out = dir.path().join("run");
    for (extra, needles) in [
        (vec!["--train", "all"], vec!["--train all", "LoRA", "drop --train"]),
        (vec!["--lora-targets", "c_attn,q_proj"], vec!["`q_proj`", "c_fc"]),
        (vec!["--lora-dropout", "1.5"], vec!["--lora-dropout 1.5", "0 <= P < 1"]),
    ] {
        let output = shadertune().args(lora_train_args(&data, &out, &extra)).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{extra:?} should fail with exit 1: {stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{extra:?}: expected `{needle}` in: {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{extra:?} panicked: {stderr}");
    }
}

#[test]
fn qlora_trains_and_rejects_bad_shapes() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = sms_sample(dir.path(), 120);
    let out = dir.path().join("qlora");
    let mut args = lora_train_args(&data, &out, &["--quantize", "nf4", "--lr", "3e-3"]);
    let model_at = args.iter().position(|a| a == "--model").unwrap() + 1;
    // NF4 needs linear layers whose width is a multiple of 64.
    args[model_at] = tiny_model_of_width(dir.path(), "nf4-model", 64).display().to_string();
    let output = shadertune().args(&args).output().unwrap();
    assert!(output.status.success(), "QLoRA train failed: {}", String::from_utf8_lossy(&output.stderr));
    let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["run"]["train"].as_str().unwrap().starts_with("qlora nf4 r=4"), "run summary: {}", metrics["run"]);
    assert!(out.join("adapter/adapter_model.safetensors").is_file(), "no adapter written");
    let merged = out.join("model");
    let predictions = predict_json(&["--model", &merged.display().to_string(), "Call now to claim your prize"]);
    assert!(predictions[0]["label"].is_string(), "predict on the merged QLoRA model: {predictions}");

    // The 1-layer tiny fixture has n_embd 48, which is no multiple of NF4's 64-value blocks.
    let output = shadertune().args(lora_train_args(&data, &dir.path().join("bad"), &["--quantize", "nf4"])).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for needle in ["--quantize nf4", "(48, 144)", "multiple of 64"] {
        assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    }
}

#[test]
fn f16_precision_train_and_errors() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = sms_sample(dir.path(), 120);
    // LoRA keeps the block's four linear weights frozen, so f16 stores them, and the adapters'
    // gradients flow back through them (the input-gradient kernel runs too).
    let run = |precision: &str| {
        let out = dir.path().join(precision);
        let output = shadertune().args(lora_train_args(&data, &out, &["--precision", precision, "--lr", "3e-3"])).output().unwrap();
        assert!(output.status.success(), "--precision {precision} failed: {}", String::from_utf8_lossy(&output.stderr));
        let metrics: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
        assert_eq!(metrics["run"]["precision"], precision, "run summary: {}", metrics["run"]);
        metrics
    };
    let (full, half) = (run("f32"), run("f16"));
    // Rounding the frozen weights to f16 moves each by about 2^-11 of itself or less, so the
    // training follows nearly the same path: close losses, not equal ones.
    let loss = |m: &serde_json::Value| m["test"]["loss"].as_f64().unwrap();
    let (full_loss, half_loss) = (loss(&full), loss(&half));
    assert!((full_loss - half_loss).abs() <= 1e-3 * full_loss.abs().max(1.0), "test loss f32 {full_loss}, f16 {half_loss}");
    assert_ne!(full_loss, half_loss, "f16 storage changed nothing: was it used?");
    assert_eq!(full["test"]["confusion_matrix"], half["test"]["confusion_matrix"], "f16 changed a test prediction");

    // predict and eval store the trained model's block weights in f16 with the same option.
    let model = dir.path().join("f32").join("model");
    let model_arg = model.display().to_string();
    let probabilities = |precision: &str| -> Vec<f64> {
        let json = predict_json(&["--model", &model_arg, "--precision", precision, "WINNER!! Claim your prize now", "Are we still meeting for lunch?"]);
        json.as_array().unwrap().iter().flat_map(|p| p["probabilities"].as_object().unwrap().values().map(|v| v.as_f64().unwrap())).collect()
    };
    let (full_probs, half_probs) = (probabilities("f32"), probabilities("f16"));
    assert_eq!(full_probs.len(), 4);
    for (a, b) in full_probs.iter().zip(&half_probs) {
        assert!((a - b).abs() <= 1e-3, "predict probabilities f32 {full_probs:?}, f16 {half_probs:?}");
    }
    assert_ne!(full_probs, half_probs, "predict --precision f16 changed nothing: was it used?");
    let eval = |precision: &str| -> serde_json::Value {
        let out = dir.path().join(format!("eval-{precision}"));
        let output = shadertune()
            .args(["eval", "--model", &model_arg, "--max-length", "24", "--precision", precision, "--data"])
            .arg(dir.path().join("f32/splits/test.jsonl"))
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        assert!(output.status.success(), "eval --precision {precision} failed: {}", String::from_utf8_lossy(&output.stderr));
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap()
    };
    let (full_eval, half_eval) = (eval("f32"), eval("f16"));
    assert_eq!(half_eval["run"]["precision"], "f16", "eval run summary: {}", half_eval["run"]);
    assert_eq!(full_eval["test"]["confusion_matrix"], half_eval["test"]["confusion_matrix"], "eval --precision f16 changed a prediction");
    let (full_loss, half_loss) = (loss(&full_eval), loss(&half_eval));
    assert!((full_loss - half_loss).abs() <= 1e-3 * full_loss.abs().max(1.0), "eval test loss f32 {full_loss}, f16 {half_loss}");

    let output = shadertune().args(lora_train_args(&data, &dir.path().join("both"), &["--quantize", "nf4", "--precision", "f16"])).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for needle in ["--precision f16", "--quantize"] {
        assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    }
    let mut args = lora_train_args(&data, &dir.path().join("narrow"), &["--precision", "f16"]);
    let model_at = args.iter().position(|a| a == "--model").unwrap() + 1;
    args[model_at] = tiny_model_of_width(dir.path(), "width-20", 20).display().to_string();
    let output = shadertune().args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    for needle in ["--precision f16", "n_embd is 20", "--precision f32"] {
        assert!(stderr.contains(needle), "expected `{needle}` in: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}
