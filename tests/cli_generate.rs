//! `shadertune generate` end to end on the tiny language-model fixture.

mod common;

use common::{have_adapter, shadertune};
use std::path::PathBuf;

fn tiny_lm() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny_lm"))
}

/// Returns the text of the 8 greedy tokens that transformers generated after "Once upon a time".
fn golden_continuation() -> String {
    let fixtures = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"));
    let bytes = std::fs::read(fixtures.join("tiny_lm_golden.safetensors")).expect("golden file reads");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("golden file parses");
    let ids = |key: &str| -> Vec<u32> {
        let view = file.tensor(key).unwrap_or_else(|e| panic!("golden tensor `{key}`: {e}"));
        view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
    };
    let prompt = ids("generate.prompt_ids");
    let output = ids("generate.output_ids");
    let tokenizer = shadertune::data::Gpt2Tokenizer::from_dir(&tiny_lm()).expect("fixture tokenizer loads");
    assert_eq!(tokenizer.encode("Once upon a time"), prompt, "the golden prompt is \"Once upon a time\"");
    tokenizer.decode(&output[prompt.len()..])
}

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn generate(args: &[&str]) -> Output {
    let out = shadertune().arg("generate").arg("--model").arg(tiny_lm()).args(args).output().expect("command runs");
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Greedy decoding prints the prompt, then the text of the tokens that the library generates
/// (checked against transformers in `tests/model_generate.rs`), then a summary on stderr.
#[test]
fn greedy_prints_prompt_then_golden_text() {
    if !have_adapter() {
        return;
    }
    let prompt = "Once upon a time";
    let out = generate(&["--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]);
    assert_eq!(out.code, Some(0), "generate failed:\n{}", out.stderr);
    assert!(out.stdout.starts_with(prompt), "stdout does not start with the prompt: {:?}", out.stdout);
    let want = format!("{prompt}{}\n", golden_continuation());
    assert_eq!(out.stdout, want, "stdout is not the prompt followed by transformers' greedy continuation");
    assert!(out.stderr.contains("8 tokens in"), "no summary on stderr: {}", out.stderr);
    assert!(out.stderr.contains("tokens/s"), "no rate on stderr: {}", out.stderr);

    let again = generate(&["--prompt", prompt, "--max-new-tokens", "8", "--temperature", "0"]);
    assert_eq!(again.stdout, out.stdout, "greedy output changed between two runs");
}

#[test]
fn same_seed_prints_same_text() {
    if !have_adapter() {
        return;
    }
    let args = ["--prompt", "Hello there", "--max-new-tokens", "10", "--temperature", "1", "--top-k", "0", "--seed", "11"];
    let first = generate(&args);
    let second = generate(&args);
    assert_eq!(first.code, Some(0), "generate failed:\n{}", first.stderr);
    assert_eq!(first.stdout, second.stdout, "seed 11 printed different text");
    let mut other_seed = args;
    other_seed[9] = "12";
    let other = generate(&other_seed);
    assert_ne!(first.stdout, other.stdout, "seeds 11 and 12 printed the same text");
}

#[test]
fn long_prompt_stops_at_context_limit() {
    if !have_adapter() {
        return;
    }
    // 60 words of one token each; the fixture's context is 64 tokens.
    let prompt = vec![" the"; 60].concat();
    let out = generate(&["--prompt", &prompt, "--max-new-tokens", "50", "--ignore-eos"]);
    assert_eq!(out.code, Some(0), "generate failed:\n{}", out.stderr);
    assert!(out.stdout.starts_with(&prompt), "stdout does not start with the prompt");
    assert!(out.stderr.contains("4 tokens in"), "expected 64 - 60 = 4 new tokens: {}", out.stderr);
    assert!(out.stderr.contains("context limit of 64 tokens"), "the stop is not reported: {}", out.stderr);
}

#[test]
fn missing_model_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    let out = shadertune().args(["generate", "--prompt", "hi", "--model"]).arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no-such-model"), "the error does not name the path: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn negative_temperature_is_rejected() {
    let out = shadertune().args(["generate", "--prompt", "hi", "--temperature", "-1"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "clap's exit code for an invalid value");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("temperature -1 is invalid"), "the error does not name the value: {stderr}");
}
