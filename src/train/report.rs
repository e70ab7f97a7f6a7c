//! The training report: `history.jsonl`, loss, accuracy and confusion-matrix plots, and text
//! tables for the terminal.
//!
//! Plots use DejaVu Sans embedded in the binary, so text is drawn on machines without
//! fontconfig or system fonts.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Deserializer, Serialize};

use super::metrics::SplitMetrics;
use crate::fsutil::write_atomic;

/// DejaVu Sans 2.37 (Bitstream Vera licence with public-domain DejaVu changes), the font of every
/// plot label.
static FONT_TTF: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");

/// Family name under which the embedded font is registered with plotters.
const FONT_FAMILY: &str = "sans-serif";

/// Line plot size in pixels (width, height).
const LINE_PLOT_SIZE: (u32, u32) = (900, 560);

/// Colours of the train and validation series (matplotlib's first two default colours).
const TRAIN_COLOR: RGBColor = RGBColor(31, 119, 180);
const VALIDATION_COLOR: RGBColor = RGBColor(255, 127, 14);

/// Failure while writing or reading report files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A report file could not be written.
    #[error("failed to write {}: {source}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },

    /// A report file could not be read.
    #[error("failed to read {}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },

    /// A `history.jsonl` line is not a valid record.
    #[error("{} line {line}: invalid history record: {message}", .path.display())]
    History {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// The parser's message.
        message: String,
    },

    /// Drawing or encoding a plot failed.
    #[error("failed to draw {}: {message}", .path.display())]
    Plot {
        /// The image being drawn.
        path: PathBuf,
        /// The plotting library's message.
        message: String,
    },

    /// The data has no finite value to plot.
    #[error("nothing to plot in {}: {what}", .path.display())]
    NothingToPlot {
        /// The image that was requested.
        path: PathBuf,
        /// Description of the missing data.
        what: String,
    },
}

/// One line of `history.jsonl`, written at each evaluation during training.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// Optimizer steps completed.
    pub step: u64,
    /// Epoch of the step, counting from 0.
    pub epoch: u64,
    /// Training cross-entropy loss in nats, as the trainer measured it for this record (mean per
    /// example for classification, per token for language modelling). A diverged (NaN) loss is
    /// stored as JSON `null` and read back as NaN.
    #[serde(deserialize_with = "null_as_nan")]
    pub train_loss: f64,
    /// Validation cross-entropy loss in nats, averaged like `train_loss`, if it was evaluated.
    pub validation_loss: Option<f64>,
    /// Training accuracy in [0, 1], if it was evaluated.
    pub train_accuracy: Option<f64>,
    /// Validation accuracy in [0, 1], if it was evaluated.
    pub validation_accuracy: Option<f64>,
    /// Wall-clock seconds since training started.
    pub seconds: f64,
}

/// serde_json writes non-finite floats as `null`; this reads `null` back as NaN.
fn null_as_nan<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// Appends one record as a JSON line to `history.jsonl` at `path`, creating the file if needed.
///
/// The whole file is rewritten through [`write_atomic`], so an interrupted write never leaves a
/// partial line. The cost is one read and one write of the file per record.
pub fn append_history(path: &Path, record: &HistoryRecord) -> Result<(), ReportError> {
    let mut contents = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(ReportError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !contents.is_empty() && !contents.ends_with(b"\n") {
        contents.push(b'\n');
    }
    let line = serde_json::to_string(record).expect("a HistoryRecord always serializes to JSON");
    contents.extend_from_slice(line.as_bytes());
    contents.push(b'\n');
    write_atomic(path, &contents).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every record of a `history.jsonl` file, skipping blank lines.
pub fn read_history(path: &Path) -> Result<Vec<HistoryRecord>, ReportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut records = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line).map_err(|e| ReportError::History {
            path: path.to_path_buf(),
            line: index + 1,
            message: e.to_string(),
        })?;
        records.push(record);
    }
    Ok(records)
}

