//! Planner and autodiff properties on GPT-2 graphs, without a device.

use super::ir::TensorKind;
use super::plan::{Kernel, Plan, PlanOptions};
use crate::model::config::Gpt2Config;
use crate::model::gpt2::{build_graph, BatchShape, Head, Trainable};

/// lavapipe's storage binding limit, 128 MiB.
const LAVAPIPE_BINDING: u64 = 128 << 20;

fn plan(config: &Gpt2Config, head: Head, trainable: Trainable) -> Plan {
    let graph = build_graph(config, head, BatchShape { batch: 8, seq_len: 120 }, trainable, LAVAPIPE_BINDING);
    Plan::new(graph, PlanOptions { train: trainable != Trainable::Nothing, clip: true, row_flags: true })
}

#[test]
fn frozen_parameters_get_no_gradient() {
    let config = Gpt2Config::small();
    let p = plan(&config, Head::Classifier { num_labels: 2 }, Trainable::LastBlocks(1));
    for (id, t) in p.graph.tensors.iter().enumerate() {
        if let TensorKind::Param { trainable } = t.kind {
            let has_grad = p.backward.param_grads.iter().any(|&(param, _)| param == id);
            assert_eq!(has_grad, trainable, "parameter `{}` trainable={trainable} but has_grad={has_grad}", t.name);
            let expected = t.name.starts_with("h.11.") || t.name.starts_with("ln_f.") || t.name == "score.weight";
            assert_eq!(trainable, expected, "parameter `{}` has the wrong trainability", t.name);
        }
    }
    // No backward kernel touches a block below the last one.
    for k in &p.kernels[p.forward_end..p.backward_end] {
        for t in k.tensors() {
            let name = &p.graph.tensors[t].name;
            assert!(
                !(name.starts_with("h.") && !name.starts_with("h.11.") && !name.starts_with("h.10.residual_2")),
                "backward kernel {k:?} touches `{name}` below the trainable block"
            );
        }
    }
}

#[test]
fn last_block_backward_costs_under_a_fifth_of_all() {
    let config = Gpt2Config::small();
    let head = Head::Classifier { num_labels: 2 };
    let last = plan(&config, head, Trainable::LastBlocks(1)).summary();
    let all = plan(&config, head, Trainable::All).summary();
    assert!(
        last.backward_flops * 5 < all.backward_flops,
        "last-blocks:1 backward {} FLOPs is not under a fifth of all ({})",
        last.backward_flops,
        all.backward_flops
    );
    assert!(last.backward_dispatches * 5 < all.backward_dispatches);
    assert_eq!(last.forward_flops, all.forward_flops);
}

#[test]
fn head_only_backward_is_two_kernels() {
    let config = Gpt2Config::small();
    let p = plan(&config, Head::Classifier { num_labels: 3 }, Trainable::Head);
    let backward = &p.kernels[p.forward_end..p.backward_end];
    assert_eq!(backward.len(), 2, "head-only backward: {backward:?}");
    assert!(matches!(backward[0], Kernel::XentBackward { .. }));
    assert!(matches!(backward[1], Kernel::MatmulWeight { .. }));
}

#[test]
fn token_embedding_is_split_under_binding_limit() {
    let config = Gpt2Config::small();
    // One sequence of 64 tokens keeps the (64, 50257) logits of the tied LM head under the
    // limit; the table itself (147 MiB) must be split for both heads.
    let shape = BatchShape { batch: 1, seq_len: 64 };
    for head in [Head::LanguageModel, Head::Classifier { num_labels: 2 }] {
        let graph = build_graph(&config, head, shape, Trainable::All, LAVAPIPE_BINDING);
        let p = Plan::new(graph, PlanOptions { train: true, clip: false, row_flags: true });
        let chunks: Vec<_> = p.graph.params.iter().filter(|s| s.name == "wte.weight").collect();
        assert!(chunks.len() >= 2, "wte of 147 MiB must be split under a 128 MiB binding limit");
        let rows: usize = chunks.iter().map(|c| c.rows).sum();
        assert_eq!(rows, 50257);
        for t in &p.graph.tensors {
            assert!(t.bytes() <= LAVAPIPE_BINDING, "{head:?}: tensor `{}` has {} bytes", t.name, t.bytes());
        }
    }
}

