//! Parity with Hugging Face transformers on the golden fixtures in `tests/fixtures/`
//! (written by `tests/fixtures/make_fixtures.py`): logits, loss, every gradient, AdamW steps.

use crate::graph::executor::{OptimizerSettings, StepInputs};
use crate::graph::Session;
use crate::model::config::Gpt2Config;
use crate::model::gpt2::{build_graph, BatchShape, Head, Trainable};
use crate::model::weights::{self, HeadKind, LoadOptions, Weights};
use crate::testing::{assert_close, test_gpu};
use rand::{Rng, SeedableRng};
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

/// Logits and loss agree within 1e-4 relative; the absolute floor covers logits near zero,
/// where f32 accumulation order alone differs by about 1e-6.
const LOGIT_RTOL: f64 = 1e-4;
const LOGIT_ATOL: f64 = 1e-5;
/// Gradients agree within 1e-3 relative. The absolute floor is relative to the largest
/// gradient of the tensor, since entries far below it are dominated by rounding in both engines.
const GRAD_RTOL: f64 = 1e-3;
const GRAD_ATOL_OF_MAX: f64 = 1e-4;
/// After three AdamW steps, each weight has moved by at most 3 * lr = 3e-3; the engines agree on
/// those moves to within a few ulp of the weights.
const ADAMW_RTOL: f64 = 1e-4;
const ADAMW_ATOL: f64 = 2e-6;

