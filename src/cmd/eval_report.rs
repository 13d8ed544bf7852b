//! What `vggctl eval` shows: the report (a table of the classes and the
//! confusion matrix on stdout, or `--json`), and each image's prediction
//! in a CSV file (`--predictions`).

use std::path::PathBuf;

use serde::Serialize;
use vggctl::data::Dataset;
use vggctl::eval::{EvalResult, ImagePrediction};

#[derive(Serialize, Clone)]
pub(super) struct Report {
    pub(super) checkpoint: PathBuf,
    pub(super) model: String,
    pub(super) dataset: String,
    /// The split evaluated: "test", or "val" (`--val-on val`).
    pub(super) split: &'static str,
    pub(super) classes: Vec<String>,
    /// Data with some of the model's classes: which, and how scored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) subset_of_model: Option<SubsetOf>,
    #[serde(flatten)]
    pub(super) result: EvalResult,
    /// The top-1 accuracy's 95 % Wilson interval, in percent.
    pub(super) top1_ci95: [f64; 2],
    /// What ran: precision, layout, the model's form, CUDA graph.
    pub(super) ran_as: String,
    /// CUDA: the most memory tensors held during the evaluation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) peak_gpu_bytes: Option<i64>,
}

/// The data's classes as some of the model's.
#[derive(Serialize, Clone)]
pub(super) struct SubsetOf {
    pub(super) model_classes: i64,
    /// The model's index of each of the data's classes.
    pub(super) indices: Vec<i64>,
    /// "model": among all the model's classes (the confusion matrix's last
    /// column: predicted as a class the data lacks); "data": among the
    /// data's classes only (--only-data-classes).
    pub(super) predicted_among: &'static str,
}

/// More classes than this get no text matrix (it would be wider than any
/// terminal); more label characters than this, rows labelled by index.
const MATRIX_CLASSES: usize = 40;
const MATRIX_LABEL: usize = 24;
/// The confusion matrix's column of the model's classes the data lacks.
const OTHER: &str = "other";

pub(super) fn render(r: &Report) -> String {
    let e = &r.result;
    // The classes predicted among: the data's, or all the model's.
    let among = match &r.subset_of_model {
        Some(s) if s.predicted_among == "model" => s.model_classes as usize,
        _ => r.classes.len(),
    };
    let top5 = if among > 5 {
        format!("top-5 {:.2}%", e.top5)
    } else {
        // With five classes or fewer, top-5 says nothing.
        format!("top-{among} —")
    };
    // Throughput is measured after the first batch: one batch has none.
    let speed = match e.images_per_s > 0.0 {
        true => format!("{:.0} img/s; ", e.images_per_s),
        false => String::new(),
    };
    let [lo, hi] = r.top1_ci95;
    let mut s = format!(
        "{} on {} {} ({} images): top-1 {:.2}% (95% CI {lo:.2}-{hi:.2})  {top5}  loss {:.4}  ({speed}{})\n\n",
        r.model, r.dataset, r.split, e.images, e.top1, e.loss, r.ran_as
    );
    if let Some(sub) = &r.subset_of_model {
        s += &match sub.predicted_among {
            "model" => format!(
                "The data has {} of the model's {} classes; predicted among all {} (column `other`: predicted as a class the data lacks).\n\n",
                r.classes.len(),
                sub.model_classes,
                sub.model_classes
            ),
            _ => format!(
                "The data has {} of the model's {} classes; predicted among those {} only (--only-data-classes).\n\n",
                r.classes.len(),
                sub.model_classes,
                r.classes.len()
            ),
        };
    }
    let labels: Vec<String> = r
        .classes
        .iter()
        .enumerate()
        .map(|(i, name)| {
            if *name == i.to_string() {
                name.clone()
            } else {
                format!("{i} {name}")
            }
        })
        .collect();
    let w = labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(5)
        .max(5);
    let pct = |v: Option<f64>| v.map_or("—".to_string(), |v| format!("{v:.2}%"));
    s += &format!(
        "  {:<w$}  {:>7}  {:>9}  {:>9}  {:>9}\n",
        "class", "images", "recall", "precision", "F1"
    );
    for (i, label) in labels.iter().enumerate() {
        s += &format!(
            "  {label:<w$}  {:>7}  {:>9}  {:>9}  {:>9}\n",
            e.support[i],
            pct(e.per_class[i]),
            pct(e.precision[i]),
            pct(e.f1.get(i).copied().flatten())
        );
    }
    s + &matrix(r, labels, w)
}

