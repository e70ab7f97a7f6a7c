//! Locating a GPT-2 checkpoint: a local model directory, or one of the released GPT-2 models in
//! the local Hugging Face cache. Nothing here uses the network.
//!
//! The cache layout is the one `huggingface_hub` writes: `<cache>/models--<org>--<name>/` contains
//! `refs/main` (a file with the commit hash of the main branch) and
//! `snapshots/<commit>/<file>`, where each file is usually a symlink into `blobs/`.

use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};

use crate::model::config::CONFIG_FILE_NAME;
use crate::model::weights::{LoadError, WEIGHTS_FILE_NAME};

/// Released GPT-2 models that [`resolve_model`] finds in the cache by name.
pub const KNOWN_MODELS: [&str; 4] = ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"];

/// Hugging Face organisation that hosts the released GPT-2 models.
const ORGANIZATION: &str = "openai-community";

/// Files a model directory must contain.
const REQUIRED_FILES: [&str; 2] = [CONFIG_FILE_NAME, WEIGHTS_FILE_NAME];

/// Environment variables that locate the Hugging Face cache, read once so that tests can pass
/// their own values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheEnv {
    /// `HF_HUB_CACHE`: the hub cache directory itself.
    pub hf_hub_cache: Option<OsString>,
    /// `HF_HOME`: the Hugging Face home, whose `hub/` is the cache.
    pub hf_home: Option<OsString>,
    /// `XDG_CACHE_HOME`: the default Hugging Face home is `$XDG_CACHE_HOME/huggingface`.
    pub xdg_cache_home: Option<OsString>,
    /// `HOME`: the fallback home is `~/.cache/huggingface`.
    pub home: Option<OsString>,
}

impl CacheEnv {
    /// Reads the variables from the process environment.
    pub fn from_process() -> Self {
        CacheEnv {
            hf_hub_cache: std::env::var_os("HF_HUB_CACHE"),
            hf_home: std::env::var_os("HF_HOME"),
            xdg_cache_home: std::env::var_os("XDG_CACHE_HOME"),
            home: std::env::var_os("HOME"),
        }
    }

    /// Returns the hub cache directories to search, most specific first and without
    /// duplicates: `$HF_HUB_CACHE`, `$HF_HOME/hub`, `$XDG_CACHE_HOME/huggingface/hub`,
    /// `~/.cache/huggingface/hub`. Empty variables count as unset. `huggingface_hub` itself
    /// uses only the first of these that is set. Searching all of them also finds a model that
    /// was downloaded before a variable changed.
    pub fn cache_roots(&self) -> Vec<PathBuf> {
        let set =
            |value: &Option<OsString>| value.as_ref().filter(|v| !v.is_empty()).map(PathBuf::from);
        let candidates = [
            set(&self.hf_hub_cache),
            set(&self.hf_home).map(|home| home.join("hub")),
            set(&self.xdg_cache_home).map(|cache| cache.join("huggingface").join("hub")),
            set(&self.home).map(|home| home.join(".cache").join("huggingface").join("hub")),
        ];
        let mut roots: Vec<PathBuf> = Vec::new();
        for root in candidates.into_iter().flatten() {
            if !roots.contains(&root) {
                roots.push(root);
            }
        }
        roots
    }
}

/// Returns the directory holding `config.json` and `model.safetensors` for `spec`.
///
/// `spec` is either an existing directory, used as is, or a released model name (`gpt2`,
/// `gpt2-medium`, `gpt2-large`, `gpt2-xl`, optionally as `openai-community/<name>`), looked up
/// in the local Hugging Face cache (see [`CacheEnv::cache_roots`]) under both
/// `models--openai-community--<name>` and the older `models--<name>`.
///
/// # Errors
///
/// A directory without the two files (the error lists what is missing), an unknown name, or a
/// known name absent from the cache (the error lists every place searched and the command that
/// downloads the model).
pub fn resolve_model(spec: &str) -> Result<PathBuf, LoadError> {
    resolve_model_in(spec, &CacheEnv::from_process().cache_roots())
}