/// Draws train and validation loss against the step into a PNG (`loss.png`).
///
/// Records without a validation loss and non-finite losses are left out. Fails when no finite
/// loss remains.
pub fn plot_losses(path: &Path, history: &[HistoryRecord]) -> Result<(), ReportError> {
    let train = finite_points(history.iter().map(|r| (r.step, Some(r.train_loss))));
    let validation = finite_points(history.iter().map(|r| (r.step, r.validation_loss)));
    plot_series(
        path,
        "Loss",
        "loss (nats)",
        None,
        &[("train", train), ("validation", validation)],
    )
}

/// Draws train and validation accuracy against the step into a PNG (`accuracy.png`), with the
/// y axis fixed to [0, 1].
///
/// Records without an accuracy are left out. Fails when no record has one.
pub fn plot_accuracy(path: &Path, history: &[HistoryRecord]) -> Result<(), ReportError> {
    let train = finite_points(history.iter().map(|r| (r.step, r.train_accuracy)));
    let validation = finite_points(history.iter().map(|r| (r.step, r.validation_accuracy)));
    plot_series(
        path,
        "Accuracy",
        "accuracy",
        Some((0.0, 1.0)),
        &[("train", train), ("validation", validation)],
    )
}

fn finite_points(values: impl Iterator<Item = (u64, Option<f64>)>) -> Vec<(f64, f64)> {
    values
        .filter_map(|(step, value)| value.filter(|v| v.is_finite()).map(|v| (step as f64, v)))
        .collect()
}

/// Draws up to two labelled (step, value) series as lines with point markers.
fn plot_series(
    path: &Path,
    title: &str,
    y_description: &str,
    fixed_y: Option<(f64, f64)>,
    series: &[(&str, Vec<(f64, f64)>)],
) -> Result<(), ReportError> {
    let points: Vec<(f64, f64)> = series.iter().flat_map(|(_, s)| s.iter().copied()).collect();
    if points.is_empty() {
        return Err(ReportError::NothingToPlot {
            path: path.to_path_buf(),
            what: format!("no record has a finite {}", title.to_lowercase()),
        });
    }
    let x_range = padded_range(points.iter().map(|p| p.0), 0.0);
    let y_range = fixed_y.unwrap_or_else(|| padded_range(points.iter().map(|p| p.1), 0.05));

    render_png(path, LINE_PLOT_SIZE, |root| {
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FONT_FAMILY, 26))
            .margin(16)
            .x_label_area_size(50)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.0..x_range.1, y_range.0..y_range.1)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("step")
            .x_label_formatter(&|step| format!("{step:.0}"))
            .y_desc(y_description)
            .label_style((FONT_FAMILY, 14))
            .axis_desc_style((FONT_FAMILY, 16))
            .draw()
            .map_err(|e| e.to_string())?;

        for ((name, points), color) in series.iter().zip([TRAIN_COLOR, VALIDATION_COLOR]) {
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| e.to_string())?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT_FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// Returns (min, max) of the values widened by `padding` times their span. When all values are
/// equal, it widens by 1, or by 5% of the value when its magnitude exceeds 1, so the chart never
/// gets an empty range.
fn padded_range(values: impl Iterator<Item = f64>, padding: f64) -> (f64, f64) {
    let (min, max) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let span = max - min;
    if span <= 0.0 {
        let half = if min.abs() > 1.0 {
            min.abs() * 0.05
        } else {
            1.0
        };
        return (min - half, max + half);
    }
    (min - span * padding, max + span * padding)
}