/// The confusion matrix, rows labelled as the class table's (`labels`,
/// `w` wide) or, for long names, by index; too many classes, a line.
fn matrix(r: &Report, labels: Vec<String>, w: usize) -> String {
    let e = &r.result;
    let mut s = String::new();
    if r.classes.len() > MATRIX_CLASSES {
        s += &format!(
            "\nconfusion matrix: {} classes are too many to print here; --json holds it (`confusion`)\n",
            r.classes.len()
        );
        return s;
    }
    // Long names: the rows go by index too, the table above is the legend.
    let (labels, w) = match w > MATRIX_LABEL {
        true => {
            let ids: Vec<String> = (0..labels.len()).map(|i| i.to_string()).collect();
            let w = ids.last().map_or(1, |l| l.len()).max(5);
            (ids, w)
        }
        false => (labels, w),
    };
    s += "\nconfusion matrix (rows: true class, columns: predicted class index):\n";
    let cw = e
        .confusion
        .iter()
        .flatten()
        .map(|v| v.to_string().len())
        .chain([(r.classes.len().saturating_sub(1)).to_string().len()])
        .max()
        .unwrap_or(1);
    // Over some of the model's classes: a last column, the others.
    let other = e
        .confusion
        .first()
        .is_some_and(|row| row.len() > r.classes.len());
    let cw = cw.max(if other { OTHER.len() } else { 0 });
    s += &format!("  {:<w$}", "");
    for i in 0..r.classes.len() {
        s += &format!(" {i:>cw$}");
    }
    if other {
        s += &format!(" {OTHER:>cw$}");
    }
    s.push('\n');
    for (label, row) in labels.iter().zip(&e.confusion) {
        s += &format!("  {label:<w$}");
        for v in row {
            s += &format!(" {v:>cw$}");
        }
        s.push('\n');
    }
    s
}

/// The `--predictions` file's columns.
const CSV_HEADER: &str =
    "image,label_index,label,predicted_index,predicted,probability,label_probability,correct";

/// Each image's prediction as CSV, in the test split's order: the image
/// (its file, or its index in the split), the label's and the
/// prediction's class index and name, the softmax probabilities of the
/// prediction and of the label, and 1 where they agree. Indices are the
/// data's classes; a prediction of a class the data lacks (over some of
/// the model's classes) has no index and the model's name for it
/// (`model_names`, else `model class N`).
pub(super) fn predictions_csv(
    each: &[ImagePrediction],
    dataset: &Dataset,
    model_names: Option<&[String]>,
) -> String {
    let classes = &dataset.classes;
    let mut text = format!("{CSV_HEADER}\n");
    for p in each {
        let (index, name) = match classes.get(p.predicted as usize) {
            Some(name) => (p.predicted.to_string(), name.clone()),
            None => (String::new(), model_class_name(p.model_class, model_names)),
        };
        let label = classes.get(p.label as usize).cloned().unwrap_or_default();
        text += &format!(
            "{},{},{},{index},{},{:.6},{:.6},{}\n",
            csv_field(&dataset.test_image(p.index)),
            p.label,
            csv_field(&label),
            csv_field(&name),
            p.probability,
            p.label_probability,
            u8::from(p.predicted == p.label)
        );
    }
    text
}

fn model_class_name(class: i64, names: Option<&[String]>) -> String {
    names
        .and_then(|n| n.get(class as usize))
        .cloned()
        .unwrap_or_else(|| format!("model class {class}"))
}

