//! Choice among kernel variants by a short timed trial, cached on disk per adapter and driver.
//!
//! A kernel family with several variants (the matmul has a generic register-blocked shader and a
//! subgroup shader for 8-lane adapters) calls [`Gpu::tuned`] to get the one to use. With autotuning off,
//! it gets the family's documented default. With it on, the first request on a machine
//! times every candidate on a representative problem and keeps the fastest, unless the default is
//! within [`KEEP_DEFAULT_WITHIN`] of it: noise must not flip a choice. The result goes to
//! `autotune.json` in the cache directory under a key made of the adapter's name, backend, driver,
//! driver version, the family and a hash of the kernel sources. A new driver or an edited
//! shader is therefore measured again, while other entries stay.
//!
//! Cache directory: `SHADERTUNE_CACHE_DIR` if set, else `XDG_CACHE_HOME/shadertune`, else
//! `~/.cache/shadertune` (`%LOCALAPPDATA%\shadertune` on Windows). A cache that cannot be read or
//! written costs a new measurement, never a failed run.

use super::{Gpu, GpuError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Whether kernel variants are chosen by measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Autotune {
    /// Every family uses its documented default variant.
    #[default]
    Off,
    /// Variants are timed on first use and the choice cached on disk.
    On,
}

impl std::str::FromStr for Autotune {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "on" => Ok(Autotune::On),
            "off" => Ok(Autotune::Off),
            other => Err(format!("unknown autotune setting `{other}`, expected on or off")),
        }
    }
}

/// A measured candidate must beat the default by more than this fraction of the default's time.
pub(crate) const KEEP_DEFAULT_WITHIN: f64 = 0.10;

/// Version of the cache file layout. A file of another version is replaced.
const FORMAT_VERSION: u32 = 1;

