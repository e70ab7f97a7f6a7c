//! Reader rules and error messages, on small files written to a temporary directory.

use super::*;
use std::path::PathBuf;

/// Writes `contents` to `name` in a fresh temporary directory.
fn write_file(name: &str, contents: &[u8]) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap();
    (dir, path)
}

fn read(name: &str, contents: &str) -> Result<Dataset, DataError> {
    let (_dir, path) = write_file(name, contents.as_bytes());
    read_labelled(&path, &ReadOptions::default())
}

/// Reads a file that must fail and checks that the message names the file and `expected`.
fn read_error(name: &str, contents: &[u8], options: &ReadOptions, expected: &[&str]) -> String {
    let (_dir, path) = write_file(name, contents);
    let message = read_labelled(&path, options)
        .expect_err("reading should fail")
        .to_string();
    assert!(
        message.contains(&path.display().to_string()),
        "message `{message}` does not name the file {}",
        path.display()
    );
    for part in expected {
        assert!(message.contains(part), "message `{message}` lacks `{part}`");
    }
    message
}

fn texts(dataset: &Dataset) -> Vec<&str> {
    dataset.examples.iter().map(|e| e.text.as_str()).collect()
}

fn labels(dataset: &Dataset) -> Vec<&str> {
    dataset.examples.iter().map(|e| e.label.as_str()).collect()
}

const SMS_LIKE: &str = "ham\tGo until jurong point, crazy\nspam\tFree entry in 2 a wkly comp\nham\tOk lar... Joking wif u oni\n";
const SENTIMENT_LIKE: &str = "So there is no way for me to plug it in here.\t0\nGood case, Excellent value.\t1\nGreat for the jawbone.\t1\n";

#[test]
fn tsv_label_first_is_detected() {
    let dataset = read("SMSSpamCollection", SMS_LIKE).unwrap();
    assert_eq!(labels(&dataset), ["ham", "spam", "ham"]);
    assert_eq!(texts(&dataset)[1], "Free entry in 2 a wkly comp");
    assert_eq!(dataset.label_names, ["ham", "spam"]);
    assert_eq!(dataset.rows_read, 3);
    assert_eq!(dataset.rows_per_label["ham"], 2);
    assert_eq!(dataset.rows_per_label["spam"], 1);
    let lines: Vec<usize> = dataset.examples.iter().map(|e| e.line).collect();
    assert_eq!(lines, [1, 2, 3]);
}

#[test]
fn tsv_label_last_is_detected() {
    let dataset = read("amazon.txt", SENTIMENT_LIKE).unwrap();
    assert_eq!(labels(&dataset), ["0", "1", "1"]);
    assert_eq!(texts(&dataset)[2], "Great for the jawbone.");
    assert_eq!(dataset.label_names, ["0", "1"]);
}

#[test]
fn tsv_treats_quotes_as_text() {
    let contents = "\"Quoted start\t1\nA \"stray\" quote and \"unclosed\t0\n\"\"\t1\n";
    let dataset = read("quotes.tsv", contents).unwrap();
    assert_eq!(
        texts(&dataset),
        ["\"Quoted start", "A \"stray\" quote and \"unclosed", "\"\""]
    );
    assert_eq!(labels(&dataset), ["1", "0", "1"]);
}

#[test]
fn crlf_and_bom_are_removed() {
    let contents = b"\xEF\xBB\xBFham\tfirst message\r\nspam\tsecond message\r\n";
    let (_dir, path) = write_file("data.tsv", contents);
    let dataset = read_labelled(&path, &ReadOptions::default()).unwrap();
    assert_eq!(
        labels(&dataset),
        ["ham", "spam"],
        "the BOM must not stick to the first label"
    );
    assert_eq!(
        texts(&dataset),
        ["first message", "second message"],
        "CR must be removed"
    );

    let csv = b"\xEF\xBB\xBFtext,label\r\nhello there,a\r\nbye now,b\r\n";
    let (_dir, path) = write_file("data.csv", csv);
    let dataset = read_labelled(&path, &ReadOptions::default()).unwrap();
    assert_eq!(
        labels(&dataset),
        ["a", "b"],
        "the BOM must not stick to the header"
    );
    assert_eq!(texts(&dataset), ["hello there", "bye now"]);
}