struct Golden {
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Golden {
    fn open(name: &str) -> Golden {
        let path = fixtures().join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("failed to read {}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).expect("golden file parses");
        let mut tensors = HashMap::new();
        for (key, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f64> = match view.dtype() {
                safetensors::Dtype::F32 => {
                    data.chunks_exact(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect()
                }
                safetensors::Dtype::I64 => data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                other => panic!("golden tensor `{key}` has unexpected dtype {other:?}"),
            };
            tensors.insert(key.to_string(), (view.shape().to_vec(), values));
        }
        Golden { tensors }
    }

    fn get(&self, key: &str) -> &[f64] {
        &self.tensors.get(key).unwrap_or_else(|| panic!("golden tensor `{key}` missing")).1
    }

    fn shape(&self, key: &str) -> &[usize] {
        &self.tensors[key].0
    }
}

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

fn open_model(dir: &str, head: HeadKind) -> (Gpt2Config, Weights) {
    let dir = fixtures().join(dir);
    let config = Gpt2Config::from_file(&dir.join("config.json")).expect("fixture config loads");
    let weights = weights::load(&dir.join("model.safetensors"), &config, head, LoadOptions { allow_missing_head: false })
        .expect("fixture weights load");
    (config, weights)
}

fn golden_name(canonical: &str) -> String {
    if canonical == "score.weight" {
        canonical.to_string()
    } else {
        format!("transformer.{canonical}")
    }
}

/// Rows `rows` of a (V, C) table.
fn select_rows(values: &[f32], columns: usize, rows: &[f64]) -> Vec<f32> {
    rows.iter().flat_map(|&r| values[r as usize * columns..(r as usize + 1) * columns].iter().copied()).collect()
}

fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, x| m.max(x.abs()))
}

/// Compares the gradient of every trainable parameter with `prefix.<HF name>`.
fn check_grads(session: &Session<'_>, golden: &Golden, weights: &Weights, prefix: &str, expect_present: impl Fn(&str) -> bool) {
    for name in weights.tensors.keys() {
        let numel = weights.tensors[name].data.len();
        let grad = session.read_param_state(name, ".grad", numel).expect("gradient reads");
        let key = format!("{prefix}.{}", golden_name(name));
        if !expect_present(name) {
            assert!(grad.is_none(), "frozen `{name}` has a gradient buffer");
            continue;
        }
        let grad = grad.unwrap_or_else(|| panic!("trainable `{name}` has no gradient buffer"));
        let want = golden.get(&key);
        let got = if name == "wte.weight" {
            let columns = weights.tensors[name].shape[1];
            select_rows(&grad, columns, golden.get("wte_rows"))
        } else {
            grad
        };
        assert_close(&format!("gradient of {name}"), &got, want, GRAD_ATOL_OF_MAX * max_abs(want), GRAD_RTOL);
    }
}

fn settings() -> OptimizerSettings {
    OptimizerSettings { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1, clip_grad_norm: None, skip_nonfinite: true }
}

fn to_u32(v: &[f64]) -> Vec<u32> {
    v.iter().map(|&x| x as u32).collect()
}

fn to_i32(v: &[f64]) -> Vec<i32> {
    v.iter().map(|&x| x as i32).collect()
}

struct Case {
    golden: Golden,
    config: Gpt2Config,
    weights: Weights,
    head: Head,
    batch: usize,
    seq_len: usize,
    ids: Vec<u32>,
    lengths: Vec<u32>,
    targets: Vec<i32>,
}

fn classifier_case() -> Case {
    let golden = Golden::open("tiny_cls_golden.safetensors");
    let (config, weights) = open_model("tiny_cls", HeadKind::Classifier { num_labels: 3 });
    let shape = golden.shape("input_ids").to_vec();
    Case {
        ids: to_u32(golden.get("input_ids")),
        lengths: to_u32(golden.get("lengths")),
        targets: to_i32(golden.get("labels")),
        golden,
        config,
        weights,
        head: Head::Classifier { num_labels: 3 },
        batch: shape[0],
        seq_len: shape[1],
    }
}

fn lm_case() -> Case {
    let golden = Golden::open("tiny_lm_golden.safetensors");
    let (config, weights) = open_model("tiny_lm", HeadKind::LanguageModel);
    let shape = golden.shape("input_ids").to_vec();
    Case {
        ids: to_u32(golden.get("input_ids")),
        lengths: to_u32(golden.get("lengths")),
        targets: to_i32(golden.get("targets")),
        golden,
        config,
        weights,
        head: Head::LanguageModel,
        batch: shape[0],
        seq_len: shape[1],
    }
}

impl Case {
    fn session<'g>(&self, gpu: &'g crate::gpu::Gpu, trainable: Trainable) -> Session<'g> {
        let graph = build_graph(
            &self.config,
            self.head,
            BatchShape { batch: self.batch, seq_len: self.seq_len },
            trainable,
            gpu.limits().max_storage_buffer_binding_size,
        );
        let s = Session::new(gpu, graph, &self.weights, trainable != Trainable::Nothing, settings()).expect("session builds");
        s.set_inputs(&StepInputs { ids: &self.ids, lengths: &self.lengths, targets: &self.targets });
        s
    }

    /// Logits at the rows the golden file stores: every row for a classifier, real positions
    /// (batch-major) for a language model.
    fn real_logits(&self, logits: &[f32]) -> Vec<f32> {
        match self.head {
            Head::Classifier { .. } | Head::LanguageModelLoss => logits.to_vec(),
            Head::LanguageModel => {
                let v = self.config.vocab_size;
                let mut out = Vec::new();
                for b in 0..self.batch {
                    for t in 0..self.lengths[b] as usize {
                        let row = b * self.seq_len + t;
                        out.extend_from_slice(&logits[row * v..(row + 1) * v]);
                    }
                }
                out
            }
        }
    }
}

fn check_forward_and_grads(case: &Case) {
    let Some(gpu) = test_gpu() else { return };
    let mut session = case.session(gpu, Trainable::All);
    session.submit(true, None, 1.0).expect("step runs");
    let loss = session.read_loss().expect("loss reads");
    assert_close("loss", &[loss.loss], case.golden.get("loss"), LOGIT_ATOL, LOGIT_RTOL);
    let logits = session.read_logits().expect("logits read");
    assert_close("logits", &case.real_logits(&logits), case.golden.get("logits"), LOGIT_ATOL, LOGIT_RTOL);
    check_grads(&session, &case.golden, &case.weights, "grad", |_| true);
}

