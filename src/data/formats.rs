//! Parsers for the three labelled-data formats: TSV without quoting, CSV with a header, and
//! JSON Lines. Each turns the bytes of one file into examples.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use super::dataset::{ColumnSpec, DataFormat, Example, ReadOptions};
use super::DataError;

/// The UTF-8 byte-order mark that some editors put at the start of a file.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// Default CSV column and JSON field names.
const DEFAULT_TEXT_NAME: &str = "text";
const DEFAULT_LABEL_NAME: &str = "label";

/// Parses one file's bytes in the given format.
pub(super) fn parse(
    format: DataFormat,
    path: &Arc<Path>,
    bytes: &[u8],
    options: &ReadOptions,
) -> Result<Vec<Example>, DataError> {
    let bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(bytes);
    match format {
        DataFormat::Tsv => parse_tsv(path, bytes, options),
        DataFormat::Csv => parse_csv(path, bytes, options),
        DataFormat::Jsonl => parse_jsonl(path, bytes, options),
    }
}

/// Splits bytes on LF into (1-based line number, UTF-8 line) pairs, removing a CR before the
/// LF and skipping empty lines.
///
/// Only LF ends a line, so U+0085 (NEL) and U+2028 inside a text stay in that text.
fn decode_lines<'a>(path: &Path, bytes: &'a [u8]) -> Result<Vec<(usize, &'a str)>, DataError> {
    let mut lines = Vec::new();
    for (index, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.is_empty() {
            continue;
        }
        let line = std::str::from_utf8(raw).map_err(|e| DataError::InvalidUtf8 {
            path: path.to_path_buf(),
            line: index + 1,
            byte: e.valid_up_to(),
        })?;
        lines.push((index + 1, line));
    }
    if lines.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    Ok(lines)
}

/// Trims a label and rejects it when nothing is left.
fn clean_label(path: &Path, line: usize, raw: &str) -> Result<String, DataError> {
    let label = raw.trim();
    if label.is_empty() {
        return Err(DataError::EmptyLabel {
            path: path.to_path_buf(),
            line,
        });
    }
    Ok(label.to_string())
}

/// Finds a name among header names: an exact match first, then a case-insensitive one, both
/// after trimming.
fn find_name<'a>(names: impl Iterator<Item = &'a str> + Clone, requested: &str) -> Option<usize> {
    let requested = requested.trim();
    names
        .clone()
        .position(|name| name.trim() == requested)
        .or_else(|| {
            names
                .clone()
                .position(|name| name.trim().eq_ignore_ascii_case(requested))
        })
}

/// Formats header names for an error message, as `` `a`, `b` ``.
fn list_names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let quoted: Vec<String> = names.map(|n| format!("`{n}`")).collect();
    if quoted.is_empty() {
        "none".into()
    } else {
        quoted.join(", ")
    }
}

/// Resolves a column spec against a header row, or returns `None` for no spec.
fn resolve_in_header(
    path: &Path,
    header_line: usize,
    header: &[&str],
    spec: Option<&ColumnSpec>,
    role: &'static str,
) -> Result<Option<usize>, DataError> {
    let unknown = |column: &ColumnSpec| DataError::UnknownColumn {
        path: path.to_path_buf(),
        line: header_line,
        role,
        column: column.to_string(),
        found: list_names(header.iter().copied()),
    };
    let Some(column) = spec else {
        return Ok(None);
    };
    let index = match column {
        ColumnSpec::Name(name) => find_name(header.iter().copied(), name),
        ColumnSpec::Index(index) => Some(*index).filter(|&i| i < header.len()),
    };
    index.map(Some).ok_or_else(|| unknown(column))
}

