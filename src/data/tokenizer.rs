//! GPT-2 byte-level BPE tokenizer, loaded from Hugging Face files with the `tokenizers` crate.

use std::path::{Path, PathBuf};

use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, ModelWrapper, Tokenizer};

use super::DataError;
use crate::fsutil::write_atomic;

/// The end-of-text token. GPT-2 uses it both to separate documents and as the padding token.
pub const EOS_TOKEN: &str = "<|endoftext|>";

/// Id of [`EOS_TOKEN`] in the GPT-2 vocabulary (the last of its 50,257 entries).
pub const GPT2_EOS_ID: u32 = 50256;

/// File name of the Hugging Face fast-tokenizer file.
pub const TOKENIZER_JSON: &str = "tokenizer.json";
/// File name of the BPE vocabulary, a JSON object from token to id.
pub const VOCAB_JSON: &str = "vocab.json";
/// File name of the BPE merge rules, one `LEFT RIGHT` pair per line in priority order.
pub const MERGES_TXT: &str = "merges.txt";

/// Header line of `merges.txt` as GPT-2 and Hugging Face write it.
const MERGES_HEADER: &str = "#version: 0.2";

/// A GPT-2-family byte-level BPE tokenizer.
///
/// Encoding adds no special tokens, and the literal text `<|endoftext|>` encodes to the
/// end-of-text id, as in GPT-2's own data pipeline. Truncation and padding settings stored in a
/// `tokenizer.json` are switched off because batching pads and truncates by itself.
#[derive(Clone)]
pub struct Gpt2Tokenizer {
    inner: Tokenizer,
    eos_id: u32,
}