#[test]
fn pool_reuse_lowers_activation_memory() {
    let config = Gpt2Config::small();
    let s = plan(&config, Head::Classifier { num_labels: 2 }, Trainable::All).summary();
    assert!(s.activation_bytes < s.activation_bytes_without_reuse, "{s:?}");
    assert!(s.peak_bytes > s.param_bytes);
}

#[test]
fn no_training_plan_has_no_backward() {
    let config = Gpt2Config::small();
    let p = plan(&config, Head::Classifier { num_labels: 2 }, Trainable::Nothing);
    assert_eq!(p.forward_end, p.kernels.len());
    assert!(p.backward.param_grads.is_empty());
}

/// A GPT-2 small-shaped model (random weights) runs a full training step on the adapter: its
/// 147 MiB token embedding is split under the storage binding limit, and both chunks receive
/// gradients.
#[test]
fn gpt2_small_trains_under_binding_limit() {
    use crate::graph::executor::{OptimizerSettings, StepInputs};
    use crate::graph::Session;
    use crate::model::weights::{init_random, HeadKind};

    let Some(gpu) = crate::testing::test_gpu() else { return };
    let config = Gpt2Config::small();
    let weights = init_random(&config, HeadKind::Classifier { num_labels: 2 }, 1).unwrap();
    let limit = gpu.limits().max_storage_buffer_binding_size;
    let shape = BatchShape { batch: 1, seq_len: 8 };
    let graph = build_graph(&config, Head::Classifier { num_labels: 2 }, shape, Trainable::All, limit);
    let mut session = Session::new(gpu, graph, &weights, true, OptimizerSettings::default()).expect("session builds");
    // Ids at both ends of the vocabulary, so that every chunk of the split table is used.
    let ids = [50256u32, 11, 50000, 3, 40000, 262, 1, 49999];
    session.set_inputs(&StepInputs { ids: &ids, lengths: &[8], targets: &[1] });
    session.submit(true, None, 1.0).expect("step runs");
    let loss = session.read_loss().unwrap();
    assert!(loss.loss.is_finite(), "loss {} is not finite", loss.loss);
    assert!(loss.loss > 0.0, "loss {} is not positive", loss.loss);

    let chunks: Vec<String> = session.plan_param_names("wte.weight");
    if limit < 50257 * 768 * 4 {
        assert!(chunks.len() >= 2, "wte was not split under a {limit}-byte binding limit");
    }
    for chunk in &chunks {
        let grad = session.read_tensor(&format!("{chunk}.grad")).unwrap().expect("wte chunk has a gradient");
        assert!(grad.iter().any(|&g| g != 0.0), "{chunk} received no gradient");
    }
}

/// Pretraining GPT-2 small at its full context: the chunked loss keeps every tensor under the
/// binding limit, keeps the logits of one row chunk (at most 80 MiB) instead of the (B*T, V)
/// logits, and costs three LM-head products of 2*B*T*C*V each (logits, input and weight
/// gradients), because a training step computes the logits once.
#[test]
fn chunked_lm_loss_never_holds_whole_logits() {
    let config = Gpt2Config::small();
    // Batch 2: the attention probabilities of batch 8 at 1024 tokens (402 MB per layer) would
    // exceed the limit on their own.
    let shape = BatchShape { batch: 2, seq_len: 1024 };
    let graph = build_graph(&config, Head::LanguageModelLoss, shape, Trainable::All, LAVAPIPE_BINDING);
    let p = Plan::new(graph, PlanOptions { train: true, clip: true, row_flags: true });
    let rows = (2 * 1024) as u64;
    let whole_logits = rows * config.vocab_size as u64 * 4;
    let mut logits_bytes = 0;
    for (id, t) in p.graph.tensors.iter().enumerate() {
        if p.storage[id] == super::plan::Storage::Unused {
            continue;
        }
        assert!(t.bytes() <= LAVAPIPE_BINDING, "`{}` is {} bytes, over the binding limit", t.name, t.bytes());
        if t.name.starts_with("lm_logits") {
            logits_bytes += t.bytes();
        }
    }
    assert!(logits_bytes > 0, "the plan has no logits chunk");
    assert!(logits_bytes <= 80 << 20, "logits chunks take {logits_bytes} bytes, over 80 MiB");
    assert!(logits_bytes * 4 < whole_logits, "logits chunks take {logits_bytes} bytes, whole logits {whole_logits}");
    let head_flops: u64 = p
        .kernels
        .iter()
        .filter(|k| matches!(k, Kernel::LmLossFused { .. } | Kernel::Forward(super::ir::Op::LmLoss { .. })))
        .map(Kernel::flops)
        .sum();
    let one_product = 2 * rows * config.n_embd as u64 * config.vocab_size as u64;
    assert!(head_flops >= 3 * one_product, "head FLOPs {head_flops} below three products");
    assert!(head_flops < 3 * one_product + one_product / 10, "head FLOPs {head_flops} above three products");
    // No other kernel multiplies by wte: the gradient products are part of the fused kernel.
    let wte_products = p.kernels.iter().filter(|k| match k {
        Kernel::MatmulInput { weight, .. } => p.graph.tensors[*weight].name.starts_with("wte"),
        Kernel::MatmulWeight { dweight, .. } => p.graph.tensors[*dweight].name.starts_with("wte"),
        _ => false,
    });
    assert_eq!(wte_products.count(), 0, "separate wte gradient products outside the fused LM loss");
}

