//! Fine-tuning survives interruption: a run killed with SIGKILL and resumed ends with the same
//! weights as one that ran straight through, and a NaN loss stops with a checkpoint of the last
//! good state (or is skipped on request).

mod common;

use common::{checkpoint_step, have_adapter, kill_after_checkpoint, shadertune, sms_sample, tiny_model};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn train_args(model: &Path, data: &Path, out: &Path, lr: &str) -> Vec<String> {
    let mut args = vec!["train".to_string(), "--model".into(), model.display().to_string(), "--data".into(), data.display().to_string()];
    args.extend(["--out".into(), out.display().to_string()]);
    for (flag, value) in [("--epochs", "2"), ("--batch-size", "4"), ("--max-length", "24"), ("--lr", lr), ("--eval-every", "100"), ("--save-every", "1")] {
        args.extend([flag.to_string(), value.to_string()]);
    }
    args
}

/// Writes the tiny model and 300 SMS rows into `dir` and trains on them without interruption
/// into `dir/straight`. Returns the model, the data and the finished run's directory.
fn uninterrupted_run(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let model = tiny_model(dir);
    let data = sms_sample(dir, 300);
    let straight = dir.join("straight");
    let output = shadertune().args(train_args(&model, &data, &straight, "1e-3")).output().unwrap();
    assert!(output.status.success(), "train failed: {}", String::from_utf8_lossy(&output.stderr));
    (model, data, straight)
}

#[test]
fn train_killed_and_resumed_matches_an_uninterrupted_run() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (model, data, straight) = uninterrupted_run(dir.path());

    let killed = dir.path().join("killed");
    let at = kill_after_checkpoint(&train_args(&model, &data, &killed, "1e-3"), &killed, 5);
    assert!(!killed.join("model/model.safetensors").exists(), "killed at step {at}, after the run finished; the test needs an interrupted run");

    let output = shadertune().args(["train", "--resume"]).arg(&killed).output().unwrap();
    assert!(output.status.success(), "resume failed: {}", String::from_utf8_lossy(&output.stderr));
    let a = std::fs::read(straight.join("model/model.safetensors")).unwrap();
    let b = std::fs::read(killed.join("model/model.safetensors")).unwrap();
    assert!(a == b, "resumed from step {at}: the final weights differ from the uninterrupted run");
    let metrics = |d: &Path| std::fs::read_to_string(d.join("metrics.json")).unwrap();
    let test_of = |text: String| serde_json::from_str::<serde_json::Value>(&text).unwrap()["test"].clone();
    assert_eq!(test_of(metrics(&straight)), test_of(metrics(&killed)), "the resumed run's test metrics differ");
}

#[test]
fn nan_loss_stops_with_a_checkpoint_or_is_skipped() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = sms_sample(dir.path(), 120);

    // On a CPU driver the host reads each step's loss. The variable makes it read them in tens,
    // as on a GPU, where the device runs ahead of the host.
    for every in ["1", "10"] {
        check_nan_policies(&model, &data, &dir.path().join(format!("every-{every}")), every);
    }
}