fn check_adamw(case: &Case) {
    let Some(gpu) = test_gpu() else { return };
    let mut session = case.session(gpu, Trainable::All);
    let lr = 1e-3;
    let mut losses = Vec::new();
    for _ in 0..3 {
        session.submit(true, Some(lr), 1.0).expect("step runs");
        losses.push(session.read_loss().expect("loss reads").loss);
    }
    assert_close("losses of 3 AdamW steps", &losses, case.golden.get("adamw.losses"), LOGIT_ATOL, LOGIT_RTOL);
    session.submit(false, None, 1.0).expect("forward runs");
    let after = session.read_loss().expect("loss reads").loss;
    assert_close("loss after 3 AdamW steps", &[after], case.golden.get("adamw.loss_after"), LOGIT_ATOL, LOGIT_RTOL);
    let mut weights = case.weights.clone();
    session.download_weights(&mut weights).expect("weights read");
    for name in weights.tensors.keys() {
        let tensor = &weights.tensors[name];
        let got = if name == "wte.weight" {
            select_rows(&tensor.data, tensor.shape[1], case.golden.get("wte_rows"))
        } else {
            tensor.data.clone()
        };
        let key = format!("adamw.{}", golden_name(name));
        let want = case.golden.get(&key);
        // Adam divides by sqrt(v), so a gradient that is zero in exact arithmetic but rounding
        // noise in f32 still moves its weight by up to lr, in a direction the noise sets. The key
        // bias of attention is such a case: softmax ignores a constant added to every score of a
        // query, so q . b_k adds nothing. Its entries (the middle third of c_attn.bias) are
        // checked only through the loss; every other entry must match.
        let keep: Vec<usize> = if name.ends_with("attn.c_attn.bias") {
            let c = want.len() / 3;
            (0..c).chain(2 * c..3 * c).collect()
        } else {
            (0..want.len()).collect()
        };
        let got: Vec<f32> = keep.iter().map(|&i| got[i]).collect();
        let want: Vec<f64> = keep.iter().map(|&i| want[i]).collect();
        assert_close(&format!("{name} after 3 AdamW steps"), &got, &want, ADAMW_ATOL, ADAMW_RTOL);
    }
}

#[test]
fn classifier_matches_transformers() {
    check_forward_and_grads(&classifier_case());
}

#[test]
fn classifier_adamw_matches_torch() {
    check_adamw(&classifier_case());
}

#[test]
fn language_model_matches_transformers() {
    check_forward_and_grads(&lm_case());
}

#[test]
fn language_model_adamw_matches_torch() {
    check_adamw(&lm_case());
}

/// The chunked language-model loss, with wte split into several vocabulary chunks, gives the
/// loss and gradients of transformers.
#[test]
fn chunked_language_model_loss_matches_transformers() {
    let Some(gpu) = test_gpu() else { return };
    let case = lm_case();
    let shape = BatchShape { batch: case.batch, seq_len: case.seq_len };
    // A small binding limit splits the 50257-row wte into chunks of at most 2 MiB.
    let max_binding = 2 << 20;
    let graph = build_graph(&case.config, Head::LanguageModelLoss, shape, Trainable::All, max_binding);
    let mut session = Session::new(gpu, graph, &case.weights, true, settings()).expect("session builds");
    let chunks = session.plan_param_names("wte.weight");
    assert!(chunks.len() >= 4, "wte should be split into several chunks, got {chunks:?}");
    session.set_inputs(&StepInputs { ids: &case.ids, lengths: &case.lengths, targets: &case.targets });
    session.submit(true, None, 1.0).expect("step runs");
    let loss = session.read_loss().expect("loss reads");
    assert_close("chunked LM loss", &[loss.loss], case.golden.get("loss"), LOGIT_ATOL, LOGIT_RTOL);
    check_grads(&session, &case.golden, &case.weights, "grad", |_| true);
}

