//! Text generation with the key/value cache on the tiny language-model fixture: greedy parity
//! with transformers' `generate`, seeded sampling and the stop conditions.

use shadertune::generate::{GenerateError, GenerateOptions, Generation, Generator, SamplingSettings, StopReason};
use shadertune::gpu::{Gpu, GpuOptions};
use shadertune::model::load::{open_language_model, LoadedModel};
use std::path::PathBuf;
use std::sync::OnceLock;

/// `<|endoftext|>`, which transformers' `generate` stops at for GPT-2 (`eos_token_id`).
const ENDOFTEXT: u32 = 50256;

/// Returns the device shared by the tests of this file, or `None` after printing why. With
/// `REQUIRE_GPU=1`, a missing adapter fails the test instead.
fn gpu() -> Option<&'static Gpu> {
    static GPU: OnceLock<Option<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| match Gpu::new(&GpuOptions::default()) {
        Ok(gpu) => Some(gpu),
        Err(e) => {
            assert!(std::env::var("REQUIRE_GPU").as_deref() != Ok("1"), "REQUIRE_GPU=1 but no device could be opened: {e}");
            eprintln!("skipping: {e}");
            None
        }
    })
    .as_ref()
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn tiny_lm() -> LoadedModel {
    open_language_model(&fixtures().join("tiny_lm"), 0).expect("the tiny_lm fixture opens")
}

/// Reads an I64 tensor of `tiny_lm_golden.safetensors` as token ids.
fn golden_ids(key: &str) -> Vec<u32> {
    let path = fixtures().join("tiny_lm_golden.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("golden file parses");
    let view = file.tensor(key).unwrap_or_else(|e| panic!("golden tensor `{key}`: {e}"));
    assert_eq!(view.dtype(), safetensors::Dtype::I64, "golden tensor `{key}` must be I64");
    assert_eq!(view.shape()[0], 1, "golden tensor `{key}` holds one sequence");
    view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as u32).collect()
}

fn options(max_new_tokens: usize, temperature: f32, top_k: usize, seed: u64) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: SamplingSettings { temperature, top_k, seed },
        stop_token: Some(ENDOFTEXT),
    }
}

/// Generates from `prompt` and checks that the callback saw exactly the returned tokens.
fn run(generator: &mut Generator<'_>, prompt: &[u32], options: &GenerateOptions) -> Generation {
    let mut streamed = Vec::new();
    let generation = generator
        .generate(prompt, options, |token| {
            streamed.push(token);
            Ok(())
        })
        .expect("generation runs");
    assert_eq!(streamed, generation.tokens, "tokens passed to the callback differ from the tokens returned");
    generation
}

#[test]
fn greedy_matches_transformers() {
    let Some(gpu) = gpu() else { return };
    let model = tiny_lm();
    let prompt = golden_ids("generate.prompt_ids");
    let want = golden_ids("generate.output_ids");
    let new_tokens = want.len() - prompt.len();
    assert_eq!(&want[..prompt.len()], &prompt[..], "golden output starts with the prompt");

    let mut generator = Generator::new(gpu, &model.config, &model.weights).expect("generator builds");
    let generation = run(&mut generator, &prompt, &options(new_tokens, 0.0, 0, 1));
    assert_eq!(
        generation.tokens,
        want[prompt.len()..],
        "greedy tokens after prompt {prompt:?} differ from transformers' generate"
    );
    assert_eq!(generation.stop, StopReason::MaxNewTokens);
}

#[test]
fn same_seed_gives_same_tokens() {
    let Some(gpu) = gpu() else { return };
    let model = tiny_lm();
    let prompt = model.tokenizer.encode("The quick brown fox");
    let mut generator = Generator::new(gpu, &model.config, &model.weights).expect("generator builds");
    let sample = |generator: &mut Generator<'_>, seed: u64| run(generator, &prompt, &options(12, 1.0, 0, seed)).tokens;
    let first = sample(&mut generator, 7);
    let again = sample(&mut generator, 7);
    let other = sample(&mut generator, 8);
    assert_eq!(first, again, "seed 7 gave different tokens on a second run");
    assert_ne!(first, other, "seeds 7 and 8 gave the same 12 tokens {first:?}");
}