/// Row and vocabulary chunks of the LM loss: all rows when their logits fit, else aligned row
/// chunks within the logits budget and the binding limit.
#[test]
fn lm_chunks_fit_budget_and_alignment() {
    use crate::model::gpt2::lm_chunks;
    // Few rows: one row chunk, vocabulary chunks of 8,192.
    let small = lm_chunks(16, 128, 50257, LAVAPIPE_BINDING);
    assert_eq!(small.row_chunk, 16);
    assert_eq!(small.vocab_rows, 8192);
    // 1,024 rows of GPT-2 logits are 206 MB: 384-row chunks of 77 MB.
    let tiny = lm_chunks(1024, 128, 50257, LAVAPIPE_BINDING);
    assert_eq!(tiny.row_chunk, 384);
    assert_eq!(tiny.vocab_rows, 8192);
    // A 2 MiB binding limit: a logits block (rows, 8192) fits only 64 rows.
    let narrow = lm_chunks(200, 32, 50257, 2 << 20);
    assert_eq!(narrow.row_chunk, 64);
    assert_eq!(narrow.vocab_rows, 8192);
    assert!(narrow.row_chunk as u64 * narrow.vocab_rows as u64 * 4 <= 2 << 20);
    // A wide model: the wte chunk (rows, C) must fit the limit too.
    let wide = lm_chunks(100, 4096, 50257, 64 << 20);
    assert_eq!(wide.vocab_rows, 4096);
}

/// Losses logged on the device and read in one transfer equal those read after each step of an
/// identical session, and the log empties on every read.
#[test]
fn loss_log_matches_per_step_reads() {
    use crate::graph::executor::{OptimizerSettings, StepInputs};
    use crate::graph::Session;
    use crate::model::weights::{init_random, HeadKind};

    let Some(gpu) = crate::testing::test_gpu() else { return };
    let config = Gpt2Config { n_layer: 1, n_head: 2, n_embd: 32, n_positions: 16, vocab_size: 64, bos_token_id: None, eos_token_id: None, ..Gpt2Config::mini() };
    let weights = init_random(&config, HeadKind::LanguageModel, 3).unwrap();
    let shape = BatchShape { batch: 2, seq_len: 8 };
    let limit = gpu.limits().max_storage_buffer_binding_size;
    let session = || {
        let graph = build_graph(&config, Head::LanguageModelLoss, shape, Trainable::All, limit);
        Session::new(gpu, graph, &weights, true, OptimizerSettings::default()).expect("session builds")
    };
    let (mut stepwise, mut logged) = (session(), session());
    logged.log_losses(3).unwrap();
    let lengths = [8u32, 8];
    let (mut expected, mut got) = (Vec::new(), Vec::new());
    for step in 0..5u32 {
        let ids: Vec<u32> = (0..16).map(|i| (i * 7 + step * 5) % 64).collect();
        let targets: Vec<i32> = ids.iter().map(|&t| ((t + 1) % 64) as i32).collect();
        let inputs = StepInputs { ids: &ids, lengths: &lengths, targets: &targets };
        stepwise.set_inputs(&inputs);
        stepwise.submit(true, Some(1e-2), 1.0).unwrap();
        expected.push(stepwise.read_loss().unwrap().loss);
        logged.set_inputs(&inputs);
        logged.submit(true, Some(1e-2), 1.0).unwrap();
        // A forward-only submit, as a validation pass makes, is not logged.
        logged.submit(false, None, 1.0).unwrap();
        if logged.logged_losses() == 3 {
            got.extend(logged.drain_losses().unwrap().iter().map(|out| out.loss));
            assert_eq!(logged.logged_losses(), 0, "the log did not empty");
        }
    }
    assert_eq!(logged.logged_losses(), 2);
    got.extend(logged.drain_losses().unwrap().iter().map(|out| out.loss));
    assert_eq!(got.len(), 5);
    assert_eq!(got, expected, "logged losses differ from per-step reads");
    assert!(expected.windows(2).any(|w| w[0] != w[1]), "every step had the same loss: {expected:?}");
    assert!(logged.drain_losses().unwrap().is_empty());
}