/// Environment variable that overrides the cache directory.
pub const CACHE_DIR_VARIABLE: &str = "SHADERTUNE_CACHE_DIR";

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct CacheFile {
    format_version: u32,
    entries: BTreeMap<String, CacheEntry>,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct CacheEntry {
    /// The chosen candidate.
    pub choice: String,
    /// Median milliseconds of every candidate on the trial problem.
    pub timings_ms: BTreeMap<String, f64>,
}

/// Returns the directory of `autotune.json`, or `None` where no home or cache directory is known.
pub fn cache_dir() -> Option<PathBuf> {
    let non_empty = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = non_empty(CACHE_DIR_VARIABLE) {
        return Some(dir);
    }
    if cfg!(windows) {
        return non_empty("LOCALAPPDATA").map(|d| d.join("shadertune"));
    }
    if let Some(dir) = non_empty("XDG_CACHE_HOME") {
        return Some(dir.join("shadertune"));
    }
    non_empty("HOME").map(|h| h.join(".cache").join("shadertune"))
}

/// 64-bit FNV-1a of the given texts, stable across builds and platforms (unlike std's hasher).
pub(crate) fn source_hash(sources: &[&str]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for source in sources {
        for byte in source.bytes().chain(std::iter::once(0)) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    hash
}

fn read_cache(path: &Path) -> CacheFile {
    let Ok(text) = std::fs::read_to_string(path) else {
        return CacheFile { format_version: FORMAT_VERSION, ..Default::default() };
    };
    match serde_json::from_str::<CacheFile>(&text) {
        Ok(file) if file.format_version == FORMAT_VERSION => file,
        Ok(_) | Err(_) => {
            log::warn!("autotune cache {} is not a version {FORMAT_VERSION} cache file; measuring again and replacing it", path.display());
            CacheFile { format_version: FORMAT_VERSION, ..Default::default() }
        }
    }
}

/// Looks `key` up in the cache file at `path`, or measures every candidate with `measure`
/// (median milliseconds), picks one and stores it. `candidates` must contain `default`. Returns
/// the entry and whether it was measured now.
///
/// Another process may have added entries in the meantime: the file is read again just before
/// writing, and written through a temporary file and a rename.
pub(crate) fn choose(
    path: Option<&Path>,
    key: &str,
    candidates: &[&str],
    default: &str,
    mut measure: impl FnMut(&str) -> Result<f64, GpuError>,
) -> Result<(CacheEntry, bool), GpuError> {
    debug_assert!(candidates.contains(&default), "the default `{default}` is one of the candidates");
    if let Some(path) = path {
        if let Some(entry) = read_cache(path).entries.get(key) {
            if candidates.contains(&entry.choice.as_str()) {
                return Ok((entry.clone(), false));
            }
        }
    }
    let mut timings_ms = BTreeMap::new();
    for candidate in candidates {
        timings_ms.insert(candidate.to_string(), measure(candidate)?);
    }
    let default_ms = timings_ms[default];
    let (fastest, fastest_ms) = timings_ms
        .iter()
        .min_by(|a, b| a.1.total_cmp(b.1))
        .map(|(name, ms)| (name.clone(), *ms))
        .expect("at least one candidate");
    let choice = if fastest_ms < default_ms * (1.0 - KEEP_DEFAULT_WITHIN) { fastest } else { default.to_string() };
    let entry = CacheEntry { choice, timings_ms };
    if let Some(path) = path {
        let mut file = read_cache(path);
        file.entries.insert(key.to_string(), entry.clone());
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| crate::fsutil::write_atomic(path, serde_json::to_string_pretty(&file).expect("cache serializes").as_bytes()));
        if let Err(error) = written {
            log::warn!("could not write the autotune cache {}: {error}; the next run measures again", path.display());
        }
    }
    Ok((entry, true))
}

impl Gpu {
    /// Returns the variant of kernel family `family` to use on this device: `default` with
    /// autotuning off or a single candidate, otherwise the cached or newly measured choice.
    /// `sources` are the family's shader texts (their hash is part of the cache key) and
    /// `measure` returns the median milliseconds of one candidate on a representative problem.
    pub(crate) fn tuned(
        &self,
        family: &str,
        sources: &[&str],
        candidates: &[&'static str],
        default: &'static str,
        measure: impl FnMut(&str) -> Result<f64, GpuError>,
    ) -> Result<String, GpuError> {
        if self.autotune == Autotune::Off || candidates.len() < 2 {
            return Ok(default.to_string());
        }
        let mut tuned = self.tuned.lock().expect("autotune lock poisoned");
        if let Some(choice) = tuned.get(family) {
            return Ok(choice.clone());
        }
        let key = format!(
            "{} | {:?} | {} {} | {family} | {:016x}",
            self.info.name,
            self.info.backend,
            self.info.driver,
            self.info.driver_info,
            source_hash(sources)
        );
        let path = self.autotune_cache.as_deref();
        let (entry, measured) = choose(path, &key, candidates, default, measure)?;
        if measured {
            let timings: Vec<String> = entry.timings_ms.iter().map(|(name, ms)| format!("{name} {ms:.2} ms")).collect();
            log::info!(
                "autotune: {family} uses `{}` ({}){}",
                entry.choice,
                timings.join(", "),
                path.map_or(String::new(), |p| format!("; saved in {}", p.display()))
            );
        }
        tuned.insert(family.to_string(), entry.choice.clone());
        Ok(entry.choice)
    }

    /// Returns whether this device chooses kernel variants by measurement.
    pub fn autotune(&self) -> Autotune {
        self.autotune
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    fn temp_cache(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("shadertune-autotune-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("autotune.json")
    }

    #[test]
    fn choose_needs_margin_over_default() {
        let times = |generic: f64, subgroup: f64| {
            move |c: &str| Ok(if c == "generic" { generic } else { subgroup })
        };
        let pick = |g, s| choose(None, "k", &["generic", "subgroup"], "subgroup", times(g, s)).unwrap().0.choice;
        assert_eq!(pick(10.0, 20.0), "generic");
        assert_eq!(pick(20.0, 10.0), "subgroup");
        // 5% faster is within the margin: the default stays.
        assert_eq!(pick(9.5, 10.0), "subgroup");
        assert_eq!(pick(8.9, 10.0), "generic");
    }

    #[test]
    fn cache_reuses_choice_and_measures_new_key() {
        let path = temp_cache("reuse");
        let calls = RefCell::new(Vec::new());
        let measure = |c: &str| {
            calls.borrow_mut().push(c.to_string());
            Ok(if c == "generic" { 5.0 } else { 50.0 })
        };
        let first = choose(Some(&path), "adapter | family | 1", &["generic", "subgroup"], "subgroup", measure).unwrap().0;
        assert_eq!(first.choice, "generic");
        assert_eq!(calls.borrow().len(), 2);
        let again = choose(Some(&path), "adapter | family | 1", &["generic", "subgroup"], "subgroup", |_| {
            panic!("a cached key is not measured again")
        })
        .unwrap()
        .0;
        assert_eq!(again.choice, "generic");
        assert_eq!(again.timings_ms["subgroup"], 50.0);
        // Another source hash is another key; the first entry stays in the file.
        let other = choose(Some(&path), "adapter | family | 2", &["generic", "subgroup"], "subgroup", |c| {
            Ok(if c == "generic" { 50.0 } else { 5.0 })
        })
        .unwrap()
        .0;
        assert_eq!(other.choice, "subgroup");
        let file = read_cache(&path);
        assert_eq!(file.entries.len(), 2);
        assert_eq!(file.entries["adapter | family | 1"].choice, "generic");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn cache_damaged_file_is_replaced() {
        let path = temp_cache("damaged");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"{\"format_version\": 1, \"entries\": {\"k\": {\"choi").unwrap();
        let entry = choose(Some(&path), "k", &["generic", "subgroup"], "subgroup", |c| Ok(if c == "generic" { 1.0 } else { 2.0 })).unwrap().0;
        assert_eq!(entry.choice, "generic");
        assert_eq!(read_cache(&path).entries["k"].choice, "generic");
        // A cached choice that is no longer a candidate is measured again.
        let entry = choose(Some(&path), "k", &["subgroup", "tiled"], "subgroup", |c| Ok(if c == "tiled" { 1.0 } else { 2.0 })).unwrap().0;
        assert_eq!(entry.choice, "tiled");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }

    #[test]
    fn cache_unwritable_still_chooses() {
        let blocker = temp_cache("unwritable");
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        // A regular file where the cache directory should be.
        let file_as_dir = blocker.parent().unwrap().join("not-a-dir");
        std::fs::write(&file_as_dir, b"x").unwrap();
        let path = file_as_dir.join("autotune.json");
        let entry = choose(Some(&path), "k", &["generic", "subgroup"], "subgroup", |c| Ok(if c == "generic" { 1.0 } else { 2.0 })).unwrap().0;
        assert_eq!(entry.choice, "generic");
        let _ = std::fs::remove_dir_all(blocker.parent().unwrap());
    }

    #[test]
    fn source_hash_is_stable_and_separates_texts() {
        assert_eq!(source_hash(&["a", "bc"]), source_hash(&["a", "bc"]));
        assert_ne!(source_hash(&["a", "bc"]), source_hash(&["ab", "c"]));
        assert_eq!(source_hash(&[]), 0xcbf2_9ce4_8422_2325);
    }

    #[test]
    fn autotune_setting_parses() {
        assert_eq!("on".parse::<Autotune>().unwrap(), Autotune::On);
        assert_eq!("OFF".parse::<Autotune>().unwrap(), Autotune::Off);
        assert!("maybe".parse::<Autotune>().unwrap_err().contains("expected on or off"));
    }
}
