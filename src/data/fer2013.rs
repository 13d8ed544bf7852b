//! `--dataset fer2013`: FER2013, the faces of Kaggle's facial expression
//! challenge (Goodfellow et al., 2013), as torchvision's `FER2013` reads
//! it: `DIR/fer2013/` holding `fer2013.csv` (columns `emotion,pixels,Usage`)
//! or else `icml_face_data.csv` (`emotion, Usage, pixels`), the same rows.
//! A row is one 48x48 gray face, its 2,304 bytes row by row in one
//! space-separated field, its emotion 0 to 6 (angry, disgust, fear, happy,
//! sad, surprise, neutral); `Usage` says its split: `Training` (28,709
//! faces) is the training split, `PublicTest` and `PrivateTest` (3,589
//! each) the test split, in the file's order. The faces are read at their
//! 48x48, the gray in the three channels, normalized by the training
//! faces' own mean and deviation (FER2013 has no usual one). Kaggle's
//! `train.csv` and `test.csv` are refused: `test.csv` holds no emotions,
//! so nothing could be validated or evaluated on it (torchvision's labels
//! are None there). Kaggle hands the files out to its users only: they
//! are put in place by hand.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use tch::Tensor;

use super::{Dataset, Images, Split, gray_histograms, mean_std};
use crate::fsutil::open_regular;

/// The dataset's name on the command line and in a run's files.
pub const NAME: &str = "fer2013";
/// The folder under `--data-dir` holding the files (torchvision's).
pub const FOLDER: &str = "fer2013";
/// The faces' side.
pub const SIDE: i64 = 48;
/// The emotions, by label.
pub const CLASSES: [&str; 7] = [
    "angry", "disgust", "fear", "happy", "sad", "surprise", "neutral",
];
/// The files read, in torchvision's order of precedence.
pub const FILES: [&str; 2] = ["fer2013.csv", "icml_face_data.csv"];
/// Where Kaggle hands the files out.
pub const KAGGLE: &str = "https://www.kaggle.com/c/challenges-in-representation-learning-facial-expression-recognition-challenge";
/// The most bytes a file may have (fer2013.csv has 301 MB).
const MAX_FILE: u64 = 1 << 30;
/// Bytes in a face.
const PIXELS: usize = (SIDE * SIDE) as usize;

/// The faces of one split: their bytes (48x48 each, in order) and labels.
#[derive(Default, Debug)]
pub struct Faces {
    pub gray: Vec<u8>,
    pub labels: Vec<i64>,
}

/// Loads the dataset from `dir` (holding `fer2013/`); for evaluation
/// (`test_only`) its test split alone, the training faces read for the
/// normalization only.
pub fn load(dir: &Path, test_only: bool) -> Result<Dataset> {
    let file = find(dir)?;
    let (reader, _) = open_regular(&file, "a CSV file", MAX_FILE)?;
    let mut reader = BufReader::new(reader);
    let (train, test) = parse(&mut reader).with_context(|| format!("{}", file.display()))?;
    if reader.get_ref().limit() == 0 {
        bail!(
            "{}: grew past {MAX_FILE} bytes while being read",
            file.display()
        );
    }
    let (mean, std) =
        mean_std(&gray_histograms(&train.gray)).with_context(|| format!("{}", file.display()))?;
    let train = match test_only {
        true => Split::empty(SIDE),
        false => split(&train),
    };
    Ok(Dataset {
        name: NAME.into(),
        train: Images::Resident(train),
        test: Images::Resident(split(&test)),
        classes: CLASSES.map(String::from).to_vec(),
        mean,
        std,
        source: file.display().to_string(),
        wnids: None,
        test_names: None,
    })
}