/// The optimizer's row lists change nothing but time. A classifier whose token embedding trains
/// gets, bit for bit, the weights and moments of the dense update. The steps bring new tokens,
/// change the learning rate every time and have two micro-batches each, and one is skipped for a
/// NaN gradient. Forward passes read rows that owe steps, from the first step or from a later
/// one, and rows trained earlier owe moment updates when the host reads the table. A resume into
/// a fresh session takes its moments from the host, so the rows with nonzero moments must owe
/// moment updates. The second case splits the token embedding into two row chunks, clips the
/// gradient, so the norm of the listed rows enters the update, and logs only two steps, so the
/// log fills and empties.
#[test]
fn row_flags_match_dense_update() {
    use crate::graph::executor::OptimizerSettings;

    // The row lists size their dispatches indirectly; adapters without that train densely.
    let Some(gpu) = crate::testing::test_gpu().filter(|gpu| gpu.indirect_dispatch()) else { return };
    let whole = gpu.limits().max_storage_buffer_binding_size;
    check_row_flags(gpu, whole, OptimizerSettings::default());
    // 128 rows of 48 floats in chunks of at most 16384 bytes: rows 0..85 and 85..128.
    check_row_flags(gpu, 16384, OptimizerSettings { clip_grad_norm: Some(0.05), ..OptimizerSettings::default() });
}