/// Draws the confusion matrix as a grid of cells shaded by count, with the count in each cell,
/// true labels down the left ("true") and predicted labels along the bottom ("predicted").
pub fn plot_confusion_matrix(path: &Path, metrics: &SplitMetrics) -> Result<(), ReportError> {
    let classes = metrics.labels.len();
    if classes == 0 {
        return Err(ReportError::NothingToPlot {
            path: path.to_path_buf(),
            what: "the metrics have no labels".into(),
        });
    }
    let longest_label = metrics
        .labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(0);
    let layout = MatrixLayout::new(classes, longest_label);
    let max_count = metrics
        .confusion_matrix
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(0);

    render_png(path, layout.image_size(), |root| {
        let title = format!("Confusion matrix ({} examples)", metrics.examples());
        draw_text(
            &root,
            &title,
            (layout.grid_center_x(), 24),
            22,
            BLACK,
            FontTransform::None,
        )?;

        for (row, counts) in metrics.confusion_matrix.iter().enumerate() {
            for (column, &count) in counts.iter().enumerate() {
                let (x0, y0) = layout.cell_origin(row, column);
                let shade = if max_count == 0 {
                    0.0
                } else {
                    count as f64 / max_count as f64
                };
                let fill = blend(WHITE, TRAIN_COLOR, shade);
                root.draw(&Rectangle::new(
                    [(x0, y0), (x0 + layout.cell, y0 + layout.cell)],
                    fill.filled(),
                ))
                .map_err(|e| e.to_string())?;
                root.draw(&Rectangle::new(
                    [(x0, y0), (x0 + layout.cell, y0 + layout.cell)],
                    BLACK.mix(0.3),
                ))
                .map_err(|e| e.to_string())?;
                let text_color = if shade > 0.5 { WHITE } else { BLACK };
                let center = (x0 + layout.cell / 2, y0 + layout.cell / 2);
                draw_text(
                    &root,
                    &count.to_string(),
                    center,
                    layout.count_font(),
                    text_color,
                    FontTransform::None,
                )?;
            }
        }

        for (index, name) in metrics.labels.iter().enumerate() {
            let (x0, y0) = layout.cell_origin(index, index);
            let short_name = shorten(name, MatrixLayout::NAME_CHARS);
            let row_pos = (layout.grid_left() - 8, y0 + layout.cell / 2);
            draw_text_anchored(
                &root,
                &short_name,
                row_pos,
                15,
                HPos::Right,
                FontTransform::None,
            )?;
            let column_x = x0 + layout.cell / 2;
            if layout.rotate_columns {
                // Rotated by 270 degrees, the text reads upwards and ends at the anchor, just
                // below the grid.
                let column_pos = (column_x, layout.grid_bottom() + 8);
                draw_text_anchored(
                    &root,
                    &short_name,
                    column_pos,
                    15,
                    HPos::Right,
                    FontTransform::Rotate270,
                )?;
            } else {
                let column_pos = (column_x, layout.grid_bottom() + 16);
                draw_text(
                    &root,
                    &short_name,
                    column_pos,
                    15,
                    BLACK,
                    FontTransform::None,
                )?;
            }
        }

        let predicted_pos = (layout.grid_center_x(), layout.image_size().1 as i32 - 24);
        draw_text(
            &root,
            "predicted",
            predicted_pos,
            18,
            BLACK,
            FontTransform::None,
        )?;
        let true_pos = (22, layout.grid_top() + layout.grid_size() / 2);
        draw_text(&root, "true", true_pos, 18, BLACK, FontTransform::Rotate270)?;
        Ok(())
    })
}

/// Pixel geometry of the confusion-matrix image.
struct MatrixLayout {
    classes: i32,
    /// Side of one cell in pixels.
    cell: i32,
    /// Whether column labels are drawn vertically because a label is wider than a cell.
    rotate_columns: bool,
    /// Space below the grid for column labels and the "predicted" title, in pixels.
    bottom: i32,
}

impl MatrixLayout {
    /// Maximum label length in characters. Longer labels are shortened with an ellipsis.
    const NAME_CHARS: usize = 16;
    /// Approximate width of one label character at the 15-pixel label size, in pixels.
    const CHAR_PIXELS: i32 = 8;
    /// Space left of the grid for the "true" title and the row labels, in pixels.
    const LEFT: i32 = 190;
    const TOP: i32 = 56;
    const RIGHT: i32 = 30;

    fn new(classes: usize, longest_label_chars: usize) -> Self {
        let classes = i32::try_from(classes).unwrap_or(i32::MAX).max(1);
        // The grid aims at about 480 pixels, with cells between 28 and 140 pixels.
        let cell = (480 / classes).clamp(28, 140);
        let label_chars = longest_label_chars.min(Self::NAME_CHARS) as i32;
        let rotate_columns = label_chars * Self::CHAR_PIXELS > cell;
        let bottom = if rotate_columns {
            label_chars * Self::CHAR_PIXELS + 56
        } else {
            70
        };
        Self {
            classes,
            cell,
            rotate_columns,
            bottom,
        }
    }