/// The file torchvision would read in `dir/fer2013`, or an error saying
/// what is there and what is wanted.
fn find(dir: &Path) -> Result<PathBuf> {
    let folder = dir.join(FOLDER);
    if let Some(file) = FILES.iter().map(|f| folder.join(f)).find(|f| f.exists()) {
        return Ok(file);
    }
    let kaggles = folder.join("train.csv");
    if kaggles.exists() {
        bail!(
            "{}: Kaggle's train.csv and test.csv cannot be read (test.csv has no emotions to validate or evaluate on): put fer2013.csv or icml_face_data.csv, which label every face, in {}",
            kaggles.display(),
            folder.display()
        );
    }
    bail!(
        "{}: no fer2013.csv or icml_face_data.csv (FER2013 is not downloaded by vggctl: Kaggle hands it out to its users at {KAGGLE})",
        folder.display()
    )
}

/// A split's faces as `n x 3 x 48 x 48` uint8, the gray in each channel.
fn split(faces: &Faces) -> Split {
    let n = faces.labels.len() as i64;
    let gray = Tensor::from_slice(&faces.gray).view([n, 1, SIDE, SIDE]);
    Split {
        images: gray.expand([n, 3, SIDE, SIDE], false).contiguous(),
        labels: Tensor::from_slice(&faces.labels),
        layout: None,
    }
}

/// The columns a header names: where `emotion`, `pixels` and `Usage` are
/// (icml_face_data.csv's ` Usage` and ` pixels` too).
fn columns(header: &str) -> Result<[usize; 3]> {
    let names: Vec<&str> = fields(header).iter().map(|f| f.trim()).collect();
    let at = |want: &str| names.iter().position(|n| *n == want);
    match (at("emotion"), at("pixels"), at("Usage")) {
        (Some(e), Some(p), Some(u)) => Ok([e, p, u]),
        _ => bail!(
            "line 1: the header '{header}' does not name the columns emotion, pixels and Usage"
        ),
    }
}

/// A CSV line's fields, each without the quotes around it.
fn fields(line: &str) -> Vec<&str> {
    line.split(',').map(unquote).collect()
}

/// A CSV field without the quotes around it.
fn unquote(field: &str) -> &str {
    (field.strip_prefix('"'))
        .and_then(|f| f.strip_suffix('"'))
        .unwrap_or(field)
}

/// Line `at` of `input` (read into `buf`, which it borrows: no copy), without
/// its line ending; `None` at the end.
fn next_line<'b>(
    input: &mut impl BufRead,
    buf: &'b mut Vec<u8>,
    at: usize,
) -> Result<Option<&'b str>> {
    buf.clear();
    if input.read_until(b'\n', buf)? == 0 {
        return Ok(None);
    }
    let line = std::str::from_utf8(buf).map_err(|_| anyhow!("line {at}: not UTF-8 text"))?;
    let line = line.strip_suffix('\n').unwrap_or(line);
    Ok(Some(line.strip_suffix('\r').unwrap_or(line)))
}