fn check_distinct(
    path: &Path,
    text: usize,
    label: usize,
    column: &ColumnSpec,
) -> Result<(), DataError> {
    if text == label {
        return Err(DataError::SameColumn {
            path: path.to_path_buf(),
            column: column.to_string(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// TSV
// ---------------------------------------------------------------------------------------------

/// Parses tab-separated lines. Quotes are ordinary characters, so every line is one row.
fn parse_tsv(
    path: &Arc<Path>,
    bytes: &[u8],
    options: &ReadOptions,
) -> Result<Vec<Example>, DataError> {
    let lines = decode_lines(path, bytes)?;
    let by_name = matches!(options.text_column, Some(ColumnSpec::Name(_)))
        || matches!(options.label_column, Some(ColumnSpec::Name(_)));
    let has_header = options.tsv_header.unwrap_or(by_name);

    let (header, data_lines) = if has_header {
        let (line, text) = lines[0];
        if lines.len() == 1 {
            return Err(DataError::HeaderOnly {
                path: path.to_path_buf(),
                line,
            });
        }
        (
            Some((line, text.split('\t').collect::<Vec<_>>())),
            &lines[1..],
        )
    } else {
        (None, &lines[..])
    };

    let rows: Vec<(usize, Vec<&str>)> = data_lines
        .iter()
        .map(|&(line, text)| (line, text.split('\t').collect()))
        .collect();
    let expected_fields = header.as_ref().map_or(2, |(_, names)| names.len().max(2));
    for (line, fields) in &rows {
        if fields.len() == 1 {
            return Err(DataError::MissingSeparator {
                path: path.to_path_buf(),
                line: *line,
                expected: expected_fields,
            });
        }
    }

    let (text_index, label_index) = tsv_columns(path, header.as_ref(), &rows, options)?;
    let (role, last_index) = if text_index >= label_index {
        ("text", text_index)
    } else {
        ("label", label_index)
    };
    // An index of usize::MAX, which no line can reach, would overflow the field count.
    let Some(needed) = last_index.checked_add(1) else {
        let (line, fields) = &rows[0];
        return Err(DataError::UnknownColumn {
            path: path.to_path_buf(),
            line: *line,
            role,
            column: format!("index {last_index}"),
            found: format!("indices 0 to {}", fields.len() - 1),
        });
    };
    let mut examples = Vec::with_capacity(rows.len());
    for (line, fields) in rows {
        if fields.len() < needed {
            return Err(DataError::FieldCount {
                path: path.to_path_buf(),
                line,
                found: fields.len(),
                expected: format!("at least {needed}"),
                hint: format!("the text is column {text_index} and the label column {label_index}"),
            });
        }
        examples.push(Example {
            text: fields[text_index].to_string(),
            label: clean_label(path, line, fields[label_index])?,
            file: Arc::clone(path),
            line,
        });
    }
    Ok(examples)
}

/// Works out the (text, label) column indices of a TSV file.
fn tsv_columns(
    path: &Path,
    header: Option<&(usize, Vec<&str>)>,
    rows: &[(usize, Vec<&str>)],
    options: &ReadOptions,
) -> Result<(usize, usize), DataError> {
    let resolve = |spec: Option<&ColumnSpec>,
                   role: &'static str|
     -> Result<Option<usize>, DataError> {
        match (spec, header) {
            (Some(spec), Some((line, names))) => resolve_in_header(path, *line, names, Some(spec), role),
            (Some(ColumnSpec::Name(name)), None) => Err(DataError::UnknownColumn {
                path: path.to_path_buf(),
                line: rows[0].0,
                role,
                column: format!("`{name}`"),
                found: "none, because the file is read without a header row; select columns by index or read the first line as a header".into(),
            }),
            (Some(ColumnSpec::Index(index)), None) => Ok(Some(*index)),
            (None, _) => Ok(None),
        }
    };
    let text = resolve(options.text_column.as_ref(), "text")?;
    let label = resolve(options.label_column.as_ref(), "label")?;

    match (text, label) {
        (Some(text), Some(label)) => {
            check_distinct(path, text, label, options.text_column.as_ref().unwrap())?;
            Ok((text, label))
        }
        (Some(text), None) => {
            require_two_fields(path, rows, "select the label column too")?;
            if text > 1 {
                return Err(index_outside_two_columns(path, rows[0].0, "text", text));
            }
            Ok((text, 1 - text))
        }
        (None, Some(label)) => {
            require_two_fields(path, rows, "select the text column too")?;
            if label > 1 {
                return Err(index_outside_two_columns(path, rows[0].0, "label", label));
            }
            Ok((1 - label, label))
        }
        (None, None) => {
            require_two_fields(path, rows, "select the text and label columns by index")?;
            let label = detect_label_column(path, rows)?;
            Ok((1 - label, label))
        }
    }
}

fn index_outside_two_columns(
    path: &Path,
    line: usize,
    role: &'static str,
    index: usize,
) -> DataError {
    DataError::UnknownColumn {
        path: path.to_path_buf(),
        line,
        role,
        column: format!("index {index}"),
        found: "indices 0 and 1".into(),
    }
}

/// Checks that every row has exactly two fields, which the column defaults need.
fn require_two_fields(
    path: &Path,
    rows: &[(usize, Vec<&str>)],
    hint: &str,
) -> Result<(), DataError> {
    match rows.iter().find(|(_, fields)| fields.len() != 2) {
        Some((line, fields)) => Err(DataError::FieldCount {
            path: path.to_path_buf(),
            line: *line,
            found: fields.len(),
            expected: "2 (text and label)".into(),
            hint: format!("with more than two columns, {hint}"),
        }),
        None => Ok(()),
    }
}

/// Picks the label column of a two-column file: the column with fewer distinct trimmed values,
/// then the one whose longest value has fewer characters.
fn detect_label_column(path: &Path, rows: &[(usize, Vec<&str>)]) -> Result<usize, DataError> {
    let stats = |column: usize| {
        let distinct: HashSet<&str> = rows.iter().map(|(_, f)| f[column].trim()).collect();
        let max_chars = rows
            .iter()
            .map(|(_, f)| f[column].trim().chars().count())
            .max()
            .unwrap_or(0);
        (distinct.len(), max_chars)
    };
    let first = stats(0);
    let second = stats(1);
    match first.cmp(&second) {
        std::cmp::Ordering::Less => Ok(0),
        std::cmp::Ordering::Greater => Ok(1),
        std::cmp::Ordering::Equal => Err(DataError::AmbiguousLabelColumn {
            path: path.to_path_buf(),
            distinct: first.0,
            max_chars: first.1,
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// CSV
// ---------------------------------------------------------------------------------------------

/// Parses CSV with a header row through the csv crate (RFC 4180 quoting, quoted newlines).
fn parse_csv(
    path: &Arc<Path>,
    bytes: &[u8],
    options: &ReadOptions,
) -> Result<Vec<Example>, DataError> {
    // `decode_lines` reports an empty file and the first invalid UTF-8 line with its number.
    decode_lines(path, bytes)?;

    let csv_error = |e: csv::Error| DataError::Csv {
        path: path.to_path_buf(),
        line: e.position().map_or(1, |p| p.line() as usize),
        message: e.to_string(),
    };
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let header_record = reader.headers().map_err(csv_error)?.clone();
    let header_line = header_record.position().map_or(1, |p| p.line() as usize);
    let header: Vec<&str> = header_record.iter().collect();

    let text_spec = options
        .text_column
        .clone()
        .unwrap_or(ColumnSpec::Name(DEFAULT_TEXT_NAME.into()));
    let label_spec = options
        .label_column
        .clone()
        .unwrap_or(ColumnSpec::Name(DEFAULT_LABEL_NAME.into()));
    let text_index = resolve_in_header(path, header_line, &header, Some(&text_spec), "text")?
        .expect("a given spec resolves to an index or an error");
    let label_index = resolve_in_header(path, header_line, &header, Some(&label_spec), "label")?
        .expect("a given spec resolves to an index or an error");
    check_distinct(path, text_index, label_index, &text_spec)?;
    let needed = text_index.max(label_index) + 1;

    let mut examples = Vec::new();
    let mut record = csv::StringRecord::new();
    while reader.read_record(&mut record).map_err(csv_error)? {
        let line = record.position().map_or(0, |p| p.line() as usize);
        if record.len() < needed {
            return Err(DataError::FieldCount {
                path: path.to_path_buf(),
                line,
                found: record.len(),
                expected: format!("at least {needed}"),
                hint: format!(
                    "the header has {} columns; quote fields that contain commas",
                    header.len()
                ),
            });
        }
        examples.push(Example {
            text: record[text_index].to_string(),
            label: clean_label(path, line, &record[label_index])?,
            file: Arc::clone(path),
            line,
        });
    }
    if examples.is_empty() {
        return Err(DataError::HeaderOnly {
            path: path.to_path_buf(),
            line: header_line,
        });
    }
    Ok(examples)
}

// ---------------------------------------------------------------------------------------------
// JSON Lines
// ---------------------------------------------------------------------------------------------

/// Parses one JSON object per line. The text field must be a string. The label may be a string,
/// a number or a boolean, and numbers and booleans become their JSON text (`1`, `true`).
fn parse_jsonl(
    path: &Arc<Path>,
    bytes: &[u8],
    options: &ReadOptions,
) -> Result<Vec<Example>, DataError> {
    let field_name = |spec: &Option<ColumnSpec>, default: &str, role: &'static str| match spec {
        None => Ok(default.to_string()),
        Some(ColumnSpec::Name(name)) => Ok(name.clone()),
        Some(ColumnSpec::Index(index)) => Err(DataError::ColumnIndexInJson {
            path: path.to_path_buf(),
            role,
            index: *index,
        }),
    };
    let text_name = field_name(&options.text_column, DEFAULT_TEXT_NAME, "text")?;
    let label_name = field_name(&options.label_column, DEFAULT_LABEL_NAME, "label")?;

    let mut examples = Vec::new();
    for (line, text) in decode_lines(path, bytes)? {
        if text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| DataError::Json {
            path: path.to_path_buf(),
            line,
            message: e.to_string(),
        })?;
        let serde_json::Value::Object(object) = value else {
            let hint = if value.is_array() && examples.is_empty() {
                "; a JSON array of records must be rewritten with one object per line"
            } else {
                ""
            };
            return Err(DataError::InvalidRecord {
                path: path.to_path_buf(),
                line,
                message: format!(
                    "expected a JSON object with `{text_name}` and `{label_name}` fields, found {}{hint}",
                    json_kind(&value)
                ),
            });
        };

        let keys = || object.keys().map(String::as_str);
        let lookup = |name: &str, role: &'static str| {
            find_name(keys(), name)
                .map(|index| {
                    object
                        .values()
                        .nth(index)
                        .expect("index comes from the same map")
                })
                .ok_or_else(|| DataError::UnknownColumn {
                    path: path.to_path_buf(),
                    line,
                    role,
                    column: format!("`{name}`"),
                    found: list_names(keys()),
                })
        };
        let text_value = lookup(&text_name, "text")?;
        let label_value = lookup(&label_name, "label")?;

        let serde_json::Value::String(text) = text_value else {
            return Err(DataError::InvalidRecord {
                path: path.to_path_buf(),
                line,
                message: format!(
                    "field `{text_name}` is {}, expected a string",
                    json_kind(text_value)
                ),
            });
        };
        let label = match label_value {
            serde_json::Value::String(label) => label.clone(),
            serde_json::Value::Number(number) => number.to_string(),
            serde_json::Value::Bool(flag) => flag.to_string(),
            serde_json::Value::Null => String::new(),
            other => {
                return Err(DataError::InvalidRecord {
                    path: path.to_path_buf(),
                    line,
                    message: format!(
                        "field `{label_name}` is {}, expected a string, number or boolean",
                        json_kind(other)
                    ),
                })
            }
        };
        examples.push(Example {
            text: text.clone(),
            label: clean_label(path, line, &label)?,
            file: Arc::clone(path),
            line,
        });
    }
    if examples.is_empty() {
        return Err(DataError::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    Ok(examples)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