fn check_row_flags(gpu: &crate::gpu::Gpu, max_binding: u64, settings: crate::graph::executor::OptimizerSettings) {
    use crate::graph::executor::StepInputs;
    use crate::graph::Session;
    use crate::model::weights::{init_random, HeadKind};

    let config = Gpt2Config { n_layer: 1, n_head: 2, n_embd: 48, n_positions: 16, vocab_size: 128, bos_token_id: None, eos_token_id: None, ..Gpt2Config::mini() };
    let weights = init_random(&config, HeadKind::Classifier { num_labels: 2 }, 5).unwrap();
    let shape = BatchShape { batch: 2, seq_len: 8 };
    let head = Head::Classifier { num_labels: 2 };
    let case = format!("binding limit {max_binding}, clip {:?}", settings.clip_grad_norm);
    let session = |weights: &crate::model::weights::Weights, row_flags: bool| {
        let graph = build_graph(&config, head, shape, Trainable::All, max_binding);
        Session::with_row_flags(gpu, graph, weights, true, settings, row_flags).expect("session builds")
    };
    let (mut dense, mut flagged) = (session(&weights, false), session(&weights, true));
    if settings.clip_grad_norm.is_some() {
        flagged.set_step_log_steps(2);
    }
    assert!(dense.summary().optimizer_bytes < flagged.summary().optimizer_bytes, "{case}: the flagged session should have row flags");
    let chunks = flagged.plan_param_names("wte.weight").len();
    assert_eq!(chunks, if max_binding < 24576 { 2 } else { 1 }, "{case}: row chunks of wte");

    // Step s uses eight tokens of the window 8 s + 60 .. 8 s + 71, which moves over the
    // vocabulary (across the boundary of the second case's row chunks at s = 2 and 3) and leaves
    // the other rows untouched.
    let batch = |s: u32, half: u32| -> (Vec<u32>, Vec<i32>) {
        let ids = (0..16).map(|i| 8 * s + 60 + (i * 3 + half * 5) % 12).collect();
        (ids, vec![(s % 2) as i32, half as i32])
    };
    // With `nan_grad`, the gradient of the final layer norm's weight becomes NaN before the
    // update, so the optimizer skips the step.
    let small = "ln_f.weight";
    let small_len = weights.get(small).expect("the model has a final layer norm").data.len();
    let run_step = |session: &mut Session<'_>, s: u32, nan_grad: bool| {
        for half in 0..2 {
            if half == 1 && nan_grad {
                assert!(session.write_param_state(small, ".grad", &vec![f32::NAN; small_len]).unwrap());
            }
            let (ids, targets) = batch(s, half);
            session.set_inputs(&StepInputs { ids: &ids, lengths: &[8, 5], targets: &targets });
            session.submit(true, (half == 1).then_some(1e-2 * (1.0 + 0.25 * s as f32)), 0.5).unwrap();
        }
    };
    let step = |session: &mut Session<'_>, s: u32| run_step(session, s, false);
    let names: Vec<String> = weights.tensors.keys().cloned().collect();
    let compare = |a: &Session<'_>, b: &Session<'_>, when: &str| {
        for name in &names {
            let numel = weights.get(name).unwrap().data.len();
            for suffix in ["", ".adam_m", ".adam_v"] {
                let read = |s: &Session<'_>| -> Vec<u32> {
                    let values = if suffix.is_empty() {
                        let mut w = weights.clone();
                        s.download_weights(&mut w).unwrap();
                        w.get(name).unwrap().data.clone()
                    } else {
                        s.read_param_state(name, suffix, numel).unwrap().expect("every weight trains")
                    };
                    values.iter().map(|x| x.to_bits()).collect()
                };
                assert!(read(a) == read(b), "{case}, {when}: `{name}{suffix}` differs between the dense and the flagged update");
            }
        }
    };
    for s in 0..3 {
        step(&mut dense, s);
        step(&mut flagged, s);
    }
    // Forward passes over tokens that no step trains (rows 0..16). Their rows owe the weight
    // decay of every step so far, then, at the second pass, that of the steps since the first
    // (or since the log last emptied).
    let read_ahead = |session: &mut Session<'_>| {
        let ids: Vec<u32> = (0..16).collect();
        session.set_inputs(&StepInputs { ids: &ids, lengths: &[8, 8], targets: &[0, 1] });
        session.submit(false, None, 1.0).unwrap();
        session.read_loss().unwrap().loss.to_bits()
    };
    assert_eq!(read_ahead(&mut dense), read_ahead(&mut flagged), "{case}: the loss over rows that owe decay differs");
    run_step(&mut dense, 3, true);
    run_step(&mut flagged, 3, true);
    step(&mut dense, 4);
    step(&mut flagged, 4);
    assert_eq!(read_ahead(&mut dense), read_ahead(&mut flagged), "{case}: the loss over rows that owe decay since a read differs");
    compare(&dense, &flagged, "after 5 steps");
    if let Some(max_norm) = settings.clip_grad_norm {
        let norm = flagged.read_tensor("grad_norm").unwrap().expect("a clipping session computes the norm")[0];
        // Two micro-batches per step: the clipped norm is that of their mean, half the sum.
        assert!(norm * 0.5 > max_norm, "{case}: the mean gradient's norm {} is below the clipping threshold, so clipping was not tested", norm * 0.5);
    }

    // Resume the dense run's state into a fresh flagged session, then train both on tokens the
    // first steps never used: the rows of the old tokens must still get the full update.
    let mut resumed_weights = weights.clone();
    dense.download_weights(&mut resumed_weights).unwrap();
    let mut resumed = session(&resumed_weights, true);
    for name in &names {
        let numel = weights.get(name).unwrap().data.len();
        for suffix in [".adam_m", ".adam_v"] {
            let values = dense.read_param_state(name, suffix, numel).unwrap().unwrap();
            assert!(resumed.write_param_state(name, suffix, &values).unwrap());
        }
    }
    // The skipped step does not count towards t, which a checkpoint stores.
    let applied = dense.applied_optimizer_steps().unwrap();
    assert_eq!(applied, 4, "{case}: five steps, one skipped");
    resumed.set_optimizer_steps(5, applied);
    for s in 5..7 {
        step(&mut dense, s);
        step(&mut resumed, s);
    }
    compare(&dense, &resumed, "after a resume and 2 more steps");

    // Steps of one micro-batch each, over 8 distinct tokens like the two micro-batches of the
    // step before, but other ones: the device list must change although its length does not.
    for s in 7..9u32 {
        let ids: Vec<u32> = (0..16).map(|i| 8 * s + 40 + i % 8).collect();
        for session in [&mut dense, &mut resumed] {
            session.set_inputs(&StepInputs { ids: &ids, lengths: &[8, 6], targets: &[1, 0] });
            session.submit(true, Some(1e-2), 1.0).unwrap();
        }
    }
    compare(&dense, &resumed, "after two steps that list as many rows as the one before");
}