/// Trains with lr 1e30 and the losses read every `read_every` steps: AdamW moves every weight by
/// about lr per step, so the logits reach infinity after the first step and the loss is NaN.
/// Checkpoints are written only at the end or at the stop, since each one reads the losses first.
fn check_nan_policies(model: &Path, data: &Path, dir: &Path, read_every: &str) {
    let args = |out: &Path| {
        let mut args = train_args(model, data, out, "1e30");
        let at = args.iter().position(|a| a == "--save-every").unwrap();
        args[at + 1] = "0".into();
        args
    };
    let out = dir.join("stop");
    let output = shadertune().env("SHADERTUNE_LOSS_READ_EVERY", read_every).args(args(&out)).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "a NaN loss must fail the run");
    assert!(stderr.contains("the training loss became"), "{stderr}");
    assert!(stderr.contains("last finite loss"), "{stderr}");
    assert!(stderr.contains("checkpoint of the last good state"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let at = checkpoint_step(&out).expect("a checkpoint of the last good state");
    let nan_step: u64 = stderr.split("at step ").nth(1).and_then(|rest| rest.split(' ').next()).and_then(|n| n.parse().ok()).expect("the error names the step");
    // The checkpoint is of the step at which the host read the NaN, whose update was skipped.
    if read_every == "1" {
        assert_eq!(at, nan_step, "read every step: the checkpoint is of the NaN's step");
    } else {
        assert!(at > nan_step, "read every {read_every} steps: the NaN of step {nan_step} is found at a later read, not at step {at}");
    }
    assert!(stderr.contains(&format!("a resumed run goes on with step {}", at + 1)), "{stderr}");
    let weights = std::fs::read(out.join("checkpoint/model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&weights).unwrap();
    for (name, view) in file.tensors() {
        let finite = view.data().chunks_exact(4).all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite());
        assert!(finite, "checkpoint at step {at}: `{name}` holds non-finite values");
    }

    let out = dir.join("skip");
    let mut args = args(&out);
    args.extend(["--on-nan".to_string(), "skip".to_string()]);
    let output = shadertune().env("SHADERTUNE_LOSS_READ_EVERY", read_every).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "--on-nan skip must finish: {stderr}");
    assert!(stderr.contains("skipping a batch"), "{stderr}");
    // Skipped updates do not count towards AdamW's t, which the checkpoint stores beside the step.
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("checkpoint/state.json")).unwrap()).unwrap();
    let (step, applied) = (state["step"].as_u64().unwrap(), state["applied_steps"].as_u64());
    assert!(applied.is_some_and(|t| t < step), "step {step}, applied steps {applied:?}: the skipped updates must not count");
}

#[cfg(unix)]
#[test]
fn ctrl_c_stops_with_a_checkpoint_and_says_how_to_resume() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = sms_sample(dir.path(), 300);
    let out = dir.path().join("run");
    let mut args = train_args(&model, &data, &out, "1e-3");
    // Checkpoints only at the end, so that the one found afterwards comes from the interruption.
    let at = args.iter().position(|a| a == "--save-every").unwrap();
    args[at + 1] = "0".into();
    let at = args.iter().position(|a| a == "--epochs").unwrap();
    args[at + 1] = "20".into();
    let mut child = std::process::Command::new(assert_cmd::cargo::cargo_bin("shadertune"))
        .args(&args)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until training runs (the first periodic evaluation is logged), then press Ctrl-C.
    let started = Instant::now();
    while !out.join("splits/test.jsonl").exists() {
        assert!(started.elapsed() < Duration::from_secs(300), "the run did not start within 5 minutes");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it could be interrupted");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    let status = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success(), "kill -INT failed");
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "an interrupted run must not report success");
    assert!(stderr.contains("stopped at step"), "{stderr}");
    assert!(stderr.contains("shadertune train --resume"), "{stderr}");
    let step = checkpoint_step(&out).expect("Ctrl-C writes a checkpoint");
    assert!(step < 20 * 300 / 4, "the run finished ({step} steps) before Ctrl-C");
    assert!(!out.join("model/model.safetensors").exists(), "an interrupted run must not write the final model");
}

#[test]
fn device_faults_keep_the_last_checkpoint() {
    if !have_adapter() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (model, data, straight) = uninterrupted_run(dir.path());

    for (fault, needle) in [("device-lost@4", "device was lost"), ("out-of-memory@6", "out of memory")] {
        let out = dir.path().join(fault.replace('@', "-"));
        let output = shadertune().env("SHADERTUNE_FAULT", fault).args(train_args(&model, &data, &out, "1e-3")).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{fault}: expected exit 1: {stderr}");
        assert!(!stderr.contains("panicked"), "{fault} panicked: {stderr}");
        assert!(stderr.contains(needle), "{fault}: expected `{needle}` in: {stderr}");
        assert!(stderr.contains("train --resume"), "{fault}: no resume hint in: {stderr}");
        let at: u64 = fault.split('@').nth(1).unwrap().parse().unwrap();
        assert_eq!(checkpoint_step(&out), Some(at), "{fault}: the checkpoint of the last good step is not intact");

        // The checkpoint continues to the weights of the uninterrupted run.
        let output = shadertune().args(["train", "--resume"]).arg(&out).output().unwrap();
        assert!(output.status.success(), "{fault}: resume failed: {}", String::from_utf8_lossy(&output.stderr));
        let a = std::fs::read(straight.join("model/model.safetensors")).unwrap();
        let b = std::fs::read(out.join("model/model.safetensors")).unwrap();
        assert!(a == b, "{fault}: the resumed weights differ from the uninterrupted run");
    }
}