#[test]
fn only_lf_ends_a_line() {
    // U+0085 (NEL) occurs inside IMDB sentences; it must not split them.
    let contents = "A film\u{85}with a break.  \t1\nDull.  \t0\n";
    let dataset = read("imdb.txt", contents).unwrap();
    assert_eq!(dataset.rows_read, 2);
    assert_eq!(
        texts(&dataset)[0],
        "A film\u{85}with a break.  ",
        "text keeps its spaces"
    );
}

#[test]
fn blank_lines_are_skipped_and_lines_counted() {
    let dataset = read("gaps.tsv", "ham\tone message\n\nspam\tanother message\n\n").unwrap();
    let lines: Vec<usize> = dataset.examples.iter().map(|e| e.line).collect();
    assert_eq!(lines, [1, 3]);
}

#[test]
fn labels_are_trimmed() {
    let dataset = read("trim.tsv", "first text here\t 1 \nsecond text here\t0\n").unwrap();
    assert_eq!(labels(&dataset), ["1", "0"]);
}

#[test]
fn tsv_columns_by_index() {
    let contents = "7\tspam\tWin a prize now\n8\tham\tSee you at noon\n";
    let options = ReadOptions {
        text_column: Some(ColumnSpec::Index(2)),
        label_column: Some(ColumnSpec::Index(1)),
        ..ReadOptions::default()
    };
    let (_dir, path) = write_file("three.tsv", contents.as_bytes());
    let dataset = read_labelled(&path, &options).unwrap();
    assert_eq!(labels(&dataset), ["spam", "ham"]);
    assert_eq!(texts(&dataset), ["Win a prize now", "See you at noon"]);
}

#[test]
fn tsv_columns_by_name_read_header() {
    let contents = "Label\tSMS\nspam\tWin a prize now\nham\tSee you at noon\n";
    let options = ReadOptions {
        text_column: Some(ColumnSpec::Name("sms".into())),
        label_column: Some(ColumnSpec::Name("label".into())),
        ..ReadOptions::default()
    };
    let (_dir, path) = write_file("header.tsv", contents.as_bytes());
    let dataset = read_labelled(&path, &options).unwrap();
    assert_eq!(labels(&dataset), ["spam", "ham"]);
    assert_eq!(dataset.examples[0].line, 2);
}

#[test]
fn tsv_one_column_given_implies_other() {
    let options = ReadOptions {
        label_column: Some(ColumnSpec::Index(1)),
        ..ReadOptions::default()
    };
    let (_dir, path) = write_file("pair.tsv", b"x\ta\ny\tb\n");
    let dataset = read_labelled(&path, &options).unwrap();
    assert_eq!(labels(&dataset), ["a", "b"]);
    assert_eq!(texts(&dataset), ["x", "y"]);
}

#[test]
fn csv_quoting_and_embedded_newlines() {
    let contents =
        "id,Text,LABEL\n1,\"Hello, \"\"friend\"\"\nsecond line\",spam\n2,plain text,ham\n";
    let dataset = read("data.csv", contents).unwrap();
    assert_eq!(
        texts(&dataset),
        ["Hello, \"friend\"\nsecond line", "plain text"]
    );
    assert_eq!(labels(&dataset), ["spam", "ham"]);
    let lines: Vec<usize> = dataset.examples.iter().map(|e| e.line).collect();
    assert_eq!(lines, [2, 4], "a record's line is the line where it starts");
}

