//! Helpers shared by the command-line integration tests.
// Each test crate compiles this module and uses only part of it.
#![allow(dead_code)]

use assert_cmd::Command;
use std::path::{Path, PathBuf};

/// Returns true when a GPU adapter exists, else prints why the test is skipped. With
/// `REQUIRE_GPU=1`, a missing adapter fails the test instead.
pub fn have_adapter() -> bool {
    let found = !shadertune::gpu::list_adapters(shadertune::gpu::BackendChoice::Auto).is_empty();
    if !found {
        assert!(std::env::var("REQUIRE_GPU").as_deref() != Ok("1"), "REQUIRE_GPU=1 but no GPU adapter was found");
        eprintln!("skipping: no GPU adapter found");
    }
    found
}

/// Returns the `shadertune` binary with warnings-only logging.
pub fn shadertune() -> Command {
    let mut cmd = Command::cargo_bin("shadertune").expect("binary builds");
    cmd.env("RUST_LOG", "warn");
    cmd
}

/// Writes a GPT-2-shaped config small enough to train in seconds on lavapipe (1 layer, 2 heads,
/// 32 channels, 64 positions), without weights.
pub fn tiny_model(dir: &Path) -> PathBuf {
    tiny_model_of_width(dir, "tiny-model", 32)
}

/// Writes the config of [`tiny_model`] with `n_embd` channels into `dir/name`.
pub fn tiny_model_of_width(dir: &Path, name: &str, n_embd: usize) -> PathBuf {
    let model = dir.join(name);
    std::fs::create_dir_all(&model).unwrap();
    let config = format!(
        r#"{{"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": {n_embd}, "n_positions": 64,
        "vocab_size": 50257, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new"}}"#
    );
    std::fs::write(model.join("config.json"), config).unwrap();
    model
}

/// Writes the first `rows` lines of the bundled SMS Spam Collection to `sms.tsv`.
pub fn sms_sample(dir: &Path, rows: usize) -> PathBuf {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/data/sms_spam/SMSSpamCollection");
    let text = std::fs::read_to_string(source).unwrap();
    let sample: Vec<&str> = text.lines().take(rows).collect();
    let path = dir.join("sms.tsv");
    std::fs::write(&path, sample.join("\n")).unwrap();
    path
}

/// Returns the step of the checkpoint in `out/checkpoint/`, if one is complete.
pub fn checkpoint_step(out: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(out.join("checkpoint/state.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?["step"].as_u64()
}

/// Runs `shadertune` with `args`, kills it with SIGKILL once `out` has a checkpoint at step
/// `step` or later, and returns the step of the checkpoint that survived the kill.
pub fn kill_after_checkpoint(args: &[String], out: &Path, step: u64) -> u64 {
    use std::time::{Duration, Instant};
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("shadertune"))
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while checkpoint_step(out).unwrap_or(0) < step {
        assert!(started.elapsed() < Duration::from_secs(300), "no checkpoint at step {step} within 5 minutes");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be killed");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    checkpoint_step(out).expect("a checkpoint survives the kill")
}
