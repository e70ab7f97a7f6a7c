//! `shadertune pretrain` end to end on a tiny config: the loss falls, the output loads as a
//! language model, and a run killed mid-way and resumed ends with bitwise the same weights.

mod common;

use common::{have_adapter, kill_after_checkpoint, shadertune};
use std::path::{Path, PathBuf};

fn corpus() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/corpus/the-verdict.txt"))
}

/// Writes a one-layer GPT config with the GPT-2 vocabulary, 32 channels and 32 positions.
fn tiny_config(dir: &Path) -> PathBuf {
    let path = dir.join("tiny_config.json");
    let config = serde_json::json!({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 50257,
        "n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 32,
        "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn pretrain_args(config: &Path, out: &Path, steps: usize) -> Vec<String> {
    let mut args: Vec<String> = ["pretrain", "--corpus"].iter().map(|s| s.to_string()).collect();
    args.push(corpus().display().to_string());
    args.extend(["--config".to_string(), config.display().to_string(), "--out".to_string(), out.display().to_string()]);
    for (flag, value) in [
        ("--batch-size", "2"),
        ("--max-length", "16"),
        ("--lr", "3e-3"),
        ("--warmup-steps", "2"),
        ("--eval-every", "4"),
        ("--eval-batches", "2"),
        ("--save-every", "1"),
        ("--seed", "5"),
    ] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args.extend(["--steps".to_string(), steps.to_string()]);
    args
}

fn history(out: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("pretrain.json")).expect("pretrain.json written");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["history"].as_array().unwrap().clone()
}

#[test]
fn pretrain_lowers_validation_loss_and_writes_a_language_model() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let out = dir.path().join("run");
    let output = shadertune().args(pretrain_args(&config, &out, 12)).output().unwrap();
    assert!(output.status.success(), "pretrain failed: {}", String::from_utf8_lossy(&output.stderr));
    let records = history(&out);
    let val: Vec<f64> = records.iter().map(|r| r["val_loss"].as_f64().unwrap()).collect();
    assert_eq!(records.len(), 4, "validation at steps 0, 4, 8 and 12 expected: {records:?}");
    // ln(50257) = 10.8: a fresh model starts near uniform, and each pass must improve on it.
    assert!((val[0] - 10.82).abs() < 0.1, "initial validation loss {} expected near ln(50257)", val[0]);
    for pair in val.windows(2) {
        assert!(pair[1] < pair[0], "validation loss rose: {val:?}");
    }
    for name in ["config.json", "model.safetensors", "tokenizer.json", "checkpoint/state.json", "checkpoint/optimizer.safetensors"] {
        assert!(out.join(name).is_file(), "{name} missing from the output");
    }
    let model = shadertune::model::load::open_language_model(&out, 0).expect("the output loads as a language model");
    assert!(!model.random_init);
    assert_eq!(model.config.n_embd, 32);
    assert!(settings(&out)["start_model"].is_null(), "a run from random weights records no starting model");

    // Continuing from the output records where the weights came from.
    let more = dir.path().join("more");
    let mut args = pretrain_args(&config, &more, 1);
    let at = args.iter().position(|a| a == "--config").unwrap();
    args.splice(at..at + 2, ["--model".to_string(), out.display().to_string()]);
    let output = shadertune().args(&args).output().unwrap();
    assert!(output.status.success(), "pretrain --model failed: {}", String::from_utf8_lossy(&output.stderr));
    let start = settings(&more)["start_model"].as_str().map(std::path::PathBuf::from);
    assert_eq!(start, Some(std::path::absolute(&out).unwrap()), "the starting model should be recorded");
}

fn settings(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("pretrain.json")).expect("pretrain.json written");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["settings"].clone()
}