/// A session that runs each batch on the positions its longest row needs trains and evaluates
/// as one that runs every batch on all T positions. Losses, weights and moments agree up to the
/// order of sums over positions, which on lavapipe does not change either. The batches
/// need 8, 16 and all 20 positions, one step accumulates two micro-batches of different
/// lengths, and the shorter passes must actually run.
#[test]
fn shorter_batches_match_full_length() {
    use crate::data::Batch;
    use crate::graph::executor::OptimizerSettings;
    use crate::graph::Session;
    use crate::model::weights::{init_random, HeadKind};
    use crate::testing::assert_close;

    let Some(gpu) = crate::testing::test_gpu() else { return };
    let config = Gpt2Config { n_layer: 2, n_head: 2, n_embd: 48, n_positions: 32, vocab_size: 128, bos_token_id: None, eos_token_id: None, ..Gpt2Config::mini() };
    let weights = init_random(&config, HeadKind::Classifier { num_labels: 3 }, 11).unwrap();
    let (rows, positions) = (3, 20);
    let head = Head::Classifier { num_labels: 3 };
    let max_binding = gpu.limits().max_storage_buffer_binding_size;
    let settings = OptimizerSettings { clip_grad_norm: Some(1.0), ..OptimizerSettings::default() };
    let session = || {
        let graph = build_graph(&config, head, BatchShape { batch: rows, seq_len: positions }, Trainable::All, max_binding);
        Session::new(gpu, graph, &weights, true, settings).expect("session builds")
    };
    let (mut full, mut short) = (session(), session());
    let builder_config = config.clone();
    short.allow_shorter_batches(
        8,
        Box::new(move |seq_len| build_graph(&builder_config, head, BatchShape { batch: rows, seq_len }, Trainable::All, max_binding)),
    );
    // Token ids from `seed`, with the pad id 127 after each row's end.
    let batch = |lengths: [u32; 3], seed: u32| {
        let mut ids = vec![127u32; rows * positions];
        for (r, &n) in lengths.iter().enumerate() {
            for t in 0..n as usize {
                ids[r * positions + t] = (seed * 37 + (r * 29 + t * 11) as u32) % 120;
            }
        }
        let labels = (0..3).map(|r| ((seed as usize + r) % 3) as i32).collect();
        Batch { ids, lengths: lengths.to_vec(), labels, real: rows, batch_size: rows, seq_len: positions }
    };
    // (lengths, learning rate of the update or none to accumulate, positions the short session
    // must run on)
    let steps: [([u32; 3], Option<f32>, usize); 6] = [
        ([5, 3, 7], Some(1e-2), 8),
        ([9, 2, 4], Some(2e-2), 16),
        ([17, 1, 20], Some(1e-2), 20),
        ([1, 1, 1], None, 8),
        ([12, 16, 3], Some(3e-2), 16),
        ([8, 8, 8], Some(1e-2), 8),
    ];
    for (s, &(lengths, update, expected)) in steps.iter().enumerate() {
        let b = batch(lengths, s as u32);
        let mut losses = Vec::new();
        for session in [&mut full, &mut short] {
            session.set_batch(&b).unwrap();
            session.submit(true, update, if update.is_some() && s == 4 { 0.5 } else { 1.0 }).unwrap();
            losses.push(session.read_loss().unwrap());
        }
        assert_eq!(full.seq_len(), positions);
        assert_eq!(short.seq_len(), expected, "step {s}: the batch with lengths {lengths:?} ran on {} positions", short.seq_len());
        assert_close(&format!("step {s} loss"), &[losses[1].loss], &[f64::from(losses[0].loss)], 1e-6, 1e-5);
        assert_eq!(losses[0].counted, losses[1].counted);
    }
    let (mut a, mut b) = (weights.clone(), weights.clone());
    full.download_weights(&mut a).unwrap();
    short.download_weights(&mut b).unwrap();
    for (name, tensor) in &a.tensors {
        let want: Vec<f64> = tensor.data.iter().map(|&x| f64::from(x)).collect();
        let moved = tensor.data.iter().zip(&weights.get(name).unwrap().data).any(|(x, y)| x != y);
        assert!(moved, "`{name}` did not train");
        assert_close(name, &b.get(name).unwrap().data, &want, 1e-6, 1e-5);
        for suffix in [".adam_m", ".adam_v"] {
            let read = |s: &Session<'_>| s.read_param_state(name, suffix, tensor.data.len()).unwrap().expect("every weight trains");
            let want: Vec<f64> = read(&full).iter().map(|&x| f64::from(x)).collect();
            assert_close(&format!("{name}{suffix}"), &read(&short), &want, 1e-9, 1e-5);
        }
    }
    // Evaluation: a forward pass on 8 positions gives the logits of one on 20.
    let eval = batch([2, 6, 4], 9);
    let mut logits = Vec::new();
    for session in [&mut full, &mut short] {
        session.set_batch(&eval).unwrap();
        session.submit(false, None, 1.0).unwrap();
        logits.push(session.read_logits().unwrap());
    }
    assert_eq!(short.seq_len(), 8);
    let want: Vec<f64> = logits[0].iter().map(|&x| f64::from(x)).collect();
    assert_close("evaluation logits", &logits[1], &want, 1e-6, 1e-5);
}