/// A file's text, read line by line (the faces' bytes are kept, not the
/// text), as its training and test faces.
pub fn parse(mut input: impl BufRead) -> Result<(Faces, Faces)> {
    let mut buf = Vec::new();
    let header = next_line(&mut input, &mut buf, 1)?
        .unwrap_or_default()
        .to_string();
    let [emotion, pixels, usage] = columns(&header)?;
    let width = fields(&header).len();
    let (mut train, mut test) = (Faces::default(), Faces::default());
    for at in 2.. {
        let Some(line) = next_line(&mut input, &mut buf, at)? else {
            break;
        };
        if line.is_empty() {
            continue; // as Python's csv reader skips it
        }
        let row = fields(line);
        if row.len() != width {
            bail!(
                "line {at}: {} fields, where the header names {width}",
                row.len()
            );
        }
        let faces = match row[usage].trim() {
            "Training" => &mut train,
            "PublicTest" | "PrivateTest" => &mut test,
            other => bail!("line {at}: Usage '{other}' is not Training, PublicTest or PrivateTest"),
        };
        match row[emotion].trim().parse::<i64>() {
            Ok(label @ 0..=6) => faces.labels.push(label),
            _ => bail!("line {at}: emotion '{}' is not 0 to 6", row[emotion]),
        }
        let before = faces.gray.len();
        for value in row[pixels].split_whitespace() {
            let Ok(v) = value.parse::<u8>() else {
                bail!("line {at}: pixel '{value}' is not 0 to 255");
            };
            faces.gray.push(v);
        }
        let count = faces.gray.len() - before;
        if count != PIXELS {
            bail!("line {at}: {count} pixels, where a face of FER2013 has {PIXELS} (48x48)");
        }
    }
    if train.labels.is_empty() || test.labels.is_empty() {
        bail!(
            "{} training and {} test faces: FER2013's file has both (Usage Training; PublicTest or PrivateTest)",
            train.labels.len(),
            test.labels.len()
        );
    }
    Ok((train, test))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(emotion: &str, pixels: &[u8], usage: &str) -> String {
        let p: Vec<String> = pixels.iter().map(|v| v.to_string()).collect();
        format!("{emotion},\"{}\",{usage}", p.join(" "))
    }

    #[test]
    fn rows_are_split_by_usage_in_file_order() {
        let face = |v: u8| vec![v; PIXELS];
        let text = [
            "emotion,pixels,Usage".to_string(),
            row("3", &face(1), "Training"),
            row("6", &face(2), "PrivateTest"),
            row("0", &face(3), "PublicTest"),
            row("5", &face(4), "Training"),
        ]
        .join("\r\n");
        let (train, test) = parse(text.as_bytes()).unwrap();
        assert_eq!((train.labels, test.labels), (vec![3, 5], vec![6, 0]));
        assert_eq!((train.gray[0], train.gray[PIXELS]), (1, 4));
        assert_eq!((test.gray[0], test.gray[PIXELS]), (2, 3));
        // icml_face_data.csv's order and spaced names.
        let icml = format!(
            "emotion, Usage, pixels\n2,Training,{}\n1,PublicTest,{}",
            vec!["7"; PIXELS].join(" "),
            vec!["8"; PIXELS].join(" ")
        );
        let (train, test) = parse(icml.as_bytes()).unwrap();
        assert_eq!((train.labels, test.labels), (vec![2], vec![1]));
        assert_eq!((train.gray[5], test.gray[5]), (7, 8));
    }

    #[test]
    fn bad_rows_name_their_line() {
        let ok = row("1", &[9; PIXELS], "Training");
        let test = row("1", &[9; PIXELS], "PublicTest");
        let short = row("1", &[9; PIXELS - 1], "Training");
        let cases = [
            (format!("emotion,pixel,Usage\n{ok}"), "line 1: the header"),
            (
                format!("emotion,pixels,Usage\n{ok}\n{short}"),
                "line 3: 2303 pixels, where a face of FER2013 has 2304",
            ),
            (
                format!("emotion,pixels,Usage\n{}", ok.replace("9 9", "9 256")),
                "line 2: pixel '256' is not 0 to 255",
            ),
            (
                format!("emotion,pixels,Usage\n{}", ok.replacen('1', "7", 1)),
                "line 2: emotion '7' is not 0 to 6",
            ),
            (
                format!("emotion,pixels,Usage\n{}", ok.replace("Training", "Val")),
                "line 2: Usage 'Val' is not",
            ),
            (
                format!("emotion,pixels,Usage\n{ok},x"),
                "line 2: 4 fields, where the header names 3",
            ),
            (
                format!("emotion,pixels,Usage\n{ok}\n"),
                "1 training and 0 test faces",
            ),
            (
                format!("emotion,pixels,Usage\n{test}"),
                "0 training and 1 test faces",
            ),
            (String::new(), "line 1: the header '' does not name"),
        ];
        let mut cases: Vec<(Vec<u8>, &str)> = (cases.into_iter())
            .map(|(text, want)| (text.into_bytes(), want))
            .collect();
        let mut latin1 = format!("emotion,pixels,Usage\n{ok}\n").into_bytes();
        latin1.extend(b"1,\"\xe9\",Training\n");
        cases.push((latin1, "line 3: not UTF-8 text"));
        for (text, want) in cases {
            let e = parse(&text[..]).unwrap_err().to_string();
            assert!(e.contains(want), "{e} lacks {want}");
        }
    }
}