impl std::fmt::Debug for Gpt2Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl Gpt2Tokenizer {
    /// Loads the tokenizer in a model directory.
    ///
    /// Reads `tokenizer.json` when the directory has one, and otherwise `vocab.json` plus
    /// `merges.txt`, in which case `<|endoftext|>` is registered as a special token so that it
    /// encodes to its vocabulary id (50256 for GPT-2) instead of seven ordinary tokens.
    pub fn from_dir(dir: &Path) -> Result<Self, DataError> {
        let json = dir.join(TOKENIZER_JSON);
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        let vocab = dir.join(VOCAB_JSON);
        let merges = dir.join(MERGES_TXT);
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_and_merges(&vocab, &merges);
        }
        Err(DataError::Tokenizer {
            path: dir.to_path_buf(),
            message: format!(
                "no tokenizer found: expected {TOKENIZER_JSON}, or {VOCAB_JSON} together with {MERGES_TXT}"
            ),
        })
    }

    /// Loads a Hugging Face `tokenizer.json`, including the older files whose model has no
    /// `"type"` key.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|error| DataError::Read {
            path: path.to_path_buf(),
            error,
        })?;
        let inner = Tokenizer::from_bytes(&bytes).map_err(|e| DataError::Tokenizer {
            path: path.to_path_buf(),
            message: format!("invalid {TOKENIZER_JSON}: {e}"),
        })?;
        Self::from_tokenizer(inner, path)
    }

    /// Loads a byte-level BPE tokenizer from `vocab.json` and `merges.txt` with GPT-2's
    /// pre-tokenizer, decoder and post-processor (byte-level, no prefix space).
    pub fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Self, DataError> {
        let vocab_str = utf8_path(vocab)?;
        let merges_str = utf8_path(merges)?;
        let bpe =
            BPE::from_file(vocab_str, merges_str)
                .build()
                .map_err(|e| DataError::Tokenizer {
                    path: vocab.to_path_buf(),
                    message: format!("invalid {VOCAB_JSON} or {} ({e})", merges.display()),
                })?;
        let byte_level = tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true);
        let mut inner = Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(byte_level))
            .with_decoder(Some(byte_level))
            .with_post_processor(Some(byte_level));
        Self::from_tokenizer(inner, vocab)
    }

    /// Checks the model type and the end-of-text token, registers that token as special and
    /// switches off truncation and padding.
    fn from_tokenizer(mut inner: Tokenizer, path: &Path) -> Result<Self, DataError> {
        let bpe = match inner.get_model() {
            ModelWrapper::BPE(bpe) => bpe,
            other => {
                let kind = match other {
                    ModelWrapper::WordPiece(_) => "WordPiece",
                    ModelWrapper::WordLevel(_) => "WordLevel",
                    ModelWrapper::Unigram(_) => "Unigram",
                    ModelWrapper::BPE(_) => "BPE",
                };
                return Err(DataError::Tokenizer {
                    path: path.to_path_buf(),
                    message: format!(
                        "expected a byte-level BPE model as GPT-2 uses, found a {kind} model"
                    ),
                });
            }
        };
        // In tokenizers 0.22, `BPE::tokenize` fails only when it meets a character outside the
        // vocabulary and the unknown token is itself missing from the model's vocabulary, so
        // rejecting that case here is what lets `encode` return ids without a `Result`.
        // NOTE: the normalizer and pre-tokenizer of a custom tokenizer.json are assumed not to
        // fail at encode time; GPT-2's ByteLevel ones cannot.
        if let Some(unk) = bpe.get_unk_token() {
            if !bpe.get_vocab().contains_key(unk) {
                return Err(DataError::Tokenizer {
                    path: path.to_path_buf(),
                    message: format!("unknown token `{unk}` is not in the vocabulary"),
                });
            }
        }
        let Some(eos_id) = inner.token_to_id(EOS_TOKEN) else {
            return Err(DataError::Tokenizer {
                path: path.to_path_buf(),
                message: format!("the vocabulary has no `{EOS_TOKEN}` entry, which GPT-2 models use to end text and to pad"),
            });
        };
        inner.add_special_tokens(&[AddedToken::from(EOS_TOKEN, true)]);
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .expect("switching truncation off cannot fail: only enabled truncation is validated");
        Ok(Self { inner, eos_id })
    }

    /// Encodes text to token ids without adding special tokens.
    ///
    /// The result is empty for empty text.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let encoding = self.inner.encode(text, false).expect(
            "byte-level BPE encoding cannot fail once the unknown token is known to be in the vocabulary",
        );
        encoding.get_ids().to_vec()
    }

    /// Decodes token ids to text, keeping special tokens such as `<|endoftext|>` as text.
    ///
    /// Ids outside the vocabulary are skipped, and byte sequences that are not valid UTF-8
    /// become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.inner.decode(ids, false).expect(
            "byte-level decoding cannot fail: unknown ids are skipped and bytes are decoded lossily",
        )
    }

    /// Number of ids, counting special tokens (50,257 for GPT-2).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of `<|endoftext|>` (50256 for GPT-2), also used to pad batches.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Returns the id of one token string, such as `"Ġthe"`, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Writes `tokenizer.json`, `vocab.json` and `merges.txt` into a model directory, creating it
    /// if needed, so that both this crate and Hugging Face loaders can read the model back.
    pub fn save(&self, dir: &Path) -> Result<(), DataError> {
        let tokenizer_json = self
            .inner
            .to_string(false)
            .map_err(|e| DataError::Tokenizer {
                path: dir.to_path_buf(),
                message: format!("failed to serialize the tokenizer: {e}"),
            })?;
        let ModelWrapper::BPE(bpe) = self.inner.get_model() else {
            unreachable!("from_tokenizer accepts BPE models only");
        };
        let vocab_json = vocab_json(bpe);
        let merges_txt = merges_txt(bpe).map_err(|message| DataError::Tokenizer {
            path: dir.to_path_buf(),
            message,
        })?;

        for (name, text) in [
            (TOKENIZER_JSON, tokenizer_json),
            (VOCAB_JSON, vocab_json),
            (MERGES_TXT, merges_txt),
        ] {
            let path = dir.join(name);
            write_atomic(&path, text.as_bytes())
                .map_err(|error| DataError::Write { path, error })?;
        }
        Ok(())
    }
}

