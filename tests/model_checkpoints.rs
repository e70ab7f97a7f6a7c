//! Loading the Hugging Face checkpoints in tests/fixtures: two written by transformers 5.25 for
//! the golden tests (prefixed names, no lm_head) and two older random-init GPT-2 checkpoints,
//! one with and one without the `transformer.` prefix.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use shadertune::model::config::Gpt2Config;
use shadertune::model::hub::resolve_model_in;
use shadertune::model::weights::{
    canonical_name, expected_shapes, load, save, HeadKind, LoadError, LoadOptions, SCORE_WEIGHT,
};

fn fixture(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(relative)
}

fn load_dir(
    dir: &str,
    head: HeadKind,
    options: LoadOptions,
) -> Result<(Gpt2Config, shadertune::model::weights::Weights), LoadError> {
    let config = Gpt2Config::from_file(&fixture(dir).join("config.json"))?;
    let weights = load(
        &fixture(dir).join("model.safetensors"),
        &config,
        head,
        options,
    )?;
    Ok((config, weights))
}

/// Returns the tensor names stored in a safetensors file.
fn stored_names(path: &Path) -> BTreeSet<String> {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    file.names().into_iter().map(str::to_string).collect()
}

/// Checks that every loaded tensor equals the stored f32 tensor under its stored name.
fn assert_matches_file(path: &Path, weights: &shadertune::model::weights::Weights) {
    let bytes = std::fs::read(path).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    for (stored, view) in file.tensors() {
        let name = canonical_name(&stored);
        let tensor = weights
            .get(name)
            .unwrap_or_else(|| panic!("`{stored}` in {} was not loaded", path.display()));
        assert_eq!(tensor.shape, view.shape(), "shape of {stored}");
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(tensor.data, values, "values of {stored}");
    }
}

#[test]
fn tiny_lm_checkpoint_loads() {
    let (config, weights) =
        load_dir("tiny_lm", HeadKind::LanguageModel, LoadOptions::default()).unwrap();
    assert_eq!((config.n_layer, config.n_head, config.n_embd), (2, 3, 48));
    assert_eq!((config.vocab_size, config.n_positions), (50257, 64));
    assert_eq!(HeadKind::from_config(&config), HeadKind::LanguageModel);
    assert_eq!(
        weights.tensors.len(),
        expected_shapes(&config, HeadKind::LanguageModel).len()
    );
    assert_eq!(weights.num_params(), config.num_params());
    assert_eq!(weights.get("wte.weight").unwrap().shape, vec![50257, 48]);
    assert_eq!(
        weights.get("h.1.attn.c_attn.weight").unwrap().shape,
        vec![48, 144]
    );
    assert_eq!(
        weights.get("h.0.mlp.c_proj.weight").unwrap().shape,
        vec![192, 48]
    );

    let path = fixture("tiny_lm/model.safetensors");
    let names = stored_names(&path);
    assert!(
        names.iter().all(|n| n.starts_with("transformer.")),
        "{names:?}"
    );
    assert_matches_file(&path, &weights);
    // The noise added by the fixture script makes layer norms differ from (1, 0).
    let ln = &weights.get("h.0.ln_1.weight").unwrap().data;
    assert!(
        ln.iter().any(|&v| v != 1.0),
        "h.0.ln_1.weight is still all ones"
    );
}

#[test]
fn tiny_cls_checkpoint_loads() {
    let config = Gpt2Config::from_file(&fixture("tiny_cls/config.json")).unwrap();
    let head = HeadKind::from_config(&config);
    assert_eq!(head, HeadKind::Classifier { num_labels: 3 });
    assert_eq!(config.pad_token_id, Some(50256));
    assert_eq!(config.id2label.as_ref().unwrap()[&2], "positive");
    assert_eq!(
        config.architectures.as_deref(),
        Some(&["GPT2ForSequenceClassification".to_string()][..])
    );

    let path = fixture("tiny_cls/model.safetensors");
    let weights = load(&path, &config, head, LoadOptions::default()).unwrap();
    assert_eq!(weights.get(SCORE_WEIGHT).unwrap().shape, vec![3, 48]);
    assert_eq!(weights.num_params(), config.num_params());
    assert!(
        stored_names(&path).contains(SCORE_WEIGHT),
        "score.weight must be stored without prefix"
    );
    assert_matches_file(&path, &weights);
}