/// [`resolve_model`] with explicit cache directories.
pub fn resolve_model_in(spec: &str, cache_roots: &[PathBuf]) -> Result<PathBuf, LoadError> {
    let path = Path::new(spec);
    if path.is_dir() {
        let missing: Vec<&'static str> = REQUIRED_FILES
            .into_iter()
            .filter(|file| !path.join(file).is_file())
            .collect();
        if !missing.is_empty() {
            return Err(LoadError::IncompleteModelDir {
                dir: path.to_path_buf(),
                missing,
            });
        }
        return Ok(path.to_path_buf());
    }

    let name = spec
        .strip_prefix(&format!("{ORGANIZATION}/"))
        .unwrap_or(spec);
    if !KNOWN_MODELS.contains(&name) {
        return Err(LoadError::ModelNotFound {
            spec: spec.to_string(),
            known: KNOWN_MODELS.join(", "),
        });
    }
    let repo_id = format!("{ORGANIZATION}/{name}");
    let folders = [
        format!("models--{ORGANIZATION}--{name}"),
        format!("models--{name}"),
    ];
    let mut searched = Vec::new();
    for root in cache_roots {
        for folder in &folders {
            let repo = root.join(folder);
            match snapshot_dir(&repo) {
                Ok(dir) => {
                    log::info!(
                        "using {repo_id} from the Hugging Face cache at {}",
                        dir.display()
                    );
                    return Ok(dir);
                }
                Err(reason) => searched.push(format!("  {} ({reason})", repo.display())),
            }
        }
    }
    if searched.is_empty() {
        searched.push(
            "  no cache directory: HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME and HOME are all unset"
                .to_string(),
        );
    }
    Err(LoadError::NotInCache { repo_id, searched })
}

