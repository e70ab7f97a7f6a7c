//! Property tests that feed arbitrary bytes and mutated files to every reader of user files:
//! labelled data, `config.json`, `model.safetensors`, training checkpoints and LoRA adapters.
//!
//! Each reader must return `Ok` or `Err` and never panic, and no single allocation may exceed
//! [`allocation_limit`] of the input size, so a header that claims a huge size is rejected
//! before anything is allocated for it. An `Ok` result is checked against the reader's own
//! guarantees.
//!
//! By default each property runs a fixed number of cases, a few seconds in a release build.
//! With `SHADERTUNE_FUZZ_SECONDS=N` each property runs for N seconds instead, in batches of
//! [`BATCH_CASES`] cases with a fresh seed per batch, and prints its case count. A failure
//! prints the seed of its batch, and `SHADERTUNE_FUZZ_SEED` set to that seed replays the batch.
//!
//! ```text
//! SHADERTUNE_FUZZ_SECONDS=600 cargo test --release --test fuzz_inputs -- --nocapture --test-threads 1
//! ```

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use shadertune::data::{read_labelled, ColumnSpec, DataFormat, ReadOptions};
use shadertune::model::config::Gpt2Config;
use shadertune::model::weights::{self, HeadKind, LoadOptions};
use shadertune::train::checkpoint::{self, TrainState};

// ---------------------------------------------------------------------------------------------
// Allocation tracking
// ---------------------------------------------------------------------------------------------

/// The system allocator, recording the largest single request of each thread.
struct TrackingAllocator;

thread_local! {
    /// Largest allocation or reallocation request of this thread, in bytes, since the last
    /// reset. A `const` initializer and a `Cell` without destructor keep the allocator from
    /// allocating when it touches this.
    static LARGEST_REQUEST: Cell<usize> = const { Cell::new(0) };
}

