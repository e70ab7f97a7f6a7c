//! Labelled text datasets: options, the in-memory dataset and the entry point that reads a file
//! or a directory of files.
//!
//! The parsers for each format live in `formats.rs`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use super::formats;
use super::DataError;

/// On-disk format of a labelled data file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataFormat {
    /// Tab-separated values without quoting: a tab always separates fields and a quote is an
    /// ordinary character.
    Tsv,
    /// Comma-separated values with a header row, RFC 4180 quoting and quoted embedded newlines.
    Csv,
    /// JSON Lines: one JSON object per line.
    Jsonl,
}

impl DataFormat {
    /// Detects the format from a file extension (case-insensitive): `.tsv`, `.txt` or no
    /// extension means TSV, `.csv` means CSV, and `.jsonl`, `.ndjson` or `.json` mean JSON Lines.
    ///
    /// Returns `Err` with the extension for any other extension.
    pub fn from_path(path: &Path) -> Result<Self, String> {
        let Some(extension) = path.extension() else {
            return Ok(Self::Tsv);
        };
        let extension = extension.to_string_lossy();
        match extension.to_ascii_lowercase().as_str() {
            "tsv" | "txt" => Ok(Self::Tsv),
            "csv" => Ok(Self::Csv),
            "jsonl" | "ndjson" | "json" => Ok(Self::Jsonl),
            _ => Err(extension.into_owned()),
        }
    }
}

impl FromStr for DataFormat {
    type Err = String;

    /// Parses `tsv`, `csv`, `jsonl` or `json` (case-insensitive).
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name.to_ascii_lowercase().as_str() {
            "tsv" => Ok(Self::Tsv),
            "csv" => Ok(Self::Csv),
            "jsonl" | "json" => Ok(Self::Jsonl),
            _ => Err(format!(
                "unknown data format `{name}`, expected tsv, csv or jsonl"
            )),
        }
    }
}

impl fmt::Display for DataFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tsv => "tsv",
            Self::Csv => "csv",
            Self::Jsonl => "jsonl",
        })
    }
}

/// Selects the text or the label column of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ColumnSpec {
    /// A header name (CSV, TSV with a header) or JSON field name, compared case-insensitively
    /// after trimming whitespace. An exact match wins over a case-insensitive one.
    Name(String),
    /// A 0-based column index. In CSV and TSV files with a header it counts header fields.
    /// JSON Lines files reject it because JSON objects have no column order.
    Index(usize),
}

impl fmt::Display for ColumnSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => write!(f, "`{name}`"),
            Self::Index(index) => write!(f, "index {index}"),
        }
    }
}

impl FromStr for ColumnSpec {
    type Err = std::convert::Infallible;

    /// Parses a decimal number as an index and anything else as a name.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text.trim().parse::<usize>() {
            Ok(index) => Self::Index(index),
            Err(_) => Self::Name(text.to_string()),
        })
    }
}

/// Format and column selection for [`read_labelled`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReadOptions {
    /// Format of every file read. `None` detects it from each file's extension.
    pub format: Option<DataFormat>,
    /// The text column. With `None`, a two-column TSV file uses the column that is not the
    /// label column. CSV and JSON Lines files use the column or field named `text`.
    pub text_column: Option<ColumnSpec>,
    /// The label column. With `None`, a two-column TSV file uses the column with fewer distinct
    /// values, and on a tie the one whose maximum value length is shorter. That is column 0 of
    /// `label<TAB>text` files such as the SMS Spam Collection and column 1 of `text<TAB>label`
    /// files such as the Sentiment Labelled Sentences. CSV and JSON Lines files use the column or
    /// field named `label`.
    pub label_column: Option<ColumnSpec>,
    /// Whether the first non-blank line of a TSV file is a header. `None` means a header exists
    /// exactly when a column is selected by name. CSV files always have a header.
    pub tsv_header: Option<bool>,
}

/// One labelled text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// The text as stored in the file. It is not trimmed, and it may be empty.
    pub text: String,
    /// The label, with surrounding whitespace removed. Never empty.
    pub label: String,
    /// The file the example was read from.
    pub file: Arc<Path>,
    /// 1-based line of the example in `file`; for a CSV record that spans several lines, the
    /// line where it starts.
    pub line: usize,
}

/// Labelled examples read from one file or a directory.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// Examples in file order, files sorted by name.
    pub examples: Vec<Example>,
    /// The distinct labels, sorted by byte order. A label's index in this list is its class index.
    pub label_names: Vec<String>,
    /// Rows read from all files. Every row becomes an example.
    pub rows_read: usize,
    /// Number of examples of each label.
    pub rows_per_label: BTreeMap<String, usize>,
    /// The files read, in reading order.
    pub files: Vec<PathBuf>,
}