    fn grid_size(&self) -> i32 {
        self.classes * self.cell
    }
    fn grid_left(&self) -> i32 {
        Self::LEFT
    }
    fn grid_top(&self) -> i32 {
        Self::TOP
    }
    fn grid_bottom(&self) -> i32 {
        Self::TOP + self.grid_size()
    }
    fn grid_center_x(&self) -> i32 {
        Self::LEFT + self.grid_size() / 2
    }
    fn cell_origin(&self, row: usize, column: usize) -> (i32, i32) {
        (
            Self::LEFT + column as i32 * self.cell,
            Self::TOP + row as i32 * self.cell,
        )
    }
    fn image_size(&self) -> (u32, u32) {
        let width = Self::LEFT + self.grid_size() + Self::RIGHT;
        let height = Self::TOP + self.grid_size() + self.bottom;
        (width.max(420) as u32, height as u32)
    }
    /// Font size of the counts, in pixels, scaled to the cell.
    fn count_font(&self) -> i32 {
        (self.cell / 4).clamp(10, 26)
    }
}

/// Linear blend from `from` (t = 0) to `to` (t = 1).
fn blend(from: RGBColor, to: RGBColor, t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let mix = |a: u8, b: u8| (a as f64 + (b as f64 - a as f64) * t).round() as u8;
    RGBColor(mix(from.0, to.0), mix(from.1, to.1), mix(from.2, to.2))
}

/// Cuts `text` to `max_chars` characters, ending with an ellipsis when cut.
fn shorten(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        return text.to_string();
    }
    let kept: String = text.chars().take(max_chars.saturating_sub(1)).collect();
    format!("{kept}…")
}

fn draw_text(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    text: &str,
    center: (i32, i32),
    size: i32,
    color: RGBColor,
    transform: FontTransform,
) -> Result<(), String> {
    let style = TextStyle::from((FONT_FAMILY, size).into_font().transform(transform))
        .color(&color)
        .pos(Pos::new(HPos::Center, VPos::Center));
    root.draw(&Text::new(text.to_string(), center, style))
        .map_err(|e| e.to_string())
}

fn draw_text_anchored(
    root: &DrawingArea<BitMapBackend<'_>, Shift>,
    text: &str,
    position: (i32, i32),
    size: i32,
    horizontal: HPos,
    transform: FontTransform,
) -> Result<(), String> {
    let style = TextStyle::from((FONT_FAMILY, size).into_font().transform(transform))
        .color(&BLACK)
        .pos(Pos::new(horizontal, VPos::Center));
    root.draw(&Text::new(text.to_string(), position, style))
        .map_err(|e| e.to_string())
}

/// Registers the embedded font with plotters once per process.
fn register_embedded_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT_TTF)
                .map_err(|_| "the embedded DejaVu Sans font could not be parsed".to_string())
        })
        .clone()
}

