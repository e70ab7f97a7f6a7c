//! Errors of the tokenizer, the dataset readers, splitting and batching.

use std::path::PathBuf;

/// Failure while loading a tokenizer, reading labelled data or preparing batches.
///
/// Every message about a data file names the file and, where one applies, the 1-based line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file or directory could not be read.
    #[error("failed to read {}: {error}", .path.display())]
    Read {
        /// File or directory that failed.
        path: PathBuf,
        /// Underlying I/O error. The message includes it, so it is not also reported as the
        /// error's source, which would print it twice in an error chain.
        error: std::io::Error,
    },

    /// A file could not be written.
    #[error("failed to write {}: {error}", .path.display())]
    Write {
        /// File that failed.
        path: PathBuf,
        /// Underlying I/O error, included in the message and not reported as the source.
        error: std::io::Error,
    },

    /// The file has no bytes, or only blank lines and a byte-order mark.
    #[error("{} is empty: expected labelled rows, found no non-blank line", .path.display())]
    EmptyFile {
        /// The empty file.
        path: PathBuf,
    },

    /// The file has a header row and nothing after it.
    #[error("{} line {line}: found only the header row, expected data rows after it", .path.display())]
    HeaderOnly {
        /// The file.
        path: PathBuf,
        /// Line of the header.
        line: usize,
    },

    /// A TSV line has no tab character.
    #[error(
        "{} line {line}: no tab separator found, expected {expected} tab-separated fields such as `spam<TAB>text`",
        .path.display()
    )]
    MissingSeparator {
        /// The file.
        path: PathBuf,
        /// The line without a tab.
        line: usize,
        /// Number of fields expected on each line.
        expected: usize,
    },

    /// A line or record has the wrong number of fields.
    #[error("{} line {line}: found {found} fields, expected {expected}; {hint}", .path.display())]
    FieldCount {
        /// The file.
        path: PathBuf,
        /// Line of the line or record.
        line: usize,
        /// Fields found.
        found: usize,
        /// Fields expected, such as "2" or "at least 4".
        expected: String,
        /// Suggested fix.
        hint: String,
    },

    /// The label field is empty or only whitespace.
    #[error("{} line {line}: the label is empty, expected a label such as `spam` or `1`", .path.display())]
    EmptyLabel {
        /// The file.
        path: PathBuf,
        /// The line with the empty label.
        line: usize,
    },

    /// A line is not valid UTF-8.
    #[error(
        "{} line {line}: invalid UTF-8 at byte {byte} of the line; re-encode the file as UTF-8",
        .path.display()
    )]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// The line with the invalid bytes.
        line: usize,
        /// 0-based byte offset of the first invalid byte within the line.
        byte: usize,
    },

    /// A text or label column named or numbered in the options is not in the file.
    #[error("{} line {line}: {role} column {column} not found; columns found: {found}", .path.display())]
    UnknownColumn {
        /// The file.
        path: PathBuf,
        /// Line of the header or record that was searched.
        line: usize,
        /// `text` or `label`.
        role: &'static str,
        /// The requested column, as a quoted name or an index.
        column: String,
        /// The columns that the line has.
        found: String,
    },

    /// The extension of a file names no known format.
    #[error(
        "cannot tell the format of {} from its extension `{extension}`: expected .tsv, .txt, .csv, .jsonl or .json, or no extension; set the format explicitly",
        .path.display()
    )]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// Its extension.
        extension: String,
    },

    /// The text and label columns are the same column.
    #[error("{}: the text and label columns are both {column}; select two different columns", .path.display())]
    SameColumn {
        /// The file.
        path: PathBuf,
        /// The column, as a quoted name or an index.
        column: String,
    },

    /// A JSON Lines file was given a column index, but JSON objects have no column order.
    #[error(
        "{}: {role} column index {index} cannot select a JSON field because JSON objects have no column order; select the field by name",
        .path.display()
    )]
    ColumnIndexInJson {
        /// The file.
        path: PathBuf,
        /// `text` or `label`.
        role: &'static str,
        /// The rejected index.
        index: usize,
    },

    /// Neither column of a two-column TSV file looks more like a label column than the other.
    #[error(
        "{}: cannot tell which column holds the labels because both have {distinct} distinct values of at most {max_chars} characters; set the label column",
        .path.display()
    )]
    AmbiguousLabelColumn {
        /// The file.
        path: PathBuf,
        /// Distinct values in each column.
        distinct: usize,
        /// Maximum value length in each column, in characters.
        max_chars: usize,
    },

    /// All rows have the same label.
    #[error(
        "{}: all {rows} rows have the label `{label}` (first at {} line {first_line}); a classifier needs at least two distinct labels",
        .path.display(), .first_file.display()
    )]
    SingleLabel {
        /// The file or directory that was read.
        path: PathBuf,
        /// The only label found.
        label: String,
        /// Rows read.
        rows: usize,
        /// File of the first row.
        first_file: PathBuf,
        /// Line of the first row.
        first_line: usize,
    },

    /// The csv crate rejected a record.
    #[error("{} line {line}: invalid CSV: {message}", .path.display())]
    Csv {
        /// The file.
        path: PathBuf,
        /// Line where the record starts.
        line: usize,
        /// The parser's message.
        message: String,
    },

    /// A JSON Lines line is not valid JSON.
    #[error("{} line {line}: invalid JSON: {message}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// The parser's message.
        message: String,
    },

    /// A record parses but does not have the expected shape, such as a JSON line that is not an
    /// object or a text field that is not a string.
    #[error("{} line {line}: {message}", .path.display())]
    InvalidRecord {
        /// The file.
        path: PathBuf,
        /// The line.
        line: usize,
        /// Description of the value found and the value expected.
        message: String,
    },

    /// A directory has no file that the reader treats as data.
    #[error(
        "{} contains no data files: expected files ending in .tsv, .txt, .csv, .jsonl or .json, or without an extension (README, LICENSE and hidden files are skipped)",
        .path.display()
    )]
    NoDataFiles {
        /// The directory.
        path: PathBuf,
    },

    /// The tokenizer files are missing or invalid.
    #[error("tokenizer {}: {message}", .path.display())]
    Tokenizer {
        /// The tokenizer directory or file.
        path: PathBuf,
        /// Description of the failure and the fix.
        message: String,
    },

    /// The train, validation and test fractions are invalid.
    #[error(
        "invalid split fractions train={train}, validation={validation}, test={test}: {reason}"
    )]
    InvalidFractions {
        /// Train fraction.
        train: f64,
        /// Validation fraction.
        validation: f64,
        /// Test fraction.
        test: f64,
        /// The rule that failed.
        reason: String,
    },

    /// An example's label is not in the list of label names.
    #[error(
        "{} line {line}: label `{label}` is not one of the known labels [{known}]",
        .path.display()
    )]
    UnknownLabel {
        /// File of the example.
        path: PathBuf,
        /// Line of the example.
        line: usize,
        /// The label.
        label: String,
        /// The known labels, comma-separated.
        known: String,
    },

    /// A size argument is out of range, such as a batch size of 0.
    #[error("invalid {name} {value}: {reason}")]
    InvalidArgument {
        /// Argument name.
        name: &'static str,
        /// The rejected value.
        value: usize,
        /// The rule it breaks.
        reason: String,
    },

    /// A training set is smaller than one batch, so dropping the last partial batch leaves nothing.
    #[error(
        "{examples} training examples are fewer than the batch size {batch_size}, so no full batch can be formed; lower the batch size or add data"
    )]
    TooFewExamples {
        /// Examples available.
        examples: usize,
        /// Requested batch size.
        batch_size: usize,
    },
}