#[test]
fn csv_columns_by_name_and_index() {
    let contents = "message,category\nhello there,a\nbye now,b\n";
    let (_dir, path) = write_file("named.csv", contents.as_bytes());
    let by_name = ReadOptions {
        text_column: Some(ColumnSpec::Name("Message".into())),
        label_column: Some(ColumnSpec::Name("category".into())),
        ..ReadOptions::default()
    };
    let by_index = ReadOptions {
        text_column: Some(ColumnSpec::Index(0)),
        label_column: Some(ColumnSpec::Index(1)),
        ..ReadOptions::default()
    };
    for options in [by_name, by_index] {
        let dataset = read_labelled(&path, &options).unwrap();
        assert_eq!(
            texts(&dataset),
            ["hello there", "bye now"],
            "options {options:?}"
        );
        assert_eq!(labels(&dataset), ["a", "b"], "options {options:?}");
    }
}

#[test]
fn jsonl_reads_strings_numbers_and_case() {
    let contents = "{\"Text\": \"great phone\", \"label\": 1}\n\n{\"text\": \"broke in a day\", \"LABEL\": \"0\", \"id\": 9}\r\n{\"TEXT\": \"fine\", \"label\": true}\n";
    let dataset = read("data.jsonl", contents).unwrap();
    assert_eq!(texts(&dataset), ["great phone", "broke in a day", "fine"]);
    assert_eq!(labels(&dataset), ["1", "0", "true"]);
    let lines: Vec<usize> = dataset.examples.iter().map(|e| e.line).collect();
    assert_eq!(lines, [1, 3, 4]);
}

#[test]
fn jsonl_exact_name_wins() {
    let contents = "{\"TEXT\": \"upper\", \"text\": \"lower\", \"label\": \"a\"}\n{\"text\": \"x\", \"label\": \"b\"}\n";
    let dataset = read("exact.jsonl", contents).unwrap();
    assert_eq!(texts(&dataset)[0], "lower");
}

#[test]
fn format_override_and_extensions() {
    let (_dir, path) = write_file("data.dat", SMS_LIKE.as_bytes());
    read_error(
        "data.dat",
        SMS_LIKE.as_bytes(),
        &ReadOptions::default(),
        &["`dat`", "set the format"],
    );
    let options = ReadOptions {
        format: Some(DataFormat::Tsv),
        ..ReadOptions::default()
    };
    assert_eq!(read_labelled(&path, &options).unwrap().rows_read, 3);

    assert_eq!(
        DataFormat::from_path(Path::new("a.TSV")),
        Ok(DataFormat::Tsv)
    );
    assert_eq!(
        DataFormat::from_path(Path::new("a.txt")),
        Ok(DataFormat::Tsv)
    );
    assert_eq!(
        DataFormat::from_path(Path::new("SMSSpamCollection")),
        Ok(DataFormat::Tsv)
    );
    assert_eq!(
        DataFormat::from_path(Path::new("a.csv")),
        Ok(DataFormat::Csv)
    );
    assert_eq!(
        DataFormat::from_path(Path::new("a.json")),
        Ok(DataFormat::Jsonl)
    );
    assert_eq!(
        DataFormat::from_path(Path::new("a.jsonl")),
        Ok(DataFormat::Jsonl)
    );
    assert_eq!("CSV".parse::<DataFormat>(), Ok(DataFormat::Csv));
    assert!("xml".parse::<DataFormat>().is_err());
    assert_eq!("3".parse::<ColumnSpec>(), Ok(ColumnSpec::Index(3)));
    assert_eq!(
        "text".parse::<ColumnSpec>(),
        Ok(ColumnSpec::Name("text".into()))
    );
}

#[test]
fn directory_concatenates_sorted_data_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.txt"),
        "second file text\t1\nmore second text\t0\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("a.txt"), "first file text\t0\n").unwrap();
    std::fs::write(dir.path().join("c.csv"), "text,label\nthird file text,1\n").unwrap();
    std::fs::write(dir.path().join("readme.txt"), "This is documentation.\n").unwrap();
    std::fs::write(dir.path().join("LICENSE"), "Some licence.\n").unwrap();
    std::fs::write(dir.path().join(".hidden.tsv"), "no\n").unwrap();
    std::fs::write(dir.path().join("notes.md"), "# notes\n").unwrap();
    std::fs::create_dir(dir.path().join("sub.tsv")).unwrap();

    let dataset = read_labelled(dir.path(), &ReadOptions::default()).unwrap();
    assert_eq!(
        texts(&dataset),
        [
            "first file text",
            "second file text",
            "more second text",
            "third file text"
        ]
    );
    let names: Vec<String> = dataset
        .files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.txt", "b.txt", "c.csv"]);
    assert_eq!(dataset.examples[3].file.file_name().unwrap(), "c.csv");
    assert_eq!(dataset.rows_per_label["0"], 2);
    assert_eq!(dataset.rows_per_label["1"], 2);
}