/// Several row chunks (64 rows each, forced by a 2 MiB binding limit) give the loss and
/// gradients of a single row chunk: the fused kernel binds the right rows of every tensor and
/// accumulates the wte gradient across chunks.
#[test]
fn lm_loss_row_chunks_match_single_chunk() {
    let Some(gpu) = test_gpu() else { return };
    let case = lm_case();
    let shape = BatchShape { batch: 4, seq_len: 50 };
    let rows = shape.batch * shape.seq_len;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let ids: Vec<u32> = (0..rows).map(|_| rng.random_range(0..case.config.vocab_size as u32)).collect();
    // Next-token targets, with the last position of each sequence and a few others ignored.
    let targets: Vec<i32> = (0..rows)
        .map(|i| if (i + 1) % shape.seq_len == 0 || i % 17 == 3 { -1 } else { ids[i + 1] as i32 })
        .collect();
    let lengths = vec![shape.seq_len as u32; shape.batch];

    let run = |max_binding: u64| {
        let graph = build_graph(&case.config, Head::LanguageModelLoss, shape, Trainable::All, max_binding);
        let mut session = Session::new(gpu, graph, &case.weights, true, settings()).expect("session builds");
        session.set_inputs(&StepInputs { ids: &ids, lengths: &lengths, targets: &targets });
        session.submit(true, None, 1.0).expect("step runs");
        let loss = session.read_loss().expect("loss reads");
        let grads: Vec<(String, Vec<f32>)> = case
            .weights
            .tensors
            .iter()
            .map(|(name, t)| (name.clone(), session.read_param_state(name, ".grad", t.data.len()).unwrap().expect("gradient exists")))
            .collect();
        (loss, grads)
    };

    let (chunked_loss, chunked) = run(2 << 20);
    let (whole_loss, whole) = run(gpu.limits().max_storage_buffer_binding_size);
    assert_eq!(chunked_loss.counted, whole_loss.counted);
    assert!(chunked_loss.counted > 100.0, "only {} rows counted", chunked_loss.counted);
    assert_close("loss over row chunks", &[chunked_loss.loss], &[f64::from(whole_loss.loss)], 1e-5, 1e-6);
    for ((name, got), (_, want)) in chunked.iter().zip(&whole) {
        let want = crate::testing::to_f64(want);
        assert_close(&format!("gradient of {name} over row chunks"), got, &want, 1e-5 * max_abs(&want), 1e-4);
    }
}

#[test]
fn last_block_gradients_match_full_backward() {
    let Some(gpu) = test_gpu() else { return };
    let case = classifier_case();
    let mut session = case.session(gpu, Trainable::LastBlocks(1));
    session.submit(true, None, 1.0).expect("step runs");
    let trainable = |name: &str| name.starts_with("h.1.") || name.starts_with("ln_f.") || name == "score.weight";
    check_grads(&session, &case.golden, &case.weights, "frozen_grad", trainable);
    // The same tensors of the full backward are identical by construction of the fixture.
    check_grads(&session, &case.golden, &case.weights, "grad", trainable);
}

#[test]
fn classifier_predictions_match_transformers() {
    let Some(gpu) = test_gpu() else { return };
    let case = classifier_case();
    let classifier = crate::train::classify::Classifier::open(&fixtures().join("tiny_cls")).expect("fixture classifier opens");
    let texts: Vec<String> = vec![
        "I loved every minute of this film, truly wonderful.".into(),
        "The package arrived on Tuesday.".into(),
        "Terrible service.".into(),
    ];
    let predictions = classifier.predict(gpu, &texts, 8).expect("prediction runs");
    let want = case.golden.get("probabilities");
    let labels = classifier.labels().to_vec();
    let got: Vec<f32> = predictions.iter().flat_map(|p| labels.iter().map(|l| p.probabilities[l])).collect();
    assert_close("probabilities", &got, want, 1e-6, 1e-4);
}