#[test]
fn top_k_one_equals_greedy() {
    let Some(gpu) = gpu() else { return };
    let model = tiny_lm();
    let prompt = model.tokenizer.encode("Once upon a time");
    let mut generator = Generator::new(gpu, &model.config, &model.weights).expect("generator builds");
    let greedy = run(&mut generator, &prompt, &options(10, 0.0, 0, 1)).tokens;
    for seed in [2, 3] {
        let top_one = run(&mut generator, &prompt, &options(10, 0.8, 1, seed)).tokens;
        assert_eq!(top_one, greedy, "top-k 1 at temperature 0.8 with seed {seed} differs from greedy");
    }
}

#[test]
fn context_limit_stops_generation() {
    let Some(gpu) = gpu() else { return };
    let model = tiny_lm();
    let context = model.config.n_positions;
    assert_eq!(context, 64, "the fixture's n_positions");
    let prompt: Vec<u32> = (0..60).map(|i| 464 + i).collect();
    let mut generator = Generator::new(gpu, &model.config, &model.weights).expect("generator builds");
    let mut long = options(100, 1.0, 0, 4);
    long.stop_token = None;
    let generation = run(&mut generator, &prompt, &long);
    assert_eq!(generation.stop, StopReason::ContextLimit);
    assert_eq!(generation.tokens.len(), context - prompt.len(), "tokens generated after a 60-token prompt");

    let full: Vec<u32> = vec![464; context];
    let generation = run(&mut generator, &full, &long);
    assert_eq!(generation.stop, StopReason::ContextLimit, "a prompt that fills the context");
    assert!(generation.tokens.is_empty(), "generated {:?} after a full context", generation.tokens);
}

#[test]
fn stop_token_ends_generation() {
    let Some(gpu) = gpu() else { return };
    let model = tiny_lm();
    let prompt = model.tokenizer.encode("Once upon a time");
    let mut generator = Generator::new(gpu, &model.config, &model.weights).expect("generator builds");
    // The greedy continuation's third token, used as the stop token, ends generation there.
    let greedy = run(&mut generator, &prompt, &options(8, 0.0, 0, 1)).tokens;
    let stop = greedy[2];
    let first = greedy.iter().position(|&t| t == stop).expect("the stop token is in the continuation");
    let mut stopping = options(8, 0.0, 0, 1);
    stopping.stop_token = Some(stop);
    let generation = run(&mut generator, &prompt, &stopping);
    assert_eq!(generation.stop, StopReason::StopToken);
    assert_eq!(generation.tokens, greedy[..=first], "tokens up to and including the stop token {stop}");
}

#[test]
fn invalid_prompts_are_rejected() {
    let Some(gpu) = gpu() else { return };
    let model = tiny_lm();
    let mut generator = Generator::new(gpu, &model.config, &model.weights).expect("generator builds");
    let settings = options(4, 1.0, 0, 1);
    let mut generate = |prompt: &[u32], settings: &GenerateOptions| generator.generate(prompt, settings, |_| Ok(()));

    let error = generate(&[], &settings).expect_err("an empty prompt is rejected");
    assert!(matches!(error, GenerateError::EmptyPrompt), "empty prompt gave {error:?}");

    let error = generate(&vec![464; 65], &settings).expect_err("a 65-token prompt is rejected");
    assert!(
        matches!(error, GenerateError::PromptTooLong { tokens: 65, n_positions: 64 }),
        "65-token prompt gave {error:?}"
    );

    let error = generate(&[464, 50257], &settings).expect_err("token 50257 is rejected");
    assert!(
        matches!(error, GenerateError::TokenOutOfRange { id: 50257, vocab_size: 50257 }),
        "token 50257 gave {error:?}"
    );

    let negative = options(4, -0.5, 0, 1);
    let error = generate(&[464], &negative).expect_err("temperature -0.5 is rejected");
    assert!(error.to_string().contains("-0.5"), "the message names the temperature: {error}");
}