/// File name prefixes (lower case) of documentation files that a directory read skips.
const DOCUMENTATION_PREFIXES: [&str; 5] = ["readme", "license", "licence", "copying", "notice"];

/// Reads labelled text from a TSV, CSV or JSON Lines file, or from every data file of a
/// directory, concatenated in file name order.
///
/// A UTF-8 byte-order mark at the start of a file and CR before LF are removed. Empty lines are
/// skipped (in CSV only outside quotes), and so are whitespace-only lines in JSON Lines. Labels are trimmed, and texts are kept as they are.
///
/// In a directory, a data file is a regular file that is not hidden, whose name does not start
/// with README, LICENSE, LICENCE, COPYING or NOTICE (case-insensitive), and whose extension names
/// a format. With `options.format` set, the extension is not checked.
///
/// Returns a [`DataError`] that names the file, and the line where one applies, for each of these:
/// an empty file, a header without rows, a TSV line without a tab, the wrong number of fields, an
/// empty label, invalid UTF-8 or a column not in the file. Fewer than two distinct labels in the
/// whole input are also an error.
pub fn read_labelled(path: &Path, options: &ReadOptions) -> Result<Dataset, DataError> {
    let metadata = std::fs::metadata(path).map_err(|error| DataError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let files = if metadata.is_dir() {
        list_data_files(path, options.format.is_some())?
    } else {
        vec![path.to_path_buf()]
    };

    let mut examples = Vec::new();
    for file in &files {
        let format = match options.format {
            Some(format) => format,
            None => DataFormat::from_path(file).map_err(|extension| DataError::UnknownFormat {
                path: file.clone(),
                extension,
            })?,
        };
        let bytes = std::fs::read(file).map_err(|error| DataError::Read {
            path: file.clone(),
            error,
        })?;
        let file_path: Arc<Path> = Arc::from(file.as_path());
        let mut read = formats::parse(format, &file_path, &bytes, options)?;
        examples.append(&mut read);
    }
    summarize(path, files, examples)
}

/// Lists the data files of a directory, sorted by file name. See [`read_labelled`] for which
/// files count as data.
pub fn list_data_files(dir: &Path, any_extension: bool) -> Result<Vec<PathBuf>, DataError> {
    let read_error = |error| DataError::Read {
        path: dir.to_path_buf(),
        error,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_error)? {
        let entry = entry.map_err(read_error)?;
        let path = entry.path();
        // `metadata` follows symbolic links, so a link to a regular file counts as one.
        let is_file = std::fs::metadata(&path)
            .map(|m| m.is_file())
            .unwrap_or(false);
        if is_file && is_data_file_name(&path, any_extension) {
            files.push(path);
        }
    }
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    if files.is_empty() {
        return Err(DataError::NoDataFiles {
            path: dir.to_path_buf(),
        });
    }
    Ok(files)
}

fn is_data_file_name(path: &Path, any_extension: bool) -> bool {
    let Some(name) = path.file_name() else {
        return false;
    };
    let name = name.to_string_lossy().to_ascii_lowercase();
    if name.starts_with('.') {
        return false;
    }
    if DOCUMENTATION_PREFIXES
        .iter()
        .any(|prefix| name.starts_with(prefix))
    {
        return false;
    }
    any_extension || DataFormat::from_path(path).is_ok()
}

/// Counts labels and checks that there are at least two.
fn summarize(
    path: &Path,
    files: Vec<PathBuf>,
    examples: Vec<Example>,
) -> Result<Dataset, DataError> {
    let mut rows_per_label = BTreeMap::new();
    for example in &examples {
        *rows_per_label.entry(example.label.clone()).or_insert(0) += 1;
    }
    if rows_per_label.len() < 2 {
        let first = examples
            .first()
            .expect("every file read has at least one row, so a dataset is never empty");
        return Err(DataError::SingleLabel {
            path: path.to_path_buf(),
            label: first.label.clone(),
            rows: examples.len(),
            first_file: first.file.to_path_buf(),
            first_line: first.line,
        });
    }
    Ok(Dataset {
        rows_read: examples.len(),
        label_names: rows_per_label.keys().cloned().collect(),
        rows_per_label,
        examples,
        files,
    })
}

#[cfg(test)]
#[path = "dataset_tests.rs"]
mod tests;