/// The PEFT adapter fixture (`tests/fixtures/make_lora_fixtures.py`) on tiny_cls: r 4, alpha 8,
/// c_attn, c_proj and c_fc targeted, non-zero A and B, a changed head.
struct LoraCase {
    case: Case,
    adapter: crate::model::lora::Adapter,
}

fn lora_case() -> LoraCase {
    let mut case = classifier_case();
    case.golden = Golden::open("tiny_cls_lora_golden.safetensors");
    let adapter = crate::model::lora::load_adapter(&fixtures().join("tiny_cls_lora"), &case.config, Some(3)).expect("PEFT adapter loads");
    LoraCase { case, adapter }
}

impl LoraCase {
    /// Base weights plus the adapter's A, B and head, in one set for the session.
    fn weights(&self) -> Weights {
        let mut w = self.case.weights.clone();
        for (name, tensor) in &self.adapter.weights.tensors {
            w.insert(name.clone(), tensor.clone());
        }
        w
    }

    fn session<'g>(&self, gpu: &'g crate::gpu::Gpu, weights: &Weights, train: bool) -> Session<'g> {
        let c = &self.case;
        let graph = crate::model::gpt2::build_graph_with_lora(
            &c.config,
            c.head,
            BatchShape { batch: c.batch, seq_len: c.seq_len },
            if train { Trainable::Head } else { Trainable::Nothing },
            Some(&self.adapter.spec),
            gpu.limits().max_storage_buffer_binding_size,
        );
        let s = Session::new(gpu, graph, weights, train, settings()).expect("LoRA session builds");
        s.set_inputs(&StepInputs { ids: &c.ids, lengths: &c.lengths, targets: &c.targets });
        s
    }
}

#[test]
fn lora_adapter_from_peft_matches_peft() {
    let Some(gpu) = test_gpu() else { return };
    let lc = lora_case();
    assert_eq!(lc.adapter.modules.len(), 8, "c_attn, c_proj and c_fc in both blocks, c_proj twice");
    assert_eq!(lc.adapter.spec.scaling(), 2.0);
    let weights = lc.weights();
    let mut session = lc.session(gpu, &weights, true);
    session.submit(true, None, 1.0).expect("step runs");
    let golden = &lc.case.golden;
    let loss = session.read_loss().expect("loss reads");
    assert_close("LoRA loss", &[loss.loss], golden.get("loss"), LOGIT_ATOL, LOGIT_RTOL);
    let logits = session.read_logits().expect("logits read");
    assert_close("LoRA logits", &logits, golden.get("logits"), LOGIT_ATOL, LOGIT_RTOL);
    // Gradients of A, B and the head match PEFT's; no base weight has a gradient buffer.
    let mut checked = 0;
    for name in weights.tensors.keys() {
        let numel = weights.tensors[name].data.len();
        let grad = session.read_param_state(name, ".grad", numel).expect("gradient reads");
        if lc.adapter.weights.get(name).is_none() {
            assert!(grad.is_none(), "frozen base weight `{name}` has a gradient buffer");
            continue;
        }
        let grad = grad.unwrap_or_else(|| panic!("adapter tensor `{name}` has no gradient buffer"));
        let want = golden.get(&format!("grad.{name}"));
        assert_close(&format!("gradient of {name}"), &grad, want, GRAD_ATOL_OF_MAX * max_abs(want), GRAD_RTOL);
        checked += 1;
    }
    assert_eq!(checked, 17, "16 LoRA matrices and the head");
}