/// A CSV field (RFC 4180): quoted, its quotes doubled, where it holds a
/// comma, a quote, a line break or spaces at its ends.
fn csv_field(s: &str) -> String {
    let special = s.contains([',', '"', '\n', '\r']) || s.trim() != s;
    match special {
        true => format!("\"{}\"", s.replace('"', "\"\"")),
        false => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three classes, one of them without images, one never predicted.
    fn report() -> Report {
        Report {
            checkpoint: PathBuf::from("m.safetensors"),
            model: "vgg11".into(),
            dataset: "folder".into(),
            split: "test",
            classes: vec!["cat".into(), "dog".into(), "a long name".into()],
            subset_of_model: None,
            result: EvalResult {
                images: 4,
                loss: 0.5,
                top1: 50.0,
                top5: 100.0,
                per_class: vec![Some(100.0), Some(0.0), None],
                precision: vec![Some(50.0), None, None],
                f1: vec![Some(200.0 / 3.0), Some(0.0), None],
                support: vec![2, 2, 0],
                confusion: vec![vec![2, 0, 0], vec![2, 0, 0], vec![0, 0, 0]],
                skipped: 0,
                images_per_s: 10.0,
                each: Vec::new(),
            },
            ran_as: "fp32".into(),
            peak_gpu_bytes: None,
            top1_ci95: [15.0, 85.0],
        }
    }

    /// Dashes for undefined figures, not 0.00%; no top-5 with five classes
    /// or fewer; aligned columns.
    #[test]
    fn the_table_shows_dashes_for_undefined_figures() {
        let report = report();
        let text = render(&report);
        assert!(
            text.contains("top-1 50.00% (95% CI 15.00-85.00)  top-3 —  loss"),
            "{text}"
        );
        assert!(text.contains("loss 0.5000  (10 img/s; fp32)"), "{text}");
        // One batch: no throughput measured, none shown (not "0 img/s").
        let mut one_batch = report.clone();
        one_batch.result.images_per_s = 0.0;
        let text1 = render(&one_batch);
        assert!(text1.contains("loss 0.5000  (fp32)"), "{text1}");
        assert!(
            text.contains("  0 cat                2    100.00%     50.00%     66.67%\n"),
            "{text}"
        );
        assert!(
            text.contains("  1 dog                2      0.00%          —      0.00%\n"),
            "{text}"
        );
        assert!(
            text.contains("  2 a long name        0          —          —          —\n"),
            "{text}"
        );
        let matrix: Vec<&str> = text.lines().rev().take(4).collect();
        assert!(matrix.iter().all(|l| l.len() == matrix[0].len()), "{text}");

        // A name longer than the matrix can carry: rows by index, aligned.
        let mut long = report.clone();
        long.classes[2] = "a name far too long to stand before every row".into();
        let text = render(&long);
        let matrix: Vec<&str> = text.lines().rev().take(4).collect();
        assert!(matrix.iter().all(|l| l.len() == matrix[0].len()), "{text}");
        assert_eq!(matrix[0], "  2     0 0 0", "{text}");

        // Too many classes for text: said, and where the numbers are.
        let mut many = report;
        many.classes = (0..41).map(|i| format!("c{i}")).collect();
        let e = &mut many.result;
        (e.per_class, e.precision, e.f1) = (vec![None; 41], vec![None; 41], vec![None; 41]);
        (e.support, e.confusion) = (vec![0; 41], vec![vec![0; 41]; 41]);
        assert!(render(&many).contains("41 classes are too many to print here; --json holds it"));
    }

    /// Three of a model's 1,000 classes: top-5 among the 1,000, said so,
    /// and an aligned `other` column.
    #[test]
    fn a_subset_of_the_models_classes_is_said_and_has_an_other_column() {
        let mut subset = report();
        subset.subset_of_model = Some(SubsetOf {
            model_classes: 1000,
            indices: vec![3, 1, 7],
            predicted_among: "model",
        });
        let e = &mut subset.result;
        e.confusion = vec![vec![1, 0, 0, 1], vec![0, 0, 0, 2], vec![0, 0, 0, 0]];
        let text = render(&subset);
        assert!(
            text.contains("top-1 50.00% (95% CI 15.00-85.00)  top-5 100.00%  loss"),
            "{text}"
        );
        assert!(
            text.contains("The data has 3 of the model's 1000 classes; predicted among all 1000"),
            "{text}"
        );
        let matrix: Vec<&str> = text.lines().rev().take(4).collect();
        assert!(matrix.iter().all(|l| l.len() == matrix[0].len()), "{text}");
        assert!(matrix[3].ends_with("  0     1     2 other"), "{text}");
        assert!(matrix[2].ends_with("  1     0     0     1"), "{text}");
    }

    /// Fields a spreadsheet would split or misread are quoted, quotes
    /// doubled; plain ones are left alone.
    #[test]
    fn csv_fields_are_quoted_where_needed() {
        assert_eq!(csv_field("cat/001.jpg"), "cat/001.jpg");
        assert_eq!(csv_field("a,b.jpg"), "\"a,b.jpg\"");
        assert_eq!(csv_field("say \"hi\".png"), "\"say \"\"hi\"\".png\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field(" padded"), "\" padded\"");
        assert_eq!(model_class_name(2, None), "model class 2");
        let names = ["a".to_string(), "b".to_string()];
        assert_eq!(model_class_name(1, Some(&names)), "b");
    }
}