fn record_request(bytes: usize) {
    // `try_with` fails only while the thread is being torn down, and those requests are not
    // measured.
    let _ = LARGEST_REQUEST.try_with(|largest| {
        if bytes > largest.get() {
            largest.set(bytes);
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the `GlobalAlloc`
// contract. Recording a size neither allocates nor touches the memory.
unsafe impl GlobalAlloc for TrackingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record_request(layout.size());
        // SAFETY: the caller upholds `alloc`'s contract, which `System.alloc` shares.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record_request(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record_request(new_size);
        // SAFETY: `ptr` and `layout` come from this allocator, which is `System` underneath.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as for `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: TrackingAllocator = TrackingAllocator;

/// Runs `read` and returns its result with the largest single allocation it requested.
fn with_largest_allocation<R>(read: impl FnOnce() -> R) -> (R, usize) {
    LARGEST_REQUEST.with(|largest| largest.set(0));
    let result = read();
    (result, LARGEST_REQUEST.with(Cell::get))
}

/// Allocation that any read may make whatever its input: I/O and parser buffers, error messages,
/// and the bookkeeping of a few dozen tensors.
const ALLOCATION_SLACK_BYTES: usize = 1 << 20;

/// Bytes per input byte that a read may allocate at once. The largest per-byte cost is the
/// index of a TSV line made only of tabs: a 16-byte `&str` per field, and Vec growth can double
/// that.
const ALLOCATION_BYTES_PER_INPUT_BYTE: usize = 64;

/// Returns the largest single allocation that an input of `input_bytes` justifies.
fn allocation_limit(input_bytes: usize) -> usize {
    ALLOCATION_SLACK_BYTES + ALLOCATION_BYTES_PER_INPUT_BYTE * input_bytes
}

fn check_allocation(largest: usize, input_bytes: usize) -> Result<(), TestCaseError> {
    prop_assert!(
        largest <= allocation_limit(input_bytes),
        "a read of {input_bytes} input bytes allocated {largest} bytes at once, more than the limit of {}",
        allocation_limit(input_bytes)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Runner
// ---------------------------------------------------------------------------------------------

/// Environment variable that switches from fixed case counts to a time budget in seconds.
const FUZZ_SECONDS_VAR: &str = "SHADERTUNE_FUZZ_SECONDS";

/// Environment variable that sets the seed of the first batch.
const FUZZ_SEED_VAR: &str = "SHADERTUNE_FUZZ_SEED";

/// Cases per seed when running for a time budget.
const BATCH_CASES: u32 = 256;

thread_local! {
    /// Cases of the running property whose input the reader accepted, to show how deep the
    /// inputs reach.
    static ACCEPTED_CASES: Cell<u64> = const { Cell::new(0) };
}

/// Counts one input that the reader accepted.
fn note_accepted() {
    ACCEPTED_CASES.with(|count| count.set(count.get() + 1));
}

/// Bytes that print as a Rust byte-string literal, so a failing input can be pasted into a
/// regression test.
#[derive(Clone, PartialEq, Eq)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

/// Expands a 64-bit seed into the 32-byte ChaCha seed that proptest needs, with the SplitMix64
/// generator and its usual constants.
fn chacha_seed(seed: u64) -> [u8; 32] {
    let mut state = seed;
    let mut bytes = [0u8; 32];
    for chunk in bytes.chunks_exact_mut(8) {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        chunk.copy_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    bytes
}

fn env_u64(name: &str) -> Option<u64> {
    let text = std::env::var(name).ok()?;
    let value = text.trim().parse().unwrap_or_else(|_| panic!("{name}={text} is not a whole number"));
    Some(value)
}

/// Runs `property` on values of `strategy`: `default_cases` cases, or batches of
/// [`BATCH_CASES`] with fresh seeds until [`FUZZ_SECONDS_VAR`] seconds have passed. Panics
/// with the seed and the shrunk input on the first failure, and returns the number of cases run.
fn check_property<S>(name: &str, default_cases: u32, strategy: S, property: impl Fn(S::Value) -> Result<(), TestCaseError>) -> u64
where
    S: Strategy,
    S::Value: fmt::Debug,
{
    let budget = env_u64(FUZZ_SECONDS_VAR).map(Duration::from_secs);
    let started = Instant::now();
    let mut seed = env_u64(FUZZ_SEED_VAR).unwrap_or_else(|| {
        let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        since_epoch.as_nanos() as u64
    });
    ACCEPTED_CASES.with(|count| count.set(0));
    let cases = Cell::new(0u64);
    let counted = |value: S::Value| {
        cases.set(cases.get() + 1);
        property(value)
    };
    loop {
        let config = Config {
            cases: if budget.is_some() { BATCH_CASES } else { default_cases },
            failure_persistence: None,
            ..Config::default()
        };
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &chacha_seed(seed));
        let mut runner = TestRunner::new_with_rng(config, rng);
        if let Err(error) = runner.run(&strategy, &counted) {
            panic!("{name} failed; replay the batch with {FUZZ_SEED_VAR}={seed}\n{error}");
        }
        match budget {
            Some(budget) if started.elapsed() < budget => seed = seed.wrapping_add(1),
            _ => break,
        }
    }
    let total = cases.get();
    let accepted = ACCEPTED_CASES.with(Cell::get);
    eprintln!("{name}: {total} cases ({accepted} accepted) in {:.1} s", started.elapsed().as_secs_f64());
    total
}

// ---------------------------------------------------------------------------------------------
// Byte mutations
// ---------------------------------------------------------------------------------------------

/// One edit of a file's bytes. Positions are taken modulo the length, so any edit applies to any
/// file.
#[derive(Clone, Debug)]
enum Edit {
    /// Replace the byte at a position.
    Set(usize, u8),
    /// Insert bytes before a position.
    Insert(usize, Bytes),
    /// Remove up to this many bytes from a position.
    Remove(usize, usize),
    /// Keep only the first (position mod length + 1) bytes.
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Set(at, byte)),
        2 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(at, bytes)| Edit::Insert(at, Bytes(bytes))),
        2 => (any::<usize>(), 1..16usize).prop_map(|(at, count)| Edit::Remove(at, count)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn apply_edits(bytes: &mut Vec<u8>, edits: &[Edit]) {
    for edit in edits {
        if bytes.is_empty() {
            if let Edit::Insert(_, inserted) = edit {
                bytes.extend_from_slice(&inserted.0);
            }
            continue;
        }
        let position = |at: usize| at % bytes.len();
        match edit {
            Edit::Set(at, byte) => {
                let at = position(*at);
                bytes[at] = *byte;
            }
            Edit::Insert(at, inserted) => {
                let at = position(*at);
                bytes.splice(at..at, inserted.0.iter().copied());
            }
            Edit::Remove(at, count) => {
                let at = position(*at);
                let end = (at + count).min(bytes.len());
                bytes.drain(at..end);
            }
            Edit::Truncate(at) => {
                let keep = position(*at) + 1;
                bytes.truncate(keep);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (a) Labelled data readers
// ---------------------------------------------------------------------------------------------

/// Fragments that the data readers treat specially: separators, quotes, line endings, a
/// byte-order mark, JSON punctuation, Unicode line separators and a byte that is never UTF-8.
const DATA_FRAGMENTS: [&str; 30] = [
    "ham", "spam", "0", "1", "text", "label", "Text", " label ", "hello world", " ", "\t", ",", "\"", "\"\"", "\n",
    "\r\n", "\r", "\u{feff}", "{", "}", ":", "[", "]", "null", "true", "\\", "é", "\u{2028}", "\u{85}", "\"text\":",
];

fn data_fragment() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => prop::sample::select(DATA_FRAGMENTS.to_vec()).prop_map(|s| s.as_bytes().to_vec()),
        1 => Just(vec![0xff]),
        1 => prop::collection::vec(any::<u8>(), 0..6),
    ]
}

/// A short label or text built from fragments.
fn data_field() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!["ham", "spam", "0", "1", " ", "a", "b", "\t", ",", "\"", "é", "\r"]),
        0..4,
    )
    .prop_map(|parts| parts.concat())
}

/// File extensions that name a format, and one that names none.
const DATA_EXTENSIONS: [&str; 6] = ["tsv", "csv", "jsonl", "txt", "json", "dat"];

/// Rows in one of the three formats as a user's tool would write them, with the matching
/// extension, so that most of them parse and the edits afterwards reach deep code paths.
fn well_formed_rows() -> impl Strategy<Value = (Vec<u8>, &'static str)> {
    let label = prop::sample::select(vec!["ham", "spam", "0", "1", " spam "]);
    let rows = prop::collection::vec((label, data_field()), 1..12);
    (rows, 0..3usize, any::<bool>(), any::<bool>()).prop_map(|(rows, format, crlf, bom)| {
        let mut text = String::new();
        if bom {
            text.push('\u{feff}');
        }
        let newline = if crlf { "\r\n" } else { "\n" };
        // A row number keeps the texts distinct, so a TSV label column can be told apart.
        let rows: Vec<(&str, String)> = rows.iter().enumerate().map(|(i, (label, body))| (*label, format!("{body} {i}"))).collect();
        let extension = match format {
            0 => {
                for (label, body) in &rows {
                    text.push_str(&format!("{label}\t{body}{newline}"));
                }
                "tsv"
            }
            1 => {
                text.push_str(&format!("text,label{newline}"));
                let quote = |field: &str| format!("\"{}\"", field.replace('"', "\"\""));
                for (label, body) in &rows {
                    text.push_str(&format!("{},{}{newline}", quote(body), quote(label)));
                }
                "csv"
            }
            _ => {
                for (label, body) in &rows {
                    text.push_str(&json!({"text": body, "label": label}).to_string());
                    text.push_str(newline);
                }
                "jsonl"
            }
        };
        (text.into_bytes(), extension)
    })
}

/// Zero edits half of the time, so that valid inputs are common, and one to three otherwise.
fn few_edits() -> impl Strategy<Value = Vec<Edit>> {
    prop_oneof![Just(Vec::new()), prop::collection::vec(edit(), 1..4)]
}

/// A data file and its extension.
fn data_file() -> impl Strategy<Value = (Bytes, &'static str)> {
    let extension = prop::sample::select(DATA_EXTENSIONS.to_vec());
    let raw = (prop::collection::vec(any::<u8>(), 0..512), extension.clone());
    let fragments = (prop::collection::vec(data_fragment(), 0..64).prop_map(|parts| parts.concat()), extension.clone());
    let mutated = (well_formed_rows(), few_edits(), prop::option::weighted(0.2, extension)).prop_map(
        |((mut bytes, own_extension), edits, other_extension)| {
            apply_edits(&mut bytes, &edits);
            (bytes, other_extension.unwrap_or(own_extension))
        },
    );
    prop_oneof![1 => raw, 2 => fragments, 4 => mutated].prop_map(|(bytes, extension)| (Bytes(bytes), extension))
}

fn column_spec() -> impl Strategy<Value = Option<ColumnSpec>> {
    let name = prop::sample::select(vec!["text", "label", "Text", " label", "nope", "", "\t"]);
    let index = prop_oneof![0..4usize, Just(usize::MAX), any::<usize>()];
    prop_oneof![
        4 => Just(None),
        1 => name.prop_map(|n| Some(ColumnSpec::Name(n.to_string()))),
        1 => index.prop_map(|i| Some(ColumnSpec::Index(i))),
    ]
}

fn read_options() -> impl Strategy<Value = ReadOptions> {
    let format = prop::option::weighted(
        0.2,
        prop::sample::select(vec![DataFormat::Tsv, DataFormat::Csv, DataFormat::Jsonl]),
    );
    let header = prop::option::weighted(0.3, any::<bool>());
    (format, column_spec(), column_spec(), header).prop_map(|(format, text_column, label_column, tsv_header)| ReadOptions {
        format,
        text_column,
        label_column,
        tsv_header,
    })
}

/// Checks what [`read_labelled`] promises about a dataset it returns.
fn check_dataset(dataset: &shadertune::data::Dataset, path: &Path, bytes: &[u8]) -> Result<(), TestCaseError> {
    let lines = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
    prop_assert!(!dataset.examples.is_empty());
    prop_assert_eq!(dataset.rows_read, dataset.examples.len());
    prop_assert!(dataset.label_names.len() >= 2, "labels {:?}", dataset.label_names);
    prop_assert!(dataset.label_names.windows(2).all(|pair| pair[0] < pair[1]), "labels not sorted: {:?}", dataset.label_names);
    let names: Vec<&String> = dataset.rows_per_label.keys().collect();
    prop_assert_eq!(names, dataset.label_names.iter().collect::<Vec<_>>());
    prop_assert_eq!(dataset.rows_per_label.values().sum::<usize>(), dataset.rows_read);
    prop_assert_eq!(&dataset.files, &vec![path.to_path_buf()]);
    for example in &dataset.examples {
        prop_assert!(!example.label.is_empty());
        prop_assert_eq!(example.label.trim(), example.label.as_str());
        prop_assert!(!example.label.starts_with('\u{feff}'), "label {:?} kept the byte-order mark", example.label);
        prop_assert!(dataset.label_names.contains(&example.label));
        prop_assert!(example.line >= 1 && example.line <= lines, "line {} of a {lines}-line file", example.line);
        prop_assert_eq!(&*example.file, path);
    }
    Ok(())
}

#[test]
fn data_readers_survive_arbitrary_files() {
    let dir = tempfile::tempdir().unwrap();
    check_property("data readers", 1500, (data_file(), read_options()), |((bytes, extension), options)| {
        let path = dir.path().join(format!("data.{extension}"));
        std::fs::write(&path, &bytes.0).unwrap();
        let (result, largest) = with_largest_allocation(|| read_labelled(&path, &options));
        check_allocation(largest, bytes.0.len())?;
        match result {
            Ok(dataset) => {
                note_accepted();
                check_dataset(&dataset, &path, &bytes.0)
            }
            Err(error) => {
                let message = error.to_string();
                prop_assert!(message.contains(&path.display().to_string()), "the error does not name the file: {message}");
                Ok(())
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// (b) Config reader
// ---------------------------------------------------------------------------------------------

/// A valid config of the kind a user writes to train from scratch.
fn base_config() -> Value {
    json!({
        "model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "n_positions": 16,
        "vocab_size": 50257, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
        "bos_token_id": 50256, "eos_token_id": 50256
    })
}

/// Fields whose values the config reader interprets, plus two it only carries along.
const CONFIG_FIELDS: [&str; 21] = [
    "n_layer", "n_head", "n_embd", "vocab_size", "n_positions", "n_inner", "layer_norm_epsilon", "activation_function",
    "model_type", "initializer_range", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "bos_token_id",
    "eos_token_id", "pad_token_id", "num_labels", "id2label", "label2id", "architectures", "n_ctx", "summary_type",
];

/// JSON values of every type, biased to the edges of the sizes a config holds.
fn json_value() -> impl Strategy<Value = Value> {
    let number = prop_oneof![
        (0u64..70).prop_map(Value::from),
        prop::sample::select(vec![0u64, 1, 2, 3, 768, 50256, 50257, 1 << 32, 1 << 40, u64::MAX]).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("JSON has no NaN or infinity", |v| v.is_finite()).prop_map(Value::from),
    ];
    let text = prop::sample::select(vec!["gpt2", "gelu_new", "gelu", "relu", "", "0", "GPT2ForSequenceClassification", "x"])
        .prop_map(Value::from);
    let leaf = prop_oneof![Just(Value::Null), any::<bool>().prop_map(Value::from), number, text];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(prop::sample::select(vec!["0", "1", "2", "7", "x", "a", "b"]), inner, 0..4).prop_map(
                |map| Value::Object(map.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            ),
        ]
    })
}

/// A change to one field of [`base_config`]: a new value, or removal.
fn field_change() -> impl Strategy<Value = (&'static str, Option<Value>)> {
    (prop::sample::select(CONFIG_FIELDS.to_vec()), prop::option::weighted(0.85, json_value()))
}

/// Config text: arbitrary bytes read as UTF-8 with replacement, fragments of JSON, or a valid
/// config with changed fields, possibly edited as bytes afterwards.
fn config_text() -> impl Strategy<Value = String> {
    let raw = prop::collection::vec(any::<u8>(), 0..256).prop_map(|b| String::from_utf8_lossy(&b).into_owned());
    let structured = (prop::collection::vec(field_change(), 0..6), few_edits()).prop_map(|(changes, edits)| {
        let mut config = base_config();
        let fields = config.as_object_mut().unwrap();
        for (field, value) in changes {
            match value {
                Some(value) => fields.insert(field.to_string(), value),
                None => fields.remove(field),
            };
        }
        let mut bytes = config.to_string().into_bytes();
        apply_edits(&mut bytes, &edits);
        String::from_utf8_lossy(&bytes).into_owned()
    });
    prop_oneof![1 => raw, 4 => structured]
}

/// Relative difference allowed between a float and its value after a save and a reload: 2^-51,
/// two units in the last place of an f64. serde_json 1.0 without its `float_roundtrip`
/// feature parses some decimal numbers 1 unit in the last place away from the nearest f64, so
/// a float can move by that much each time a config is loaded.
const FLOAT_ROUND_TRIP_TOLERANCE: f64 = 1.0 / (1u64 << 51) as f64;

/// Returns whether two JSON values are equal, with floats compared within
/// [`FLOAT_ROUND_TRIP_TOLERANCE`].
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x == y || (x - y).abs() <= FLOAT_ROUND_TRIP_TOLERANCE * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(key, value)| y.get(key).is_some_and(|other| same_json(value, other)))
        }
        _ => a == b,
    }
}

/// Checks what a validated config promises and that it survives a save and a reload.
fn check_config(config: &Gpt2Config, dir: &Path) -> Result<(), TestCaseError> {
    prop_assert!(config.validate().is_ok());
    prop_assert_eq!(config.n_embd % config.n_head, 0);
    prop_assert_eq!(config.head_size() * config.n_head, config.n_embd);
    prop_assert!(config.num_params() < usize::MAX);
    config.save(dir).unwrap();
    let reloaded = Gpt2Config::from_file(&dir.join("config.json"));
    prop_assert!(reloaded.is_ok(), "a saved config does not load again: {:?}", reloaded.err());
    let (before, after) = (serde_json::to_value(config).unwrap(), serde_json::to_value(reloaded.unwrap()).unwrap());
    prop_assert!(same_json(&before, &after), "a saved config changed on reload:\n{before}\n{after}");
    Ok(())
}

#[test]
fn config_reader_survives_arbitrary_json() {
    let dir = tempfile::tempdir().unwrap();
    check_property("config reader", 4000, config_text(), |text| {
        let (result, largest) = with_largest_allocation(|| Gpt2Config::from_json_str(&text));
        check_allocation(largest, text.len())?;
        match result {
            Ok(config) => {
                note_accepted();
                check_config(&config, dir.path())
            }
            Err(error) => {
                prop_assert!(!error.to_string().is_empty());
                Ok(())
            }
        }
    });
}

#[test]
fn config_file_reader_survives_arbitrary_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("input").join("config.json");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        (config_text(), few_edits()).prop_map(|(text, edits)| {
            let mut bytes = text.into_bytes();
            apply_edits(&mut bytes, &edits);
            bytes
        }),
    ];
    check_property("config file reader", 1000, bytes.prop_map(Bytes), |bytes| {
        std::fs::write(&path, &bytes.0).unwrap();
        let (result, largest) = with_largest_allocation(|| Gpt2Config::from_file(&path));
        check_allocation(largest, bytes.0.len())?;
        match result {
            Ok(config) => {
                note_accepted();
                check_config(&config, dir.path())
            }
            Err(error) => {
                prop_assert!(!error.to_string().is_empty());
                Ok(())
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// (c) Safetensors loading
// ---------------------------------------------------------------------------------------------

/// A GPT-2-shaped model small enough that a whole file is a few kilobytes: 10 tokens, 4
/// channels, 1 layer, 8 positions.
fn tiny_config() -> Gpt2Config {
    Gpt2Config::from_json_str(
        r#"{"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 4, "n_positions": 8,
            "vocab_size": 10, "bos_token_id": 9, "eos_token_id": 9}"#,
    )
    .unwrap()
}

/// [`tiny_config`] as a two-class classifier. `Gpt2Config::to_classifier` would set the GPT-2
/// padding id 50256, which a 10-token vocabulary lacks, so the fields are set here with the
/// model's own end-of-text id 9.
fn classifier_config() -> Gpt2Config {
    let mut config = tiny_config();
    config.num_labels = Some(2);
    config.id2label = Some([(0, "ham".to_string()), (1, "spam".to_string())].into());
    config.label2id = Some([("ham".to_string(), 0), ("spam".to_string(), 1)].into());
    config.pad_token_id = Some(9);
    config.architectures = Some(vec!["GPT2ForSequenceClassification".to_string()]);
    config.validate().unwrap();
    config
}

/// The bytes of a valid `model.safetensors` for `config`, as `shadertune` writes it.
fn valid_weights_file(config: &Gpt2Config, dir: &Path) -> Vec<u8> {
    let head = HeadKind::from_config(config);
    let initial = weights::init_random(config, head, 5).unwrap();
    let path = dir.join("template.safetensors");
    weights::save(&path, &initial, config, true).unwrap();
    std::fs::read(&path).unwrap()
}

/// Tensor names: every parameter of the tiny model with and without prefix, plus names the
/// loader must skip or reject.
fn tensor_name() -> impl Strategy<Value = String> {
    let mut names: Vec<String> = weights::expected_shapes(&classifier_config(), HeadKind::Classifier { num_labels: 2 })
        .into_iter()
        .flat_map(|(name, _)| [format!("transformer.{name}"), name])
        .collect();
    for extra in ["lm_head.weight", "h.0.attn.bias", "h.0.attn.masked_bias", "h.7.ln_1.weight", "h.01.ln_1.weight", "__metadata__", ""] {
        names.push(extra.to_string());
    }
    prop::sample::select(names)
}

/// A dimension: small, or large enough that its product with another overflows or claims
/// terabytes.
fn dimension() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 0u64..16,
        1 => prop::sample::select(vec![1u64 << 20, 1 << 32, 1 << 40, 1 << 62, u64::MAX]),
        1 => any::<u64>(),
    ]
}

/// One header entry: name, dtype (valid or not) and shape. Offsets are chosen later.
fn header_entry() -> impl Strategy<Value = (String, &'static str, Vec<u64>)> {
    let dtype = prop::sample::select(vec!["F32", "F16", "BF16", "I32", "U8", "BOOL", "F64", "I64", "F8_E4M3", "X"]);
    (tensor_name(), dtype, prop::collection::vec(dimension(), 0..4))
}

/// How the data offsets of the header relate to the shapes.
#[derive(Clone, Copy, Debug)]
enum Offsets {
    /// Back to back, each as long as its dtype and shape say.
    Consistent,
    /// Random pairs, often huge or reversed.
    Arbitrary(u64, u64),
}

/// How the 8-byte header length field relates to the header.
#[derive(Clone, Copy, Debug)]
enum HeaderLength {
    Exact,
    Claimed(u64),
    Off(i8),
}

fn element_bytes(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" => 8,
        "F32" | "I32" => 4,
        "F16" | "BF16" => 2,
        _ => 1,
    }
}

/// Builds a file from header entries, with the data length the offsets claim (capped at 4 KiB,
/// so a claim of terabytes leaves the file short).
fn crafted_file(entries: &[(String, &'static str, Vec<u64>)], offsets: Offsets, length: HeaderLength, data_fill: u8) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut end = 0u64;
    for (index, (name, dtype, shape)) in entries.iter().enumerate() {
        let (start, stop) = match offsets {
            Offsets::Consistent => {
                let bytes = shape.iter().fold(element_bytes(dtype), |acc, &d| acc.saturating_mul(d));
                let start = end;
                end = end.saturating_add(bytes);
                (start, end)
            }
            Offsets::Arbitrary(a, b) => {
                let (start, stop) = (a.rotate_left(index as u32), b.rotate_right(index as u32));
                end = end.max(stop);
                (start, stop)
            }
        };
        let entry = if name == "__metadata__" {
            json!({"format": "pt"})
        } else {
            json!({"dtype": dtype, "shape": shape, "data_offsets": [start, stop]})
        };
        header.insert(name.clone(), entry);
    }
    let header = Value::Object(header).to_string().into_bytes();
    let length_field = match length {
        HeaderLength::Exact => header.len() as u64,
        HeaderLength::Claimed(claimed) => claimed,
        HeaderLength::Off(delta) => (header.len() as u64).wrapping_add_signed(i64::from(delta)),
    };
    let data_len = end.min(4096) as usize;
    let mut file = length_field.to_le_bytes().to_vec();
    file.extend_from_slice(&header);
    file.extend(std::iter::repeat_n(data_fill, data_len));
    file
}

/// What a fuzzed safetensors file is made from.
#[derive(Clone, Debug)]
enum WeightsInput {
    /// Arbitrary bytes.
    Raw(Bytes),
    /// A header built from entries, with chosen offsets and length field.
    Crafted {
        entries: Vec<(String, &'static str, Vec<u64>)>,
        offsets: Offsets,
        length: HeaderLength,
        data_fill: u8,
    },
    /// A valid file of the tiny model (classifier or not), then edited.
    Edited { classifier: bool, edits: Vec<Edit> },
}

fn weights_input() -> impl Strategy<Value = WeightsInput> {
    let offsets = prop_oneof![
        3 => Just(Offsets::Consistent),
        1 => (dimension(), dimension()).prop_map(|(a, b)| Offsets::Arbitrary(a, b)),
    ];
    let length = prop_oneof![
        4 => Just(HeaderLength::Exact),
        1 => prop::sample::select(vec![0u64, 1 << 20, 1 << 32, 1 << 60, u64::MAX]).prop_map(HeaderLength::Claimed),
        1 => any::<i8>().prop_map(HeaderLength::Off),
    ];
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..256).prop_map(|b| WeightsInput::Raw(Bytes(b))),
        3 => (prop::collection::vec(header_entry(), 0..6), offsets, length, any::<u8>()).prop_map(|(entries, offsets, length, data_fill)| {
            WeightsInput::Crafted { entries, offsets, length, data_fill }
        }),
        3 => (any::<bool>(), few_edits()).prop_map(|(classifier, edits)| WeightsInput::Edited { classifier, edits }),
    ]
}

/// The config a fuzzed file is loaded with: the tiny model, or one that claims far more layers,
/// tokens or positions than any file holds.
fn load_config() -> impl Strategy<Value = (Gpt2Config, HeadKind)> {
    let claims = prop_oneof![
        4 => Just((1usize, 10usize, 8usize)),
        1 => prop::sample::select(vec![(1 << 20, 10, 8), (1, 1 << 40, 8), (1, 10, 1 << 40), (1 << 36, 1 << 20, 1 << 20)]),
    ];
    (any::<bool>(), claims).prop_map(|(classifier, (n_layer, vocab_size, n_positions))| {
        let mut config = if classifier { classifier_config() } else { tiny_config() };
        config.n_layer = n_layer;
        config.vocab_size = vocab_size;
        config.n_positions = n_positions;
        config.validate().expect("claimed sizes stay below the usize overflow");
        let head = HeadKind::from_config(&config);
        (config, head)
    })
}

#[test]
fn weights_loader_survives_arbitrary_files() {
    let dir = tempfile::tempdir().unwrap();
    let templates = [valid_weights_file(&tiny_config(), dir.path()), valid_weights_file(&classifier_config(), dir.path())];
    let path = dir.path().join("model.safetensors");
    let cases = (weights_input(), load_config(), any::<bool>());
    check_property("safetensors loader", 1500, cases, |(input, (config, head), allow_missing_head)| {
        let bytes = match &input {
            WeightsInput::Raw(bytes) => bytes.0.clone(),
            WeightsInput::Crafted { entries, offsets, length, data_fill } => crafted_file(entries, *offsets, *length, *data_fill),
            WeightsInput::Edited { classifier, edits } => {
                let mut bytes = templates[usize::from(*classifier)].clone();
                apply_edits(&mut bytes, edits);
                bytes
            }
        };
        std::fs::write(&path, &bytes).unwrap();
        let options = LoadOptions { allow_missing_head };
        let (result, largest) = with_largest_allocation(|| weights::load(&path, &config, head, options));
        check_allocation(largest, bytes.len())?;
        match result {
            Ok(loaded) => {
                note_accepted();
                for (name, tensor) in &loaded.tensors {
                    let expected = weights::expected_shapes(&config, head).into_iter().find(|(n, _)| n == name);
                    prop_assert!(expected.is_some(), "loaded `{name}`, which is not a parameter");
                    prop_assert_eq!(&tensor.shape, &expected.unwrap().1, "shape of `{}`", name);
                    prop_assert_eq!(tensor.data.len(), tensor.shape.iter().product::<usize>());
                }
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                prop_assert!(message.contains(&path.display().to_string()), "the error does not name the file: {message}");
                Ok(())
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// (d) Checkpoint loader
// ---------------------------------------------------------------------------------------------

/// The files of a valid classifier checkpoint of the tiny model, by file name.
fn valid_checkpoint(dir: &Path) -> HashMap<&'static str, Vec<u8>> {
    let config = classifier_config();
    let head = HeadKind::Classifier { num_labels: 2 };
    let source = dir.join("template-checkpoint");
    std::fs::create_dir_all(&source).unwrap();
    config.save(&source).unwrap();
    let initial = weights::init_random(&config, head, 3).unwrap();
    weights::save(&source.join("model.safetensors"), &initial, &config, true).unwrap();

    // Moments of the trainable weights of `--train last-blocks:1` on a one-layer model: block 0,
    // the final layer norm and the head. Keep two of them so the file stays small.
    let trainable = ["ln_f.weight", "score.weight"];
    let moments: Vec<(String, Vec<usize>, Vec<u8>)> = trainable
        .iter()
        .flat_map(|name| {
            let tensor = initial.get(name).unwrap();
            let bytes: Vec<u8> = tensor.data.iter().flat_map(|v| (v * 0.01).to_le_bytes()).collect();
            [".adam_m", ".adam_v"].map(|suffix| (format!("{name}{suffix}"), tensor.shape.clone(), bytes.clone()))
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = moments
        .iter()
        .map(|(name, shape, bytes)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap()))
        .collect();
    let optimizer = safetensors::serialize(views, None).unwrap();

    let state = TrainState {
        format_version: checkpoint::FORMAT_VERSION,
        kind: "train".into(),
        step: 3,
        applied_steps: None,
        settings: json!({"command": ["shadertune", "train", "--epochs", "1"]}),
        data_fingerprint: "12 training examples of 24 tokens, fnv1a 0123456789abcdef".into(),
        progress: json!({"step": 3, "history": [], "running_loss": 0.5, "running_count": 1}),
    };
    HashMap::from([
        ("config.json", std::fs::read(source.join("config.json")).unwrap()),
        ("model.safetensors", std::fs::read(source.join("model.safetensors")).unwrap()),
        ("optimizer.safetensors", optimizer),
        ("state.json", serde_json::to_vec_pretty(&state).unwrap()),
    ])
}

/// Fields of `state.json` with replacement values.
fn state_change() -> impl Strategy<Value = (&'static str, Option<Value>)> {
    let field = prop::sample::select(vec!["format_version", "kind", "step", "settings", "data_fingerprint", "progress", "extra"]);
    let value = prop_oneof![
        2 => json_value(),
        1 => prop::sample::select(vec!["train", "pretrain", ""]).prop_map(Value::from),
    ];
    (field, prop::option::weighted(0.85, value))
}

/// Changes to the optimizer file: extra or replaced moments with any name, dtype and shape.
fn optimizer_entry() -> impl Strategy<Value = (String, &'static str, Vec<u64>)> {
    let name = prop_oneof![
        prop::sample::select(vec!["ln_f.weight.adam_m", "score.weight.adam_v", "wte.weight.adam_m", "nothing.adam_m", "ln_f.weight", "h.0.ln_1.bias.adam_v"])
            .prop_map(str::to_string),
        tensor_name().prop_map(|n| format!("{n}.adam_m")),
    ];
    let dtype = prop::sample::select(vec!["F32", "F16", "I32", "U8"]);
    (name, dtype, prop::collection::vec(dimension(), 0..3))
}

#[derive(Clone, Debug)]
enum OptimizerInput {
    Kept,
    Edited(Vec<Edit>),
    Crafted(Vec<(String, &'static str, Vec<u64>)>, HeaderLength),
}

#[derive(Clone, Debug)]
struct CheckpointInput {
    state_changes: Vec<(&'static str, Option<Value>)>,
    state_edits: Vec<Edit>,
    optimizer: OptimizerInput,
    model_edits: Vec<Edit>,
    missing_file: Option<&'static str>,
}

fn checkpoint_input() -> impl Strategy<Value = CheckpointInput> {
    let optimizer = prop_oneof![
        3 => Just(OptimizerInput::Kept),
        2 => prop::collection::vec(edit(), 1..4).prop_map(OptimizerInput::Edited),
        2 => (prop::collection::vec(optimizer_entry(), 0..5), prop_oneof![3 => Just(HeaderLength::Exact), 1 => any::<i8>().prop_map(HeaderLength::Off)])
            .prop_map(|(entries, length)| OptimizerInput::Crafted(entries, length)),
    ];
    let missing = prop::option::weighted(
        0.05,
        prop::sample::select(vec!["config.json", "model.safetensors", "optimizer.safetensors", "state.json"]),
    );
    let state_changes = prop_oneof![Just(Vec::new()), prop::collection::vec(state_change(), 1..3)];
    let model_edits = prop_oneof![3 => Just(Vec::new()), 1 => prop::collection::vec(edit(), 1..3)];
    (state_changes, few_edits(), optimizer, model_edits, missing)
        .prop_map(|(state_changes, state_edits, optimizer, model_edits, missing_file)| CheckpointInput {
            state_changes,
            state_edits,
            optimizer,
            model_edits,
            missing_file,
        })
}

/// Writes the checkpoint files of `input` into `run/checkpoint/` and returns their total size.
fn write_checkpoint(run: &Path, template: &HashMap<&'static str, Vec<u8>>, input: &CheckpointInput) -> usize {
    let dir = run.join("checkpoint");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();

    let mut state: Value = serde_json::from_slice(&template["state.json"]).unwrap();
    for (field, value) in &input.state_changes {
        let fields = state.as_object_mut().unwrap();
        match value {
            Some(value) => fields.insert(field.to_string(), value.clone()),
            None => fields.remove(*field),
        };
    }
    let mut state = serde_json::to_vec(&state).unwrap();
    apply_edits(&mut state, &input.state_edits);

    let optimizer = match &input.optimizer {
        OptimizerInput::Kept => template["optimizer.safetensors"].clone(),
        OptimizerInput::Edited(edits) => {
            let mut bytes = template["optimizer.safetensors"].clone();
            apply_edits(&mut bytes, edits);
            bytes
        }
        OptimizerInput::Crafted(entries, length) => crafted_file(entries, Offsets::Consistent, *length, 0x3c),
    };
    let mut model = template["model.safetensors"].clone();
    apply_edits(&mut model, &input.model_edits);

    let files: [(&str, Vec<u8>); 4] = [
        ("config.json", template["config.json"].clone()),
        ("model.safetensors", model),
        ("optimizer.safetensors", optimizer),
        ("state.json", state),
    ];
    let mut total = 0;
    for (name, bytes) in files {
        if input.missing_file == Some(name) {
            continue;
        }
        total += bytes.len();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    total
}

#[test]
fn checkpoint_loader_survives_mutated_files() {
    let dir = tempfile::tempdir().unwrap();
    let template = valid_checkpoint(dir.path());
    let run: PathBuf = dir.path().join("run");
    let head = HeadKind::Classifier { num_labels: 2 };
    check_property("checkpoint loader", 1000, checkpoint_input(), |input| {
        let input_bytes = write_checkpoint(&run, &template, &input);
        let (result, largest) = with_largest_allocation(|| checkpoint::load(&run, "train", head));
        check_allocation(largest, input_bytes)?;
        match result {
            Ok(loaded) => {
                note_accepted();
                prop_assert_eq!(loaded.state.format_version, checkpoint::FORMAT_VERSION);
                prop_assert_eq!(loaded.state.kind.as_str(), "train");
                for (key, values) in &loaded.moments {
                    let weight = key.strip_suffix(".adam_m").or_else(|| key.strip_suffix(".adam_v"));
                    prop_assert!(weight.is_some(), "moment `{key}` has no moment suffix");
                    let tensor = loaded.weights.get(weight.unwrap());
                    prop_assert!(tensor.is_some(), "moment `{key}` names no weight");
                    prop_assert_eq!(values.len(), tensor.unwrap().data.len(), "length of `{}`", key);
                }
                Ok(())
            }
            Err(error) => {
                let message = error.to_string();
                prop_assert!(message.contains(&run.display().to_string()), "the error does not name the checkpoint: {message}");
                Ok(())
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// LoRA adapters
// ---------------------------------------------------------------------------------------------

/// Fields of `adapter_config.json` that the adapter loader interprets.
const ADAPTER_FIELDS: [&str; 12] = [
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "use_rslora", "bias",
    "rank_pattern", "layers_to_transform", "modules_to_save", "base_model_name_or_path",
];

/// Generates a PEFT adapter: its config with changed fields and byte edits, and its tensor file
/// with byte edits.
fn adapter_input() -> impl Strategy<Value = (Vec<(&'static str, Option<Value>)>, Vec<Edit>, Vec<Edit>)> {
    let change = (prop::sample::select(ADAPTER_FIELDS.to_vec()), prop::option::weighted(0.85, json_value()));
    (prop_oneof![Just(Vec::new()), prop::collection::vec(change, 1..4)], few_edits(), few_edits())
}

#[test]
fn adapter_loader_survives_mutated_files() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let config = Gpt2Config::from_file(&fixtures.join("tiny_cls/config.json")).unwrap();
    let template_config: Value = serde_json::from_slice(&std::fs::read(fixtures.join("tiny_cls_lora/adapter_config.json")).unwrap()).unwrap();
    let template_tensors = std::fs::read(fixtures.join("tiny_cls_lora/adapter_model.safetensors")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    check_property("adapter loader", 600, adapter_input(), |(changes, config_edits, tensor_edits)| {
        let mut adapter_config = template_config.clone();
        let fields = adapter_config.as_object_mut().unwrap();
        for (field, value) in changes {
            match value {
                Some(value) => fields.insert(field.to_string(), value),
                None => fields.remove(field),
            };
        }
        let mut config_bytes = adapter_config.to_string().into_bytes();
        apply_edits(&mut config_bytes, &config_edits);
        let mut tensor_bytes = template_tensors.clone();
        apply_edits(&mut tensor_bytes, &tensor_edits);
        std::fs::write(dir.path().join("adapter_config.json"), &config_bytes).unwrap();
        std::fs::write(dir.path().join("adapter_model.safetensors"), &tensor_bytes).unwrap();
        let input_bytes = config_bytes.len() + tensor_bytes.len();
        let (result, largest) = with_largest_allocation(|| shadertune::model::lora::load_adapter(dir.path(), &config, Some(3)));
        check_allocation(largest, input_bytes)?;
        if let Ok(adapter) = result {
            note_accepted();
            let r = adapter.spec.rank;
            for m in &adapter.modules {
                let a = adapter.weights.get(&m.a_name());
                let b = adapter.weights.get(&m.b_name());
                prop_assert!(a.is_some_and(|t| t.shape == [r, m.n_in]), "A of `{}` is missing or mis-shaped", m.prefix);
                prop_assert!(b.is_some_and(|t| t.shape == [m.n_out, r]), "B of `{}` is missing or mis-shaped", m.prefix);
            }
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// Fixed inputs: the size claims named in the module documentation
// ---------------------------------------------------------------------------------------------

/// Loads `bytes` as the tiny model's weights and checks that the load fails within the
/// allocation limit, with a message that contains `expected`.
fn assert_rejected_within_limit(bytes: &[u8], expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let config = tiny_config();
    let (result, largest) =
        with_largest_allocation(|| weights::load(&path, &config, HeadKind::LanguageModel, LoadOptions::default()));
    let message = result.expect_err("a file with impossible sizes must be rejected").to_string();
    assert!(message.contains(expected), "the error lacks `{expected}`: {message}");
    assert!(largest <= allocation_limit(bytes.len()), "allocated {largest} bytes for a {}-byte file", bytes.len());
}

#[test]
fn header_length_of_2_pow_60_is_rejected() {
    let entries = [("wte.weight".to_string(), "F32", vec![10, 4])];
    let bytes = crafted_file(&entries, Offsets::Consistent, HeaderLength::Claimed(1 << 60), 0);
    assert_rejected_within_limit(&bytes, &format!("{}-byte JSON header", 1u64 << 60));
}

#[test]
fn shape_of_2_pow_80_elements_is_rejected() {
    // Offsets 0..0 match the empty data section, so only the shape is wrong.
    let entries = [("wte.weight".to_string(), "F32", vec![1 << 40, 1 << 40])];
    let bytes = crafted_file(&entries, Offsets::Arbitrary(0, 0), HeaderLength::Exact, 0);
    assert_rejected_within_limit(&bytes, "is not a valid safetensors file");
}

#[test]
fn data_offsets_past_the_file_are_rejected() {
    // The shape and offsets agree on 2^40 * 4 elements of 4 bytes (16 TiB), and the file holds
    // 4 KiB of it.
    let entries = [("wte.weight".to_string(), "F32", vec![1 << 40, 4])];
    let bytes = crafted_file(&entries, Offsets::Consistent, HeaderLength::Exact, 0);
    assert_rejected_within_limit(&bytes, &format!("{} bytes of tensor data", 1u64 << 44));
}

// ---------------------------------------------------------------------------------------------
// Checks of the harness itself
// ---------------------------------------------------------------------------------------------

#[test]
fn config_float_round_trip_stays_within_tolerance() {
    // Found by `config_reader_survives_arbitrary_json`: serde_json 1.0.154 parses this number
    // 1 unit in the last place below the nearest f64, so a saved and reloaded config differs.
    let text = r#"{"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 8, "n_positions": 16,
        "vocab_size": 50257, "n_ctx": [-3.142139967085681e-268]}"#;
    let config = Gpt2Config::from_json_str(text).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut runner = TestRunner::default();
    runner.run(&Just(()), |()| check_config(&config, dir.path())).unwrap();
    let parsed = config.extra["n_ctx"][0].as_f64().unwrap();
    let nearest: f64 = "-3.142139967085681e-268".parse().unwrap();
    assert!(same_json(&Value::from(parsed), &Value::from(nearest)), "{parsed:e} vs {nearest:e}");
}

#[test]
fn allocation_tracker_sees_large_requests() {
    // The properties above are only as strong as the tracker, so check that it measures.
    let (buffer, largest) = with_largest_allocation(|| vec![0u8; 3 << 20]);
    assert_eq!(buffer.len(), 3 << 20);
    assert!(largest >= 3 << 20, "the tracker saw at most {largest} bytes");
    let (_, largest) = with_largest_allocation(|| 1 + 1);
    assert_eq!(largest, 0);
}

#[test]
fn edits_stay_inside_the_file() {
    let mut bytes = b"abcdef".to_vec();
    apply_edits(
        &mut bytes,
        &[Edit::Set(7, b'X'), Edit::Remove(4, 100), Edit::Insert(1, Bytes(b"--".to_vec())), Edit::Truncate(3)],
    );
    // Set at 7 % 6 = 1, remove from 4 to the end, insert at 1, keep 3 % 6 + 1 = 4 bytes.
    assert_eq!(bytes, b"a--X");
}