/// A step whose gradient is NaN is skipped on the device and does not count towards AdamW's t,
/// although the host submits the later steps without reading anything. So the session that met
/// it ends with the weights, moments and t of a session that never ran that step. The test runs
/// with and without clipping, so that both thresholds of the skip are covered.
#[test]
fn skipped_steps_do_not_count() {
    use crate::data::Batch;
    use crate::graph::executor::OptimizerSettings;
    use crate::graph::Session;
    use crate::model::weights::{init_random, HeadKind};

    let Some(gpu) = crate::testing::test_gpu() else { return };
    let config = Gpt2Config { n_layer: 1, n_head: 2, n_embd: 32, n_positions: 16, vocab_size: 96, bos_token_id: None, eos_token_id: None, ..Gpt2Config::mini() };
    let weights = init_random(&config, HeadKind::Classifier { num_labels: 2 }, 3).unwrap();
    let shape = BatchShape { batch: 2, seq_len: 8 };
    let max_binding = gpu.limits().max_storage_buffer_binding_size;
    let batch = |s: u32| {
        let ids = (0..16).map(|i| (s * 13 + i * 7) % 90).collect();
        Batch { ids, lengths: vec![8, 5], labels: vec![(s % 2) as i32, 1], real: 2, batch_size: 2, seq_len: 8 }
    };
    for settings in [OptimizerSettings::default(), OptimizerSettings { clip_grad_norm: Some(0.5), ..OptimizerSettings::default() }] {
        let session = || {
            let graph = build_graph(&config, Head::Classifier { num_labels: 2 }, shape, Trainable::All, max_binding);
            Session::new(gpu, graph, &weights, true, settings).expect("session builds")
        };
        let (mut skipping, mut clean) = (session(), session());
        let small = "ln_f.weight";
        let small_len = weights.get(small).unwrap().data.len();
        for s in 0..5u32 {
            let lr = Some(1e-2 * (1.0 + s as f32));
            skipping.set_batch(&batch(s)).unwrap();
            if s == 2 {
                // The backward adds into the gradient, so the whole step's norm becomes NaN.
                assert!(skipping.write_param_state(small, ".grad", &vec![f32::NAN; small_len]).unwrap());
            } else {
                clean.set_batch(&batch(s)).unwrap();
                clean.submit(true, lr, 1.0).unwrap();
            }
            skipping.submit(true, lr, 1.0).unwrap();
        }
        let case = format!("clip {:?}", settings.clip_grad_norm);
        assert_eq!((skipping.optimizer_steps(), skipping.applied_optimizer_steps().unwrap()), (5, 4), "{case}: submitted and applied steps");
        assert_eq!(clean.applied_optimizer_steps().unwrap(), 4, "{case}");
        let (mut a, mut b) = (weights.clone(), weights.clone());
        skipping.download_weights(&mut a).unwrap();
        clean.download_weights(&mut b).unwrap();
        for (name, tensor) in &a.tensors {
            let bits = |values: &[f32]| values.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
            assert!(bits(&tensor.data) == bits(&b.get(name).unwrap().data), "{case}: `{name}` differs from the run without the skipped step");
            for suffix in [".adam_m", ".adam_v"] {
                let read = |s: &Session<'_>| bits(&s.read_param_state(name, suffix, tensor.data.len()).unwrap().unwrap());
                assert!(read(&skipping) == read(&clean), "{case}: `{name}{suffix}` differs from the run without the skipped step");
            }
        }
    }
}
