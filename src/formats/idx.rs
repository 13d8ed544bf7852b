//! IDX files (LeCun's format, Lush's `idx-io`, torchvision's
//! `read_sn3_pascalvincent_tensor`): a magic of two zero bytes, the
//! element type and the rank, then each dimension as a big-endian u32, then
//! the elements. MNIST's family keeps its images and labels so, unsigned
//! bytes; QMNIST its labels as big-endian int32 rows. A file may lie
//! beside its `.gz` or only as that.

use std::path::Path;

use anyhow::{Result, bail};
use flate2::read::GzDecoder;

use crate::fsutil::{read_regular, unpack_capped};

/// How large a file may be: the most entries (its first dimension) and
/// the most bytes, packed or not.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub images: usize,
    pub bytes: u64,
}

/// The files read: images (u8, rank 3), labels (u8, rank 1), or QMNIST's
/// labels (int32 rows, rank 2).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Images,
    Labels,
    IntLabels,
}

impl Kind {
    /// The element type's code, its size and the rank.
    fn layout(self) -> (u8, usize, usize) {
        match self {
            Kind::Images => (0x08, 1, 3),
            Kind::Labels => (0x08, 1, 1),
            Kind::IntLabels => (0x0c, 4, 2),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Kind::Images => "an IDX file of images (magic 0x00000803)",
            Kind::Labels => "an IDX file of labels (magic 0x00000801)",
            Kind::IntLabels => "an IDX file of int32 labels (magic 0x00000C02)",
        }
    }
}

/// An IDX file's content: its dimensions and its bytes after the header.
pub struct Idx {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses an IDX file of `kind`, whose bytes must be exactly what its
/// header says, of at most `caps.images` entries.
pub fn parse(mut bytes: Vec<u8>, kind: Kind, path: &Path, caps: Caps) -> Result<Idx> {
    let (code, size_of, rank) = kind.layout();
    let header = 4 + 4 * rank;
    match bytes.get(..4) {
        Some(&[0, 0, t, r]) if (t, r as usize) == (code, rank) && bytes.len() >= header => {}
        _ => bail!("{}: not {}", path.display(), kind.describe()),
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes(d.try_into().expect("4 bytes")) as usize)
        .collect();
    let size = (dims.iter()).try_fold(size_of, |n, &d| n.checked_mul(d));
    let data = bytes.len() - header;
    if size != Some(data) {
        bail!(
            "{}: its header says {dims:?} ({} bytes) but {data} bytes follow it (truncated?)",
            path.display(),
            size.map_or("too many".into(), |s| s.to_string()),
        );
    }
    if dims[0] > caps.images {
        bail!(
            "{}: {} entries, more than the {} read from one file",
            path.display(),
            dims[0],
            caps.images
        );
    }
    bytes.drain(..header);
    Ok(Idx { dims, data: bytes })
}

/// A file's bytes: `path` itself, else its `.gz` decompressed.
pub fn read(path: &Path, caps: Caps) -> Result<Vec<u8>> {
    if path.exists() {
        return read_regular(path, "an IDX file", caps.bytes);
    }
    let gz = path.with_file_name(format!(
        "{}.gz",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    if gz.exists() {
        return gunzip(&gz, caps);
    }
    bail!(
        "{}: missing (neither it nor its .gz is there)",
        path.display()
    )
}

/// A `.gz` file decompressed, refused beyond `caps.bytes`.
pub fn gunzip(gz: &Path, caps: Caps) -> Result<Vec<u8>> {
    let max = caps.bytes;
    let packed = read_regular(gz, "a gzip file", max)?;
    let mut bytes = Vec::new();
    let name = gz.display().to_string();
    unpack_capped(
        GzDecoder::new(&packed[..]),
        &mut bytes,
        max,
        (&name, "gzip"),
    )?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPS: Caps = Caps {
        images: 100,
        bytes: 1 << 20,
    };

    fn idx(code: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, code, dims.len() as u8];
        dims.iter().for_each(|d| b.extend(d.to_be_bytes()));
        b.extend_from_slice(data);
        b
    }

    /// The header's dimensions must account for every byte; the magic
    /// must be the asked element type and rank.
    #[test]
    fn idx_files_hold_exactly_what_their_header_says() {
        let p = Path::new("f");
        let ok = parse(idx(8, &[2, 2, 3], &[7; 12]), Kind::Images, p, CAPS).unwrap();
        assert_eq!((ok.dims, ok.data), (vec![2, 2, 3], vec![7; 12]));
        let err = |b: &[u8], kind| parse(b.to_vec(), kind, p, CAPS).err().unwrap().to_string();
        let images = Kind::Images;
        assert!(err(&idx(8, &[2, 2, 3], &[7; 11]), images).contains("11 bytes follow"));
        assert!(err(&idx(8, &[2, 2, 3], &[7; 13]), images).contains("13 bytes follow"));
        assert!(err(&idx(8, &[12], &[7; 12]), images).contains("not an IDX file of images"));
        assert!(err(&idx(8, &[u32::MAX; 3], &[]), images).contains("too many"));
        assert!(err(&idx(0x0c, &[1], &[0; 4]), Kind::Labels).contains("not an IDX file of labels"));
        assert!(err(&[0, 0, 8], Kind::Labels).contains("not an IDX"));
        let many = (CAPS.images + 1) as u32;
        let long = idx(8, &[many], &vec![0; many as usize]);
        assert!(err(&long, Kind::Labels).contains("more than"));
        // int32 rows: four bytes an element.
        let rows = parse(idx(0x0c, &[2, 8], &[1; 64]), Kind::IntLabels, p, CAPS).unwrap();
        assert_eq!((rows.dims, rows.data.len()), (vec![2, 8], 64));
        assert!(err(&idx(0x0c, &[2, 8], &[1; 16]), Kind::IntLabels).contains("16 bytes follow"));
        assert!(err(&idx(8, &[2, 8], &[1; 16]), Kind::IntLabels).contains("int32 labels"));
    }
}