/// Draws an image with `draw` and writes it as a PNG to `path` through [`write_atomic`].
///
/// plotters-bitmap 0.3.7 encodes PNG only into a file, so the image is first saved in a scratch directory
/// and its bytes are then written to `path` atomically.
fn render_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(DrawingArea<BitMapBackend<'_>, Shift>) -> Result<(), String>,
) -> Result<(), ReportError> {
    let plot_error = |message: String| ReportError::Plot {
        path: path.to_path_buf(),
        message,
    };
    register_embedded_font().map_err(plot_error)?;
    let scratch = tempfile::tempdir().map_err(|source| ReportError::Write {
        path: std::env::temp_dir(),
        source,
    })?;
    let scratch_png = scratch.path().join("plot.png");
    {
        let root = BitMapBackend::new(&scratch_png, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(e.to_string()))?;
        draw(root.clone()).map_err(plot_error)?;
        root.present().map_err(|e| plot_error(e.to_string()))?;
    }
    let bytes = std::fs::read(&scratch_png).map_err(|source| ReportError::Read {
        path: scratch_png.clone(),
        source,
    })?;
    write_atomic(path, &bytes).map_err(|source| ReportError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Formats the confusion matrix as an aligned text table, rows = true label and columns =
/// predicted label.
pub fn format_confusion_table(metrics: &SplitMetrics) -> String {
    let corner = "true \\ predicted";
    let first_width = metrics
        .labels
        .iter()
        .map(|l| l.chars().count())
        .chain([corner.chars().count()])
        .max()
        .unwrap_or(0);
    let widths: Vec<usize> = (0..metrics.labels.len())
        .map(|column| {
            let count_width = metrics
                .confusion_matrix
                .iter()
                .map(|row| row[column].to_string().len())
                .max()
                .unwrap_or(1);
            metrics.labels[column].chars().count().max(count_width)
        })
        .collect();

    let mut table = format!("{corner:<first_width$}");
    for (label, width) in metrics.labels.iter().zip(&widths) {
        write!(table, "  {label:>width$}").expect("writing to a String cannot fail");
    }
    table.push('\n');
    for (label, row) in metrics.labels.iter().zip(&metrics.confusion_matrix) {
        write!(table, "{label:<first_width$}").expect("writing to a String cannot fail");
        for (count, width) in row.iter().zip(&widths) {
            write!(table, "  {count:>width$}").expect("writing to a String cannot fail");
        }
        table.push('\n');
    }
    table
}

/// Formats precision, recall, F1 and support of each label as an aligned text table.
pub fn format_per_label(metrics: &SplitMetrics) -> String {
    let headers = ["precision", "recall", "f1", "support"];
    let label_width = metrics
        .labels
        .iter()
        .map(|l| l.chars().count())
        .chain(["label".len()])
        .max()
        .unwrap_or(0);
    let mut table = format!("{:<label_width$}", "label");
    for header in headers {
        write!(table, "  {header:>9}").expect("writing to a String cannot fail");
    }
    table.push('\n');
    for (label, scores) in metrics.labels.iter().zip(&metrics.per_label) {
        writeln!(
            table,
            "{label:<label_width$}  {:>9.4}  {:>9.4}  {:>9.4}  {:>9}",
            scores.precision, scores.recall, scores.f1, scores.support
        )
        .expect("writing to a String cannot fail");
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(
        step: u64,
        train_loss: f64,
        validation_loss: Option<f64>,
        accuracy: Option<f64>,
    ) -> HistoryRecord {
        HistoryRecord {
            step,
            epoch: step / 10,
            train_loss,
            validation_loss,
            train_accuracy: accuracy,
            validation_accuracy: accuracy.map(|a| a * 0.9),
            seconds: step as f64 * 0.5,
        }
    }

    fn history() -> Vec<HistoryRecord> {
        (0..12)
            .map(|i| {
                let step = i * 5;
                let loss = 2.0 / (1.0 + i as f64);
                let accuracy = (i % 3 == 0).then_some(0.5 + 0.04 * i as f64);
                record(step, loss, Some(loss * 1.1 + 0.05), accuracy)
            })
            .collect()
    }

    fn metrics() -> SplitMetrics {
        let names = vec!["ham".to_string(), "spam".to_string()];
        SplitMetrics::from_predictions(&names, &[0, 0, 0, 0, 1, 1], &[0, 0, 0, 1, 1, 1], 0.5)
    }

    /// Width and height from a PNG's IHDR chunk, after checking the signature.
    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert!(
            bytes.len() > 24,
            "PNG of {} bytes is too short",
            bytes.len()
        );
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk");
        let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        (width, height)
    }

    #[test]
    fn history_appends_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run").join("history.jsonl");
        let first = record(10, 0.75, Some(0.8), Some(0.6));
        let second = record(20, f64::NAN, None, None);
        append_history(&path, &first).unwrap();
        append_history(&path, &second).unwrap();

        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 2, "file:\n{text}");
        assert!(
            text.lines()
                .next()
                .unwrap()
                .contains("\"validation_accuracy\""),
            "file:\n{text}"
        );

        let records = read_history(&path).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0], first);
        assert!(
            records[1].train_loss.is_nan(),
            "NaN loss must read back as NaN"
        );
        assert_eq!(records[1].validation_loss, None);
    }

    #[test]
    fn history_error_names_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history.jsonl");
        append_history(&path, &record(1, 0.5, None, None)).unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"step\": 2}\n");
        std::fs::write(&path, text).unwrap();
        let message = read_history(&path).unwrap_err().to_string();
        assert!(
            message.contains("history.jsonl line 2"),
            "message: {message}"
        );
    }

    #[test]
    fn confusion_table_is_aligned() {
        let table = format_confusion_table(&metrics());
        let expected = "true \\ predicted  ham  spam\n\
                        ham                 3     1\n\
                        spam                0     2\n";
        assert_eq!(table, expected);
    }

    #[test]
    fn per_label_table_is_aligned() {
        let table = format_per_label(&metrics());
        let expected = "label  precision     recall         f1    support\n\
                        ham       1.0000     0.7500     0.8571          4\n\
                        spam      0.6667     1.0000     0.8000          2\n";
        assert_eq!(table, expected);
    }

    #[test]
    fn embedded_font_draws_text() {
        register_embedded_font().unwrap();
        let (width, height) = (200u32, 60u32);
        let mut pixels = vec![255u8; (width * height * 3) as usize];
        {
            let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
            draw_text(
                &root,
                "predicted",
                (100, 30),
                20,
                BLACK,
                FontTransform::None,
            )
            .unwrap();
            root.present().unwrap();
        }
        let dark = pixels
            .chunks(3)
            .filter(|p| p.iter().all(|&c| c < 128))
            .count();
        assert!(
            dark > 50,
            "only {dark} dark pixels: the embedded font drew no text"
        );
    }

    #[test]
    fn plots_write_png_files() {
        let dir = tempfile::tempdir().unwrap();
        let loss = dir.path().join("loss.png");
        let accuracy = dir.path().join("accuracy.png");
        let confusion = dir.path().join("confusion_matrix.png");
        plot_losses(&loss, &history()).unwrap();
        plot_accuracy(&accuracy, &history()).unwrap();
        plot_confusion_matrix(&confusion, &metrics()).unwrap();

        assert_eq!(
            png_size(&std::fs::read(&loss).unwrap()),
            LINE_PLOT_SIZE,
            "loss.png"
        );
        assert_eq!(
            png_size(&std::fs::read(&accuracy).unwrap()),
            LINE_PLOT_SIZE,
            "accuracy.png"
        );
        let expected = MatrixLayout::new(2, 4).image_size();
        assert_eq!(
            png_size(&std::fs::read(&confusion).unwrap()),
            expected,
            "confusion_matrix.png"
        );
        let leftovers = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(leftovers, 3, "temporary files were left beside the plots");
    }

    #[test]
    fn plots_without_data_fail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("accuracy.png");
        let no_accuracy = vec![record(1, 0.5, Some(0.6), None)];
        let message = plot_accuracy(&path, &no_accuracy).unwrap_err().to_string();
        assert!(message.contains("accuracy.png"), "message: {message}");
        assert!(
            message.contains("no record has a finite accuracy"),
            "message: {message}"
        );
        assert!(!path.exists(), "no file may be written when plotting fails");

        let single = vec![record(3, 0.5, None, None)];
        plot_losses(&dir.path().join("loss.png"), &single).unwrap();
    }

    #[test]
    fn padded_range_never_empty() {
        assert_eq!(padded_range([0.5, 0.5].into_iter(), 0.05), (-0.5, 1.5));
        let (low, high) = padded_range([40.0, 40.0].into_iter(), 0.05);
        assert!((low - 38.0).abs() < 1e-12, "lower bound {low}, expected 38");
        assert!(
            (high - 42.0).abs() < 1e-12,
            "upper bound {high}, expected 42"
        );
        assert_eq!(padded_range([0.0, 10.0].into_iter(), 0.1), (-1.0, 11.0));
    }

    #[test]
    fn shorten_adds_ellipsis() {
        assert_eq!(shorten("positive", 16), "positive");
        assert_eq!(shorten("very long label name here", 6), "very …");
    }
}