#[test]
fn lora_merge_matches_peft_merge_and_unmerged_model() {
    let Some(gpu) = test_gpu() else { return };
    let lc = lora_case();
    let mut merged = lc.case.weights.clone();
    crate::model::lora::merge(&mut merged, &lc.adapter.spec, &lc.adapter.modules, &lc.adapter.weights).expect("merge");
    let golden = &lc.case.golden;
    for m in &lc.adapter.modules {
        let name = m.weight_name();
        let want = golden.get(&format!("merged.{name}"));
        assert_close(&format!("merged {name}"), &merged.get(&name).unwrap().data, want, 1e-6, 1e-5);
    }
    assert_close("merged score.weight", &merged.get("score.weight").unwrap().data, golden.get("merged.score.weight"), 0.0, 0.0);
    // The plain graph on merged weights and the LoRA graph on the unmerged ones agree.
    let plain = Case { weights: merged, ..classifier_case() };
    let mut merged_session = plain.session(gpu, Trainable::Nothing);
    merged_session.submit(false, None, 1.0).expect("forward runs");
    let merged_logits = merged_session.read_logits().expect("logits read");
    let weights = lc.weights();
    let mut lora_session = lc.session(gpu, &weights, false);
    lora_session.submit(false, None, 1.0).expect("forward runs");
    let lora_logits = lora_session.read_logits().expect("logits read");
    let as64: Vec<f64> = lora_logits.iter().map(|&x| f64::from(x)).collect();
    assert_close("merged against unmerged logits", &merged_logits, &as64, 1e-5, 1e-4);
    assert_close("merged logits against PEFT", &merged_logits, golden.get("logits"), LOGIT_ATOL, LOGIT_RTOL);
}

#[test]
fn fresh_lora_reproduces_the_base_model_exactly() {
    let Some(gpu) = test_gpu() else { return };
    let lc = lora_case();
    let base = classifier_case();
    let mut base_session = base.session(gpu, Trainable::Nothing);
    base_session.submit(false, None, 1.0).expect("forward runs");
    let base_logits = base_session.read_logits().expect("logits read");
    // B = 0: the branch adds exactly zero, whatever A holds.
    let mut weights = base.weights.clone();
    for (name, tensor) in crate::model::lora::init_adapter(&lc.adapter.spec, &lc.adapter.modules, 5).tensors {
        weights.insert(name, tensor);
    }
    let mut session = lc.session(gpu, &weights, true);
    session.submit(true, None, 1.0).expect("step runs");
    let logits = session.read_logits().expect("logits read");
    assert_eq!(logits, base_logits, "a LoRA branch with B = 0 changed the logits");
    // With B = 0 the gradient of A is exactly zero and that of B is not.
    let a = lc.adapter.modules[0].a_name();
    let b = lc.adapter.modules[0].b_name();
    let grad_a = session.read_param_state(&a, ".grad", weights.get(&a).unwrap().numel()).unwrap().unwrap();
    let grad_b = session.read_param_state(&b, ".grad", weights.get(&b).unwrap().numel()).unwrap().unwrap();
    assert!(grad_a.iter().all(|&g| g == 0.0), "gradient of {a} must be zero while B is zero");
    assert!(grad_b.iter().any(|&g| g != 0.0), "gradient of {b} must not vanish");
}