/// Returns the snapshot that `refs/main` names inside one cached repository, or why it does not
/// qualify.
fn snapshot_dir(repo: &Path) -> Result<PathBuf, String> {
    if !repo.is_dir() {
        return Err("no such directory".to_string());
    }

    let refs_main = repo.join("refs").join("main");
    let revision = std::fs::read_to_string(&refs_main)
        .map_err(|error| format!("failed to read refs/main: {error}"))?;
    let revision = revision.trim();

    // A revision is one path component, because anything else would leave the snapshots folder.
    let mut components = Path::new(revision).components();
    let is_single_name =
        matches!(components.next(), Some(Component::Normal(_))) && components.next().is_none();
    if !is_single_name {
        return Err(format!(
            "refs/main contains \"{revision}\", which is not a commit hash"
        ));
    }

    let snapshot = repo.join("snapshots").join(revision);
    if !snapshot.is_dir() {
        return Err(format!(
            "refs/main names snapshot {revision}, which is missing"
        ));
    }

    let missing: Vec<&str> = REQUIRED_FILES
        .into_iter()
        .filter(|file| !snapshot.join(file).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "snapshot {revision} is missing {}",
            missing.join(" and ")
        ));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "607a30d783dfa663caf39e06633721c8d4cfcd7e";

    /// Builds `root/<folder>` as `huggingface_hub` does: blobs, a snapshot of symlinks, refs/main.
    fn fake_cache_repo(root: &Path, folder: &str, files: &[&str]) -> PathBuf {
        let repo = root.join(folder);
        let snapshot = repo.join("snapshots").join(COMMIT);
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(&snapshot).unwrap();
        std::fs::write(repo.join("refs").join("main"), COMMIT).unwrap();
        for (i, file) in files.iter().enumerate() {
            let blob = repo.join("blobs").join(format!("blob{i}"));
            std::fs::write(&blob, b"{}").unwrap();
            #[cfg(unix)]
            std::os::unix::fs::symlink(&blob, snapshot.join(file)).unwrap();
            #[cfg(not(unix))]
            std::fs::copy(&blob, snapshot.join(file)).unwrap();
        }
        snapshot
    }

    #[test]
    fn directory_is_used_as_is() {
        let dir = tempfile::tempdir().unwrap();
        for file in REQUIRED_FILES {
            std::fs::write(dir.path().join(file), b"{}").unwrap();
        }
        let spec = dir.path().to_str().unwrap();
        assert_eq!(resolve_model_in(spec, &[]).unwrap(), dir.path());
    }

    #[test]
    fn incomplete_directory_lists_missing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(CONFIG_FILE_NAME), b"{}").unwrap();
        let err = resolve_model_in(dir.path().to_str().unwrap(), &[]).unwrap_err();
        assert!(
            matches!(err, LoadError::IncompleteModelDir { ref missing, .. } if missing == &vec![WEIGHTS_FILE_NAME]),
            "{err:?}"
        );
        let empty = tempfile::tempdir().unwrap();
        let err = resolve_model_in(empty.path().to_str().unwrap(), &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("config.json and model.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn unknown_name_is_rejected() {
        let err = resolve_model_in("gpt3", &[]).unwrap_err();
        assert!(matches!(err, LoadError::ModelNotFound { .. }), "{err:?}");
        let message = err.to_string();
        assert!(
            message.contains("`gpt3`") && message.contains("gpt2-medium"),
            "{message}"
        );
    }

    #[test]
    fn cache_layouts_are_found() {
        for (folder, spec) in [
            ("models--openai-community--gpt2", "gpt2"),
            ("models--gpt2", "gpt2"),
            ("models--gpt2-medium", "openai-community/gpt2-medium"),
            (
                "models--openai-community--gpt2-xl",
                "openai-community/gpt2-xl",
            ),
        ] {
            let cache = tempfile::tempdir().unwrap();
            let snapshot = fake_cache_repo(cache.path(), folder, &REQUIRED_FILES);
            let other_root = cache.path().join("elsewhere");
            let found = resolve_model_in(spec, &[other_root, cache.path().to_path_buf()]).unwrap();
            assert_eq!(found, snapshot, "{spec} in {folder}");
        }
    }

    #[test]
    fn first_root_wins() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let expected = fake_cache_repo(first.path(), "models--gpt2", &REQUIRED_FILES);
        fake_cache_repo(
            second.path(),
            "models--openai-community--gpt2",
            &REQUIRED_FILES,
        );
        let roots = [first.path().to_path_buf(), second.path().to_path_buf()];
        assert_eq!(resolve_model_in("gpt2", &roots).unwrap(), expected);
    }

    #[test]
    fn not_in_cache_lists_places_and_command() {
        let cache = tempfile::tempdir().unwrap();
        // A repository without model.safetensors, one without refs/main, and none for the other layout.
        fake_cache_repo(
            cache.path(),
            "models--openai-community--gpt2",
            &[CONFIG_FILE_NAME],
        );
        let bare = cache.path().join("models--gpt2");
        std::fs::create_dir_all(&bare).unwrap();
        let missing_root = cache.path().join("absent");

        let err = resolve_model_in("gpt2", &[cache.path().to_path_buf(), missing_root.clone()])
            .unwrap_err();
        let LoadError::NotInCache {
            ref repo_id,
            ref searched,
        } = err
        else {
            panic!("expected NotInCache, got {err:?}");
        };
        assert_eq!(repo_id, "openai-community/gpt2");
        assert_eq!(searched.len(), 4, "{searched:?}");

        let message = err.to_string();
        assert!(
            message.contains(&format!("snapshot {COMMIT} is missing model.safetensors")),
            "{message}"
        );
        assert!(message.contains("failed to read refs/main"), "{message}");
        assert!(
            message.contains(&missing_root.join("models--gpt2").display().to_string()),
            "{message}"
        );
        assert!(
            message.contains(
                "huggingface-cli download openai-community/gpt2 config.json model.safetensors tokenizer.json"
            ),
            "{message}"
        );
        assert!(
            message.contains("hf download openai-community/gpt2"),
            "{message}"
        );
    }

    #[test]
    fn bad_refs_main_is_reported() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--gpt2");
        fake_cache_repo(cache.path(), "models--gpt2", &REQUIRED_FILES);
        std::fs::write(repo.join("refs").join("main"), "../../elsewhere").unwrap();
        let err = resolve_model_in("gpt2", &[cache.path().to_path_buf()]).unwrap_err();
        assert!(err.to_string().contains("not a commit hash"), "{err}");
        std::fs::write(repo.join("refs").join("main"), "0123abcd\n").unwrap();
        let err = resolve_model_in("gpt2", &[cache.path().to_path_buf()]).unwrap_err();
        assert!(
            err.to_string()
                .contains("snapshot 0123abcd, which is missing"),
            "{err}"
        );
    }

    #[test]
    fn cache_roots_follow_env() {
        let env = CacheEnv {
            hf_hub_cache: Some("/hub-cache".into()),
            hf_home: Some("/hf-home".into()),
            xdg_cache_home: Some("/xdg".into()),
            home: Some("/home/user".into()),
        };
        let expected: Vec<PathBuf> = [
            "/hub-cache",
            "/hf-home/hub",
            "/xdg/huggingface/hub",
            "/home/user/.cache/huggingface/hub",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        assert_eq!(env.cache_roots(), expected);

        let env = CacheEnv {
            hf_hub_cache: Some("".into()),
            hf_home: Some("/home/user/.cache/huggingface".into()),
            xdg_cache_home: None,
            home: Some("/home/user".into()),
        };
        assert_eq!(
            env.cache_roots(),
            vec![PathBuf::from("/home/user/.cache/huggingface/hub")]
        );
        assert!(CacheEnv::default().cache_roots().is_empty());
    }

    #[test]
    fn hf_home_from_env_is_searched() {
        let home = tempfile::tempdir().unwrap();
        let snapshot = fake_cache_repo(
            &home.path().join("hub"),
            "models--gpt2-large",
            &REQUIRED_FILES,
        );
        let env = CacheEnv {
            hf_home: Some(home.path().as_os_str().to_owned()),
            ..CacheEnv::default()
        };
        assert_eq!(
            resolve_model_in("gpt2-large", &env.cache_roots()).unwrap(),
            snapshot
        );
        let err = resolve_model_in("gpt2-large", &CacheEnv::default().cache_roots()).unwrap_err();
        assert!(err.to_string().contains("all unset"), "{err}");
    }
}