#[test]
fn classifier_file_as_lm_is_rejected() {
    let mut config = Gpt2Config::from_file(&fixture("tiny_cls/config.json")).unwrap();
    config.num_labels = None;
    config.id2label = None;
    config.label2id = None;
    config.architectures = Some(vec!["GPT2LMHeadModel".to_string()]);
    let err = load(
        &fixture("tiny_cls/model.safetensors"),
        &config,
        HeadKind::LanguageModel,
        LoadOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, LoadError::UnknownTensor { ref name, .. } if name == SCORE_WEIGHT),
        "{err:?}"
    );
}

#[test]
fn pretrained_lm_as_classifier_needs_option() {
    let head = HeadKind::Classifier { num_labels: 2 };
    let err = load_dir("tiny_lm", head, LoadOptions::default()).unwrap_err();
    assert!(
        matches!(err, LoadError::MissingTensor { ref name, .. } if name == SCORE_WEIGHT),
        "{err:?}"
    );
    let (_, weights) = load_dir(
        "tiny_lm",
        head,
        LoadOptions {
            allow_missing_head: true,
        },
    )
    .unwrap();
    assert!(weights.get(SCORE_WEIGHT).is_none());
    assert!(weights.get("ln_f.bias").is_some());
}

#[test]
fn prefixed_release_checkpoint_loads() {
    let (config, weights) = load_dir(
        "hf_fake_gpt2",
        HeadKind::LanguageModel,
        LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(
        (
            config.n_layer,
            config.n_head,
            config.n_embd,
            config.n_positions
        ),
        (1, 1, 2, 1024)
    );
    assert_eq!(weights.get("wte.weight").unwrap().shape, vec![50257, 2]);
    assert_eq!(
        weights.get("h.0.attn.c_attn.weight").unwrap().shape,
        vec![2, 6]
    );
    assert_eq!(
        weights.get("h.0.mlp.c_fc.weight").unwrap().shape,
        vec![2, 8]
    );
    assert_eq!(weights.num_params(), config.num_params());

    let path = fixture("hf_fake_gpt2/model.safetensors");
    assert!(stored_names(&path)
        .iter()
        .all(|n| n.starts_with("transformer.")));
    assert_matches_file(&path, &weights);

    // Unknown fields of this transformers 4.36 config survive parsing.
    assert_eq!(config.extra["_name_or_path"], "fake-gpt2");
}

#[test]
fn unprefixed_checkpoint_loads() {
    let (config, weights) = load_dir(
        "hf_tiny_gpt2_vocab21",
        HeadKind::LanguageModel,
        LoadOptions::default(),
    )
    .unwrap();
    assert_eq!(config.vocab_size, 21);
    assert_eq!(config.eos_token_id, Some(20));
    assert_eq!(weights.get("wte.weight").unwrap().shape, vec![21, 2]);
    assert_eq!(weights.get("wpe.weight").unwrap().shape, vec![1024, 2]);
    let path = fixture("hf_tiny_gpt2_vocab21/model.safetensors");
    assert!(stored_names(&path)
        .iter()
        .all(|n| !n.starts_with("transformer.")));
    assert_matches_file(&path, &weights);
}

#[test]
fn saved_checkpoint_matches_transformers_names() {
    for dir in ["tiny_lm", "tiny_cls"] {
        let config = Gpt2Config::from_file(&fixture(dir).join("config.json")).unwrap();
        let head = HeadKind::from_config(&config);
        let original = fixture(dir).join("model.safetensors");
        let weights = load(&original, &config, head, LoadOptions::default()).unwrap();

        let out = tempfile::tempdir().unwrap();
        let path = out.path().join("model.safetensors");
        save(&path, &weights, &config, true).unwrap();
        config.save(out.path()).unwrap();
        assert_eq!(
            stored_names(&path),
            stored_names(&original),
            "{dir}: stored names differ from transformers'"
        );
        assert_matches_file(&path, &weights);

        let resolved = resolve_model_in(out.path().to_str().unwrap(), &[]).unwrap();
        let reloaded_config = Gpt2Config::from_file(&resolved.join("config.json")).unwrap();
        assert_eq!(reloaded_config, config, "{dir}: config changed on save");
        let reloaded = load(
            &resolved.join("model.safetensors"),
            &reloaded_config,
            head,
            LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(reloaded, weights, "{dir}: weights changed on save");
    }
}

#[test]
fn fixture_dirs_resolve() {
    for dir in [
        "tiny_lm",
        "tiny_cls",
        "hf_fake_gpt2",
        "hf_tiny_gpt2_vocab21",
    ] {
        let path = fixture(dir);
        assert_eq!(resolve_model_in(path.to_str().unwrap(), &[]).unwrap(), path);
    }
}

#[test]
fn released_124m_config_parses() {
    let config = Gpt2Config::from_file(&fixture("gpt2_124M_config.json")).unwrap();
    let small = Gpt2Config::small();
    assert_eq!(
        (
            config.n_layer,
            config.n_head,
            config.n_embd,
            config.vocab_size,
            config.n_positions
        ),
        (
            small.n_layer,
            small.n_head,
            small.n_embd,
            small.vocab_size,
            small.n_positions
        )
    );
    assert_eq!(config.layer_norm_epsilon, 1e-5);
    assert_eq!(config.activation_function, "gelu_new");
    // Parameter count of the released checkpoint, 124,439,808.
    assert_eq!(config.num_params(), 124_439_808);
}

/// The bundled default model is a pretrained language model stored in f16: it loads as one and
/// as the body of a classifier, and its weights are not the random initialisation.
#[test]
fn bundled_model_is_pretrained() {
    let dir = shadertune::model::load::default_model_dir();
    let lm = shadertune::model::load::open_language_model(&dir, 0).expect("the bundled model loads");
    assert!(!lm.random_init, "{} has no weights", dir.display());
    let random = shadertune::model::weights::init_random(&lm.config, HeadKind::LanguageModel, 0).unwrap();
    let wte = &lm.weights.tensors["wte.weight"];
    assert_eq!(wte.shape, vec![50257, 128]);
    assert!(wte.data.iter().all(|x| x.is_finite()));
    assert_ne!(wte.data, random.tensors["wte.weight"].data);
    let classifier = shadertune::model::load::open_classifier(&dir, 2, 0).expect("the bundled model opens as a classifier");
    assert!(!classifier.random_init);
    assert!(classifier.new_head);
    let pretrain: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("pretrain.json")).unwrap()).unwrap();
    let losses: Vec<f64> = pretrain["history"].as_array().unwrap().iter().map(|r| r["val_loss"].as_f64().unwrap()).collect();
    assert!(losses.len() >= 6, "too few validation passes recorded: {losses:?}");
    assert!(losses[..6].windows(2).all(|w| w[1] < w[0]), "validation loss did not fall at each of the first passes: {losses:?}");
    let last = losses[losses.len() - 1];
    assert!(last < losses[1], "the final validation loss {last} is not below the first pass after step 0: {losses:?}");
    // Tokens absent from the corpus were re-drawn (`pretrain --redraw-unseen`).
    assert_eq!(pretrain["settings"]["redraw_unseen"], serde_json::Value::Bool(true));
    assert!(pretrain["redrawn"]["tokens"].as_u64().is_some_and(|n| n > 0), "no re-drawn rows recorded: {}", pretrain["redrawn"]);
    // The recorded corpus paths are relative to the repository, so the command reads the same anywhere.
    for path in pretrain["settings"]["corpus"].as_array().unwrap() {
        let path = path.as_str().unwrap();
        assert!(path.starts_with("assets/corpus/"), "corpus path {path} is not relative to the repository");
    }
}