#[test]
fn directory_without_data_files_fails() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("README"), "docs\n").unwrap();
    let message = read_labelled(dir.path(), &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains(&dir.path().display().to_string()),
        "message: {message}"
    );
    assert!(message.contains("no data files"), "message: {message}");
}

// Error cases: each message names the file and, where one applies, the line.

#[test]
fn empty_file_fails() {
    read_error("empty.tsv", b"", &ReadOptions::default(), &["is empty"]);
    read_error(
        "blank.tsv",
        b"\xEF\xBB\xBF\n\r\n",
        &ReadOptions::default(),
        &["is empty"],
    );
    read_error("empty.csv", b"", &ReadOptions::default(), &["is empty"]);
    read_error("empty.jsonl", b"\n", &ReadOptions::default(), &["is empty"]);
}

#[test]
fn header_only_fails() {
    read_error(
        "header.csv",
        b"text,label\n",
        &ReadOptions::default(),
        &["line 1", "only the header row"],
    );
    let options = ReadOptions {
        tsv_header: Some(true),
        ..ReadOptions::default()
    };
    read_error(
        "header.tsv",
        b"\nsms\tlabel\n",
        &options,
        &["line 2", "only the header row"],
    );
}

#[test]
fn line_without_separator_fails() {
    let contents = b"ham\tfine message\nspam message without a tab\nham\tok\n";
    read_error(
        "sep.tsv",
        contents,
        &ReadOptions::default(),
        &["line 2", "no tab separator", "expected 2"],
    );
}

#[test]
fn wrong_field_count_fails() {
    let contents = b"ham\tfine message\nspam\ttext\twith a tab\n";
    read_error(
        "fields.tsv",
        contents,
        &ReadOptions::default(),
        &["line 2", "found 3 fields", "expected 2"],
    );

    let options = ReadOptions {
        text_column: Some(ColumnSpec::Index(2)),
        label_column: Some(ColumnSpec::Index(0)),
        ..ReadOptions::default()
    };
    let contents = b"spam\t1\tWin now\nham\t2\n";
    read_error(
        "short.tsv",
        contents,
        &options,
        &["line 2", "found 2 fields", "at least 3"],
    );

    let contents = b"text,label\nfine,a\nonly one field\n";
    read_error(
        "short.csv",
        contents,
        &ReadOptions::default(),
        &["line 3", "found 1 fields", "at least 2"],
    );
}

#[test]
fn empty_label_fails() {
    let contents = b"fine message here\t1\nanother message here\t \n";
    read_error(
        "label.tsv",
        contents,
        &ReadOptions::default(),
        &["line 2", "label is empty"],
    );
    read_error(
        "label.csv",
        b"text,label\nhello,a\nbye,\n",
        &ReadOptions::default(),
        &["line 3", "label is empty"],
    );
    let jsonl = b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": null}\n";
    read_error(
        "label.jsonl",
        jsonl,
        &ReadOptions::default(),
        &["line 2", "label is empty"],
    );
}

#[test]
fn invalid_utf8_names_line() {
    let contents = b"ham\tfine\nspam\tbad \xFF byte\n";
    read_error(
        "bytes.tsv",
        contents,
        &ReadOptions::default(),
        &["line 2", "invalid UTF-8", "byte 9"],
    );
    let csv = b"text,label\nfine,a\n\"bad \xC3\",b\n";
    read_error(
        "bytes.csv",
        csv,
        &ReadOptions::default(),
        &["line 3", "invalid UTF-8"],
    );
    let jsonl =
        b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"\xE2\x82\", \"label\": \"y\"}\n";
    read_error(
        "bytes.jsonl",
        jsonl,
        &ReadOptions::default(),
        &["line 2", "invalid UTF-8"],
    );
}