/// QLoRA computes what plain LoRA computes on the NF4 round trip of the base weights: the
/// quantised kernels only change where the weights come from.
#[test]
fn qlora_matches_lora_on_the_dequantized_base() {
    use crate::model::lora::{dequantized_base, init_adapter, parse_targets, LoraSpec};
    use rand::{Rng, SeedableRng};
    let Some(gpu) = test_gpu() else { return };
    let mut config = Gpt2Config::mini();
    config.n_layer = 2;
    config.n_embd = 64;
    config.n_head = 2;
    let head = Head::Classifier { num_labels: 3 };
    let mut weights = weights::init_random(&config, HeadKind::Classifier { num_labels: 3 }, 11).unwrap();
    let mut spec = LoraSpec::new(4, 8.0, 0.0, parse_targets("c_attn,c_proj,c_fc")).unwrap();
    let modules = spec.modules(&config).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for (name, mut tensor) in init_adapter(&spec, &modules, 5).tensors {
        tensor.data.iter_mut().for_each(|v| *v += rng.random_range(-0.2f32..0.2));
        weights.insert(name, tensor);
    }
    let shape = BatchShape { batch: 3, seq_len: 16 };
    let ids: Vec<u32> = (0..48).map(|_| rng.random_range(0..50257)).collect();
    let inputs = (ids, vec![16u32, 9, 1], vec![2i32, 0, 1]);
    let max_binding = gpu.limits().max_storage_buffer_binding_size;
    let run = |spec: &LoraSpec, weights: &Weights| {
        let graph = crate::model::gpt2::build_graph_with_lora(&config, head, shape, Trainable::Head, Some(spec), max_binding);
        let mut s = Session::new(gpu, graph, weights, true, settings()).expect("session builds");
        s.set_inputs(&StepInputs { ids: &inputs.0, lengths: &inputs.1, targets: &inputs.2 });
        s.submit(true, None, 1.0).expect("step runs");
        let logits = s.read_logits().expect("logits read");
        let summary = s.summary();
        let grads: Vec<(String, Vec<f32>)> = weights
            .tensors
            .iter()
            .filter_map(|(name, t)| s.read_param_state(name, ".grad", t.numel()).expect("gradient reads").map(|g| (name.clone(), g)))
            .collect();
        (logits, grads, summary)
    };
    let (lora_logits, lora_grads, lora_plan) = run(&spec, &dequantized_base(&weights, &config, false).unwrap());
    spec.quantize_base = true;
    let (q_logits, q_grads, q_plan) = run(&spec, &weights);
    // Double quantisation: the same comparison against its own round trip.
    let mut dq_spec = spec.clone();
    dq_spec.double_quant = true;
    let unquantized = LoraSpec { quantize_base: false, double_quant: false, ..spec.clone() };
    let (dq_want, _, _) = run(&unquantized, &dequantized_base(&weights, &config, true).unwrap());
    let (dq_logits, dq_grads, dq_plan) = run(&dq_spec, &weights);
    assert_close("double-quantised QLoRA logits", &dq_logits, &to64_outer(&dq_want), 1e-5, 1e-4);
    assert_eq!(dq_grads.len(), 17);
    assert!(dq_plan.param_bytes < q_plan.param_bytes, "double quantisation must shrink the parameters");
    let to64 = to64_outer;
    assert_close("QLoRA logits against LoRA on the dequantised base", &q_logits, &to64(&lora_logits), 1e-5, 1e-4);
    assert_eq!(q_grads.len(), 17, "16 LoRA matrices and the head have gradients, nothing else");
    for ((name, q), (lora_name, want)) in q_grads.iter().zip(&lora_grads) {
        assert_eq!(name, lora_name);
        let want = to64(want);
        assert_close(&format!("QLoRA gradient of {name}"), q, &want, GRAD_ATOL_OF_MAX * max_abs(&want), GRAD_RTOL);
    }
    assert_eq!(q_plan.frozen_params, lora_plan.frozen_params, "NF4 weights count their values once");
    // Each block's 4 linear weights (12 C^2 values) go from 32 to 4.5 bits.
    let linear_values = (12 * config.n_embd * config.n_embd * config.n_layer) as u64;
    assert_eq!(lora_plan.param_bytes - q_plan.param_bytes, linear_values * 4 - linear_values / 2 - linear_values / 16);
}