#[test]
fn pretrain_killed_and_resumed_matches_an_uninterrupted_run() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let steps = 10;

    let straight = dir.path().join("straight");
    let output = shadertune().args(pretrain_args(&config, &straight, steps)).output().unwrap();
    assert!(output.status.success(), "pretrain failed: {}", String::from_utf8_lossy(&output.stderr));

    // Kill a second run with SIGKILL once it has checkpointed a few steps.
    let killed = dir.path().join("killed");
    let at = kill_after_checkpoint(&pretrain_args(&config, &killed, steps), &killed, 3);
    assert!(at < steps as u64, "killed after the last step ({at}); the test needs an interrupted run");
    assert!(!killed.join("model.safetensors").exists(), "an interrupted run must not write the final model");

    let output = shadertune().args(["pretrain", "--resume"]).arg(&killed).output().unwrap();
    assert!(output.status.success(), "resume failed: {}", String::from_utf8_lossy(&output.stderr));

    let a = std::fs::read(straight.join("model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("model.safetensors")).unwrap();
    assert!(a == b, "resumed from step {at}: the final weights differ from the uninterrupted run");
}

/// `--resume DIR --redraw-unseen` on a finished run rewrites its final model with the embedding
/// rows of tokens absent from the training text re-drawn, and every other weight unchanged.
#[test]
fn pretrain_resume_redraws_unseen_embeddings() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let out = dir.path().join("run");
    let output = shadertune().args(pretrain_args(&config, &out, 4)).output().unwrap();
    assert!(output.status.success(), "pretrain failed: {}", String::from_utf8_lossy(&output.stderr));
    let before = shadertune::model::load::open_language_model(&out, 0).unwrap().weights;

    let output = shadertune().args(["pretrain", "--resume"]).arg(&out).arg("--redraw-unseen").output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "resume with --redraw-unseen failed: {stderr}");
    assert!(stderr.contains("re-drew the embeddings of"), "no report of the re-drawn rows: {stderr}");
    let after = shadertune::model::load::open_language_model(&out, 0).unwrap().weights;

    let tokenizer = shadertune::data::Gpt2Tokenizer::from_dir(&shadertune::model::load::assets_dir().join("tokenizer")).unwrap();
    let corpus = shadertune::train::pretrain::read_corpus(&[corpus()], &tokenizer, 0.1).unwrap();
    let mut occurs = vec![false; 50257];
    for &t in &corpus.train {
        occurs[t as usize] = true;
    }
    let absent = occurs.iter().filter(|&&o| !o).count();
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("pretrain.json")).unwrap()).unwrap();
    assert_eq!(summary["redrawn"]["tokens"].as_u64(), Some(absent as u64), "{}", summary["redrawn"]);
    assert_eq!(summary["settings"]["redraw_unseen"], serde_json::Value::Bool(true));

    let width = 32;
    let (old, new) = (&before.tensors["wte.weight"].data, &after.tensors["wte.weight"].data);
    for (t, &seen) in occurs.iter().enumerate() {
        let rows = (&old[t * width..(t + 1) * width], &new[t * width..(t + 1) * width]);
        if seen {
            assert_eq!(rows.0, rows.1, "row of token {t}, which occurs in the training text, changed");
        } else {
            assert_ne!(rows.0, rows.1, "row of absent token {t} was not re-drawn");
        }
    }
    for (name, tensor) in &before.tensors {
        if name != "wte.weight" {
            assert_eq!(tensor, &after.tensors[name], "{name} changed");
        }
    }
}

/// A loss that becomes NaN stops the run with an error naming its step, although the losses are
/// read from the device only every few steps, and no final model is written.
#[test]
fn pretrain_stops_on_a_non_finite_loss() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let out = dir.path().join("run");
    let mut args = pretrain_args(&config, &out, 12);
    // AdamW moves every weight by about lr per step, so lr 1e30 sends the logits to infinity
    // after the first step. Without warm-up, the first step takes the full rate.
    let lr = args.iter().position(|a| a == "--lr").unwrap() + 1;
    args[lr] = "1e30".into();
    let warmup = args.iter().position(|a| a == "--warmup-steps").unwrap() + 1;
    args[warmup] = "0".into();
    let output = shadertune().args(&args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "expected exit 1: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("the loss became"), "no non-finite loss error: {stderr}");
    let step: usize = stderr.split("at step ").nth(1).and_then(|rest| rest.split(' ').next()).and_then(|n| n.parse().ok()).expect("the error names the step");
    assert!((2..=4).contains(&step), "the first non-finite loss is expected at step 2 to 4, the error names {step}: {stderr}");
    assert!(!out.join("model.safetensors").exists(), "a failed run must not write the final model");
}

#[test]
fn pretrain_rejects_bad_input_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let config = tiny_config(dir.path());
    let out = dir.path().join("run");

    let bad_utf8 = dir.path().join("latin1.txt");
    std::fs::write(&bad_utf8, b"first line\nsecond line caf\xe9\n").unwrap();
    let output = shadertune()
        .args(["pretrain", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .arg("--corpus")
        .arg(&bad_utf8)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("latin1.txt"), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");
    assert!(stderr.contains("UTF-8"), "{stderr}");

    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "  \n\n").unwrap();
    let output = shadertune().args(["pretrain", "--config"]).arg(&config).arg("--out").arg(&out).arg("--corpus").arg(&empty).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("empty.txt"), "{stderr}");
    assert!(stderr.contains("no text"), "{stderr}");

    let output = shadertune().args(["pretrain", "--resume"]).arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("no checkpoint"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}