#[test]
fn unknown_column_lists_columns() {
    let csv = b"message,category\nhello,a\nbye,b\n";
    read_error(
        "cols.csv",
        csv,
        &ReadOptions::default(),
        &[
            "line 1",
            "text column `text` not found",
            "`message`, `category`",
        ],
    );

    let options = ReadOptions {
        label_column: Some(ColumnSpec::Index(5)),
        text_column: Some(ColumnSpec::Index(0)),
        ..ReadOptions::default()
    };
    read_error(
        "cols2.csv",
        b"text,label\nhi,a\n",
        &options,
        &["line 1", "label column index 5", "`text`, `label`"],
    );

    let jsonl = b"{\"text\": \"a\", \"label\": \"x\"}\n{\"body\": \"b\", \"label\": \"y\"}\n";
    read_error(
        "cols.jsonl",
        jsonl,
        &ReadOptions::default(),
        &["line 2", "text column `text` not found", "`body`, `label`"],
    );

    let options = ReadOptions {
        text_column: Some(ColumnSpec::Name("message".into())),
        ..ReadOptions::default()
    };
    read_error(
        "cols.tsv",
        b"sms\tlabel\nhi\ta\n",
        &options,
        &["line 1", "`message` not found", "`sms`, `label`"],
    );
}

#[test]
fn tsv_maximum_index_is_unknown_column() {
    // The field count needed for index usize::MAX overflows, so the reader must reject the
    // index before computing it.
    let options = ReadOptions {
        text_column: Some(ColumnSpec::Index(usize::MAX)),
        label_column: Some(ColumnSpec::Index(0)),
        ..ReadOptions::default()
    };
    read_error(
        "huge.tsv",
        b"ham\thello\nspam\twin\n",
        &options,
        &["line 1", &format!("text column index {}", usize::MAX), "indices 0 to 1"],
    );
}

#[test]
fn fewer_than_two_labels_fails() {
    let contents = b"ham\tfirst message text\nham\tsecond message text\n";
    read_error(
        "one.tsv",
        contents,
        &ReadOptions::default(),
        &["label `ham`", "all 2 rows", "line 1"],
    );
}

#[test]
fn json_errors_name_line() {
    let bad = b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \n";
    read_error(
        "bad.jsonl",
        bad,
        &ReadOptions::default(),
        &["line 2", "invalid JSON"],
    );
    let array = b"[{\"text\": \"a\", \"label\": \"x\"}]\n";
    read_error(
        "array.json",
        array,
        &ReadOptions::default(),
        &["line 1", "found an array", "one object per line"],
    );
    let number = b"{\"text\": 5, \"label\": \"x\"}\n";
    read_error(
        "number.jsonl",
        number,
        &ReadOptions::default(),
        &["line 1", "field `text` is a number"],
    );
    let options = ReadOptions {
        text_column: Some(ColumnSpec::Index(0)),
        ..ReadOptions::default()
    };
    read_error(
        "index.jsonl",
        number,
        &options,
        &["text column index 0", "select the field by name"],
    );
}

#[test]
fn same_and_ambiguous_columns_fail() {
    let options = ReadOptions {
        text_column: Some(ColumnSpec::Index(1)),
        label_column: Some(ColumnSpec::Index(1)),
        ..ReadOptions::default()
    };
    read_error("same.tsv", b"a\tb\nc\td\n", &options, &["both index 1"]);
    read_error(
        "tie.tsv",
        b"ab\tcd\nef\tgh\n",
        &ReadOptions::default(),
        &["cannot tell which column holds the labels"],
    );
}

#[test]
fn name_without_header_fails() {
    let options = ReadOptions {
        text_column: Some(ColumnSpec::Name("text".into())),
        tsv_header: Some(false),
        ..ReadOptions::default()
    };
    read_error(
        "noheader.tsv",
        b"hi there\ta\nbye now\tb\n",
        &options,
        &["line 1", "without a header row"],
    );
}
