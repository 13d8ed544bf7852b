//! Files of float32 rows (and int64 labels) written a batch at a time, for `vggctl features`:
//! NumPy's `.npy` (one array, `numpy.load`) or safetensors (arrays by
//! name with string metadata, `safetensors.numpy.load_file`). Row i of
//! every array is the i-th item; the file's size is fixed when it is
//! created, so a batch's rows go straight to their place and memory holds
//! one batch, however many rows the file has.

use std::collections::BTreeMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use tch::{Kind, Tensor};

use crate::formats::safetensors::tensor_bytes;
use crate::fsutil::TempFile;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowFormat {
    Npy,
    Safetensors,
}

impl RowFormat {
    /// The format a file name's extension asks for.
    pub fn of(path: &Path) -> Option<RowFormat> {
        match path.extension()?.to_str()?.to_ascii_lowercase().as_str() {
            "npy" => Some(RowFormat::Npy),
            "safetensors" => Some(RowFormat::Safetensors),
            _ => None,
        }
    }
}

/// One array of a rows file: its name, the shape of one row, and whether
/// it holds int64 values (labels) rather than float32 ones.
pub struct RowArray {
    pub name: String,
    pub row_shape: Vec<i64>,
    pub int64: bool,
}

impl RowArray {
    /// A float32 array.
    pub fn float(name: String, row_shape: Vec<i64>) -> RowArray {
        RowArray {
            name,
            row_shape,
            int64: false,
        }
    }

    fn kind(&self) -> Kind {
        match self.int64 {
            true => Kind::Int64,
            false => Kind::Float,
        }
    }

    fn row_bytes(&self) -> u64 {
        self.kind().elt_size_in_bytes() as u64 * self.row_shape.iter().product::<i64>() as u64
    }
}

/// A rows file being written (a [`TempFile`] beside its target until
/// [`RowWriter::commit`]).
pub struct RowWriter {
    file: TempFile,
    /// Each array's first byte in the file, the bytes of one of its rows
    /// and its values' kind.
    arrays: Vec<(u64, u64, Kind)>,
    rows: usize,
}

/// `.npy` format 1.0's header for a little-endian float32 C-order array
/// of `shape`: magic, version, length, then the dict padded with spaces
/// and a newline to a multiple of 64 bytes.
fn npy_header(shape: &[i64]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let tuple = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out
}

/// safetensors' header (length, then JSON padded with spaces to a multiple
/// of 8) for arrays of `rows` rows, stored one after another.
fn safetensors_header(
    arrays: &[RowArray],
    rows: usize,
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut json = serde_json::Map::new();
    if !metadata.is_empty() {
        json.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut at = 0;
    for a in arrays {
        let end = at + rows as u64 * a.row_bytes();
        let mut shape = vec![rows as i64];
        shape.extend(&a.row_shape);
        let dtype = if a.int64 { "I64" } else { "F32" };
        let entry = serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [at, end]});
        json.insert(a.name.clone(), entry);
        at = end;
    }
    let mut text = serde_json::Value::Object(json).to_string();
    text.push_str(&" ".repeat(text.len().next_multiple_of(8) - text.len()));
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

impl RowWriter {
    /// A file for `rows` rows of each of `arrays` (`.npy`: exactly one),
    /// beside `target`; `metadata` goes into a safetensors header.
    pub fn create(
        target: &Path,
        format: RowFormat,
        arrays: &[RowArray],
        rows: usize,
        metadata: &BTreeMap<String, String>,
    ) -> Result<RowWriter> {
        let header = match format {
            RowFormat::Npy => {
                let [one] = arrays else {
                    bail!("{}: a .npy file holds one array", target.display());
                };
                if one.int64 {
                    bail!("{}: rows of int64 go into safetensors", target.display());
                }
                let mut shape = vec![rows as i64];
                shape.extend(&one.row_shape);
                npy_header(&shape)
            }
            RowFormat::Safetensors => safetensors_header(arrays, rows, metadata),
        };
        let mut at = header.len() as u64;
        let mut starts = Vec::new();
        for a in arrays {
            starts.push((at, a.row_bytes(), a.kind()));
            at += rows as u64 * a.row_bytes();
        }
        let mut file = TempFile::beside(target)?;
        let shown = target.display().to_string();
        let f = file.file();
        f.write_all(&header)
            .and_then(|()| f.set_len(at))
            .with_context(|| format!("writing {shown}"))?;
        Ok(RowWriter {
            file,
            arrays: starts,
            rows,
        })
    }

    /// Rows `first..` of the first arrays: `batches[k]` holds array k's
    /// rows (any dtype and device, the row shape the file was made for).
    pub fn write(&mut self, first: usize, batches: &[Tensor], target: &Path) -> Result<()> {
        for (k, t) in batches.iter().enumerate() {
            self.write_array(k, first, t, target)?;
        }
        Ok(())
    }

    /// Rows `first..` of array `k`.
    pub fn write_array(&mut self, k: usize, first: usize, t: &Tensor, target: &Path) -> Result<()> {
        let Some(&(start, row_bytes, kind)) = self.arrays.get(k) else {
            bail!("{}: no array {k} in the file", target.display());
        };
        let n = t.size()[0] as usize;
        let bytes = tensor_bytes(&t.to_kind(kind));
        if first + n > self.rows || bytes.len() as u64 != n as u64 * row_bytes {
            bail!("{}: rows that do not fit the file", target.display());
        }
        let f = self.file.file();
        f.seek(SeekFrom::Start(start + first as u64 * row_bytes))
            .and_then(|_| f.write_all(&bytes))
            .with_context(|| format!("writing {}", target.display()))
    }

    /// The finished file, renamed over `target`.
    pub fn commit(self, target: &Path) -> Result<()> {
        self.file.commit(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Headers as format 1.0 lays them out: magic and version, the
    /// dict's length, the dict (shape tuples as Python writes them, a
    /// trailing comma for one dimension), padded with spaces and a newline
    /// to a multiple of 64 bytes.
    #[test]
    fn npy_headers_follow_format_1_0() {
        let h = npy_header(&[3, 4096]);
        assert_eq!(h.len() % 64, 0);
        assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
        assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize, h.len() - 10);
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4096), }"));
        assert!(text.ends_with(" \n"));
        let h = npy_header(&[7]);
        assert_eq!(h.len() % 64, 0);
        assert!(
            std::str::from_utf8(&h[10..])
                .unwrap()
                .contains("'shape': (7,), }")
        );
    }
}