fn to64_outer(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// `Precision::F16` computes what f32 computes on the f16 round trip of the frozen linear
/// weights, for frozen blocks below a trained one (forward only) and for LoRA (whose gradients
/// flow back through the f16 weights), and halves those weights' memory.
#[test]
fn f16_frozen_weights_match_f32_on_rounded_weights() {
    use crate::kernels::f16_weights::round_trip;
    use crate::model::gpt2::{build_graph_with, Precision};
    use crate::model::lora::{init_adapter, parse_targets, LoraSpec};
    use rand::{Rng, SeedableRng};
    let Some(gpu) = test_gpu().filter(|gpu| gpu.half_floats()) else { return };
    let mut config = Gpt2Config::mini();
    config.n_layer = 2;
    config.n_embd = 64;
    config.n_head = 2;
    let head = Head::Classifier { num_labels: 3 };
    let mut weights = weights::init_random(&config, HeadKind::Classifier { num_labels: 3 }, 21).unwrap();
    let spec = LoraSpec::new(4, 8.0, 0.0, parse_targets("c_attn,c_proj,c_fc")).unwrap();
    let modules = spec.modules(&config).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    for (name, mut tensor) in init_adapter(&spec, &modules, 6).tensors {
        tensor.data.iter_mut().for_each(|v| *v += rng.random_range(-0.2f32..0.2));
        weights.insert(name, tensor);
    }

    let shape = BatchShape { batch: 3, seq_len: 16 };
    let ids: Vec<u32> = (0..48).map(|_| rng.random_range(0..50257)).collect();
    let inputs = (ids, vec![16u32, 9, 1], vec![2i32, 0, 1]);
    let max_binding = gpu.limits().max_storage_buffer_binding_size;
    let linear = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"];
    let rounded = |blocks: std::ops::Range<usize>| {
        let mut w = weights.clone();
        for layer in blocks {
            for module in linear {
                let t = w.get_mut(&format!("h.{layer}.{module}.weight")).unwrap();
                t.data = round_trip(&t.data);
            }
        }
        w
    };

    let run = |trainable: Trainable, lora: Option<&LoraSpec>, precision: Precision, weights: &Weights| {
        let graph = build_graph_with(&config, head, shape, trainable, lora, precision, max_binding);
        let mut s = Session::new(gpu, graph, weights, true, settings()).expect("session builds");
        s.set_inputs(&StepInputs { ids: &inputs.0, lengths: &inputs.1, targets: &inputs.2 });
        s.submit(true, None, 1.0).expect("step runs");
        let logits = s.read_logits().expect("logits read");
        let grads: Vec<(String, Vec<f32>)> = weights
            .tensors
            .iter()
            .filter_map(|(name, t)| s.read_param_state(name, ".grad", t.numel()).expect("gradient reads").map(|g| (name.clone(), g)))
            .collect();
        (logits, grads, s.summary())
    };

    let c = config.n_embd;
    for (what, trainable, lora, frozen_blocks, grad_count) in
        [("last-blocks:1", Trainable::LastBlocks(1), None, 0..1, 15), ("LoRA", Trainable::Head, Some(&spec), 0..2, 17)]
    {
        let (want_logits, want_grads, f32_plan) = run(trainable, lora, Precision::F32, &rounded(frozen_blocks.clone()));
        let (logits, grads, f16_plan) = run(trainable, lora, Precision::F16, &weights);
        assert_close(&format!("{what}: f16 logits against f32 on rounded weights"), &logits, &to64_outer(&want_logits), 1e-5, 1e-4);
        assert_eq!(grads.len(), grad_count, "{what}: parameters with gradients");
        assert_eq!(want_grads.len(), grad_count, "{what}: parameters with gradients in f32");
        for ((name, got), (want_name, want)) in grads.iter().zip(&want_grads) {
            assert_eq!(name, want_name);
            let want = to64_outer(want);
            assert_close(&format!("{what}: f16 gradient of {name}"), got, &want, GRAD_ATOL_OF_MAX * max_abs(&want), GRAD_RTOL);
        }
        assert_eq!(f16_plan.frozen_params, f32_plan.frozen_params, "{what}: f16 weights count each value once");
        // Each frozen block's 4 linear weights (12 C^2 values) go from 4 to 2 bytes per value.
        let halved = (12 * c * c * frozen_blocks.len()) as u64 * 2;
        assert_eq!(f32_plan.param_bytes - f16_plan.param_bytes, halved, "{what}: bytes saved");
        // The f16 weights differ from the f32 ones, so the f32 graph on unrounded weights must
        // give other logits: the comparison above is not vacuous.
        let (plain_logits, _, _) = run(trainable, lora, Precision::F32, &weights);
        assert_ne!(plain_logits, want_logits, "{what}: rounding to f16 changed no logit");
    }
}