/// Converts a path to `&str` because the `tokenizers` file API takes string paths.
fn utf8_path(path: &Path) -> Result<&str, DataError> {
    path.to_str().ok_or_else(|| DataError::Tokenizer {
        path: PathBuf::from(path),
        message: "the path is not valid UTF-8; move the tokenizer files to a UTF-8 path".into(),
    })
}

/// Serializes the vocabulary as one JSON object with entries in id order, as GPT-2's own file is.
fn vocab_json(bpe: &BPE) -> String {
    let mut entries: Vec<(String, u32)> = bpe.get_vocab().into_iter().collect();
    entries.sort_by_key(|(_, id)| *id);
    let body: Vec<String> = entries
        .iter()
        .map(|(token, id)| {
            let key = serde_json::to_string(token).expect("a String always serializes to JSON");
            format!("{key}: {id}")
        })
        .collect();
    format!("{{{}}}", body.join(", "))
}

/// Writes the merge rules in priority order under the `#version: 0.2` header.
///
/// The rules are taken from the model's serde form because `BPE` has no public accessor for them.
fn merges_txt(bpe: &BPE) -> Result<String, String> {
    let value =
        serde_json::to_value(bpe).map_err(|e| format!("failed to serialize the BPE model: {e}"))?;
    let merges = value
        .get("merges")
        .and_then(|m| m.as_array())
        .ok_or("the serialized BPE model has no `merges` list")?;
    let mut text = String::from(MERGES_HEADER);
    text.push('\n');
    for merge in merges {
        let line = match merge {
            serde_json::Value::Array(pair) if pair.len() == 2 => {
                let left = pair[0]
                    .as_str()
                    .ok_or("a merge rule is not a pair of strings")?;
                let right = pair[1]
                    .as_str()
                    .ok_or("a merge rule is not a pair of strings")?;
                format!("{left} {right}")
            }
            serde_json::Value::String(rule) => rule.clone(),
            _ => return Err(format!("unexpected merge rule {merge}")),
        };
        text.push_str(&line);
        text.push('\n');
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assets_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer")
    }

    /// "Hello, world! Is this spam?" as the Python `tokenizers` package encodes it with GPT-2's
    /// files: `Hello` `,` `Ġworld` `!` `ĠIs` `Ġthis` `Ġspam` `?`.
    const HELLO_TEXT: &str = "Hello, world! Is this spam?";
    const HELLO_IDS: [u32; 8] = [15496, 11, 995, 0, 1148, 428, 18084, 30];

    /// The example sentence of chapter 2 of Raschka's "Build a Large Language Model (From
    /// Scratch)", with the ids that tiktoken's GPT-2 encoding gives.
    const BOOK_TEXT: &str =
        "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.";
    const BOOK_IDS: [u32; 20] = [
        15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114, 286,
        617, 34680, 27271, 13,
    ];

    fn vocab_merges_only() -> (tempfile::TempDir, Gpt2Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        for name in [VOCAB_JSON, MERGES_TXT] {
            std::fs::copy(assets_dir().join(name), dir.path().join(name)).unwrap();
        }
        let tokenizer = Gpt2Tokenizer::from_dir(dir.path()).unwrap();
        (dir, tokenizer)
    }

    #[test]
    fn tokenizer_json_encodes_known_ids() {
        let tokenizer = Gpt2Tokenizer::from_dir(&assets_dir()).unwrap();
        assert_eq!(
            tokenizer.encode(HELLO_TEXT),
            HELLO_IDS,
            "tokenizer.json ids"
        );
        assert_eq!(tokenizer.encode(BOOK_TEXT), BOOK_IDS, "tokenizer.json ids");
        assert_eq!(tokenizer.decode(&HELLO_IDS), HELLO_TEXT);
        assert_eq!(tokenizer.decode(&BOOK_IDS), BOOK_TEXT);
        assert_eq!(tokenizer.vocab_size(), 50257);
        assert_eq!(tokenizer.eos_id(), GPT2_EOS_ID);
        assert_eq!(tokenizer.encode(EOS_TOKEN), [GPT2_EOS_ID]);
    }

    #[test]
    fn vocab_and_merges_encode_known_ids() {
        let (_dir, tokenizer) = vocab_merges_only();
        assert_eq!(
            tokenizer.encode(HELLO_TEXT),
            HELLO_IDS,
            "vocab.json + merges.txt ids"
        );
        assert_eq!(
            tokenizer.encode(BOOK_TEXT),
            BOOK_IDS,
            "vocab.json + merges.txt ids"
        );
        assert_eq!(
            tokenizer.encode(EOS_TOKEN),
            [GPT2_EOS_ID],
            "end-of-text must be special"
        );
        assert_eq!(tokenizer.decode(&BOOK_IDS), BOOK_TEXT);
        assert_eq!(tokenizer.vocab_size(), 50257);
        assert_eq!(tokenizer.eos_id(), GPT2_EOS_ID);
    }

    #[test]
    fn empty_text_encodes_to_nothing() {
        let tokenizer = Gpt2Tokenizer::from_dir(&assets_dir()).unwrap();
        assert!(tokenizer.encode("").is_empty());
    }

    #[test]
    fn save_round_trips_both_layouts() {
        let tokenizer = Gpt2Tokenizer::from_dir(&assets_dir()).unwrap();
        let out = tempfile::tempdir().unwrap();
        tokenizer.save(out.path()).unwrap();

        let reloaded = Gpt2Tokenizer::from_dir(out.path()).unwrap();
        assert_eq!(
            reloaded.encode(BOOK_TEXT),
            BOOK_IDS,
            "saved tokenizer.json ids"
        );

        std::fs::remove_file(out.path().join(TOKENIZER_JSON)).unwrap();
        let from_pair = Gpt2Tokenizer::from_dir(out.path()).unwrap();
        assert_eq!(
            from_pair.encode(BOOK_TEXT),
            BOOK_IDS,
            "saved vocab.json + merges.txt ids"
        );
        assert_eq!(from_pair.vocab_size(), 50257);

        let merges = std::fs::read_to_string(out.path().join(MERGES_TXT)).unwrap();
        let original = std::fs::read_to_string(assets_dir().join(MERGES_TXT)).unwrap();
        assert_eq!(merges, original, "saved merges.txt differs from GPT-2's");
    }

    #[test]
    fn toy_vocabulary_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer/tiny_vocab21");
        let tokenizer = Gpt2Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(tokenizer.vocab_size(), 21);
        assert_eq!(tokenizer.eos_id(), 20);
        // "Ġlow" comes from the merges Ġ+l, Ġl+o, Ġlo+w and "er" from e+r.
        assert_eq!(tokenizer.encode(" lower"), [14, 15]);
        assert_eq!(tokenizer.encode("<|endoftext|>"), [20]);
        assert_eq!(tokenizer.decode(&[14, 15]), " lower");
    }

    #[test]
    fn missing_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let err = Gpt2Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.json") && err.contains("vocab.json"),
            "message: {err}"
        );
        assert!(
            err.contains(&dir.path().display().to_string()),
            "message: {err}"
        );
    }

    #[test]
    fn vocabulary_without_end_of_text_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(VOCAB_JSON), r#"{"a": 0, "b": 1, "ab": 2}"#).unwrap();
        std::fs::write(dir.path().join(MERGES_TXT), "#version: 0.2\na b\n").unwrap();
        let err = Gpt2Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(EOS_TOKEN), "message: {err}");
    }
}
