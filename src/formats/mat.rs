//! MATLAB's level 5 MAT-files (`save -v6` and the compressed `-v7` that
//! SVHN's `train_32x32.mat` is): the variables a file holds, by name, as
//! `scipy.io.loadmat` reads them: numeric arrays, and the text, cell and
//! struct arrays of Stanford Cars' annotations. Read as a stream, one
//! variable at a time, so a file is never held whole in memory: variables
//! not asked for are skipped, compressed ones without being unpacked.
//! Little-endian files only (what MATLAB on x86 and scipy write); no
//! complex, sparse, logical-of-objects or function arrays.

use std::io::{self, Read};

use anyhow::{Context, Result, bail};
use flate2::read::ZlibDecoder;

/// A data element's type (the tag's first word).
const MI_INT8: u32 = 1;
const MI_UINT8: u32 = 2;
const MI_INT16: u32 = 3;
const MI_UINT16: u32 = 4;
const MI_INT32: u32 = 5;
const MI_UINT32: u32 = 6;
const MI_SINGLE: u32 = 7;
const MI_DOUBLE: u32 = 9;
const MI_INT64: u32 = 12;
const MI_UINT64: u32 = 13;
const MI_MATRIX: u32 = 14;
const MI_COMPRESSED: u32 = 15;
const MI_UTF8: u32 = 16;
const MI_UTF16: u32 = 17;
/// An array's class (its flags' low byte): the numeric ones, `mxDOUBLE`
/// (6) to `mxUINT64` (15).
const MX_NUMERIC: std::ops::RangeInclusive<u8> = 6..=15;
const MX_CELL: u8 = 1;
const MX_STRUCT: u8 = 2;
const MX_CHAR: u8 = 4;
const MX_UINT8: u8 = 9;
const COMPLEX: u32 = 0x800;
/// How deep cells and structs may nest (Stanford Cars' files: one level).
const MAX_DEPTH: usize = 8;

/// One numeric array: its dimensions (MATLAB's order, column-major) and
/// its values, stored bytes kept where the array is uint8 and stored so.
#[derive(Debug, PartialEq)]
pub struct MatArray {
    pub dims: Vec<usize>,
    pub values: Values,
}

#[derive(Debug, PartialEq)]
pub enum Values {
    Bytes(Vec<u8>),
    Numbers(Vec<f64>),
}

/// One variable, or one element of a cell or struct array.
#[derive(Debug, PartialEq)]
pub enum MatValue {
    Numeric(MatArray),
    /// A character array of one row (or none: `''`).
    Text(String),
    /// A cell array: its dimensions and its elements, column-major.
    Cell(Vec<usize>, Vec<MatValue>),
    /// A struct array: its dimensions, its field names, and each element's
    /// fields in that order (the elements column-major).
    Struct(Vec<usize>, Vec<String>, Vec<Vec<MatValue>>),
}

impl MatValue {
    /// The value of the field `name` of element `i` of a struct array.
    pub fn field(&self, i: usize, name: &str) -> Option<&MatValue> {
        match self {
            MatValue::Struct(_, fields, items) => {
                let f = fields.iter().position(|n| n == name)?;
                items.get(i)?.get(f)
            }
            _ => None,
        }
    }

    /// The single number of a 1x1 numeric array.
    pub fn scalar(&self) -> Option<f64> {
        match self {
            MatValue::Numeric(a) if a.len() == 1 => Some(match &a.values {
                Values::Bytes(b) => b[0] as f64,
                Values::Numbers(n) => n[0],
            }),
            _ => None,
        }
    }

    /// What the value is, in a person's words ("a struct array").
    pub fn kind(&self) -> &'static str {
        match self {
            MatValue::Numeric(_) => "a numeric array",
            MatValue::Text(_) => "text",
            MatValue::Cell(..) => "a cell array",
            MatValue::Struct(..) => "a struct array",
        }
    }
}

impl MatArray {
    pub fn len(&self) -> usize {
        match &self.values {
            Values::Bytes(b) => b.len(),
            Values::Numbers(n) => n.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The numeric variables named in `wanted` that `r` holds (see
/// [`read_mat_values`]); a wanted one of another kind is an error.
pub fn read_mat(r: &mut impl Read, wanted: &[&str], max: u64) -> Result<Vec<(String, MatArray)>> {
    let values = read_mat_values(r, wanted, max)?;
    (values.into_iter())
        .map(|(name, value)| match value {
            MatValue::Numeric(a) => Ok((name, a)),
            other => bail!("'{name}' is {}, not a real numeric array", other.kind()),
        })
        .collect()
}

/// The variables named in `wanted` that `r` holds (a MAT-file from its
/// first byte), each at most `max` bytes unpacked; a wanted name that is
/// missing is not an error here (the caller says what it needed).
pub fn read_mat_values(
    r: &mut impl Read,
    wanted: &[&str],
    max: u64,
) -> Result<Vec<(String, MatValue)>> {
    let mut header = [0u8; 128];
    r.read_exact(&mut header)
        .context("not a MAT-file: shorter than its 128-byte header")?;
    match &header[126..128] {
        b"IM" if header[124..126] == [0, 1] => {}
        b"MI" => {
            bail!("a big-endian MAT-file, which is not read (save it on a little-endian machine)")
        }
        _ if header.starts_with(b"MATLAB 7.3") => {
            bail!("a MAT-file of version 7.3 (HDF5), which is not read (save it with -v7)")
        }
        _ => bail!("not a level 5 MAT-file (its header does not end in version 0x0100, 'IM')"),
    }
    let mut found = Vec::new();
    loop {
        let mut tag = [0u8; 8];
        match read_full(r, &mut tag)? {
            0 => return Ok(found),
            8 => {}
            _ => bail!("cut short inside a variable's tag"),
        }
        let (ty, size) = (word(&tag[..4]), word(&tag[4..]) as u64);
        let mut body = r.take(size);
        let var = match ty {
            MI_COMPRESSED => matrix(&mut ZlibDecoder::new(&mut body), wanted, max, true),
            MI_MATRIX => variable(&mut body, size, wanted, max),
            _ => bail!(
                "a top-level element of type {ty}, where a variable (14, or compressed 15) belongs"
            ),
        }?;
        // What a variable left unread (not wanted, or padding) is skipped.
        io::copy(&mut body, &mut io::sink()).context("reading the MAT-file")?;
        if body.limit() > 0 {
            bail!(
                "cut short inside a variable ({} bytes missing)",
                body.limit()
            );
        }
        found.extend(var);
    }
}

/// A compressed variable's stream: its own `miMATRIX` tag, then the matrix.
fn matrix(
    r: &mut impl Read,
    wanted: &[&str],
    max: u64,
    compressed: bool,
) -> Result<Option<(String, MatValue)>> {
    let what = || match compressed {
        true => "a compressed variable (damaged zlib data?)",
        false => "a variable",
    };
    let mut tag = [0u8; 8];
    r.read_exact(&mut tag)
        .with_context(|| format!("reading {}", what()))?;
    let (ty, size) = (word(&tag[..4]), word(&tag[4..]) as u64);
    if ty != MI_MATRIX {
        bail!(
            "{} holds an element of type {ty}, not a matrix (14)",
            what()
        );
    }
    variable(&mut r.take(size), size, wanted, max).with_context(|| format!("reading {}", what()))
}

/// One `miMATRIX` body of `size` bytes: flags, dimensions, name, values.
fn variable(
    r: &mut impl Read,
    size: u64,
    wanted: &[&str],
    max: u64,
) -> Result<Option<(String, MatValue)>> {
    let head = header(r)?;
    if !wanted.contains(&head.name.as_str()) {
        return Ok(None);
    }
    let value = contents(r, size, &head, max, 0)?;
    Ok(Some((head.name, value)))
}

/// A matrix's flags, dimensions and name.
struct Head {
    class: u8,
    complex: bool,
    dims: Vec<usize>,
    name: String,
}

fn header(r: &mut dyn Read) -> Result<Head> {
    let (_, flags) = element(r, 8)?;
    if flags.len() != 8 {
        bail!("a matrix whose flags are not 8 bytes");
    }
    let (class, complex) = (flags[0], word(&flags[..4]) & COMPLEX != 0);
    let (ty, dims) = element(r, 4 * 64)?;
    if ty != MI_INT32 || !dims.len().is_multiple_of(4) || dims.len() < 8 {
        bail!("a matrix whose dimensions are not two or more int32");
    }
    let dims: Vec<usize> = (dims.chunks_exact(4))
        .map(|d| i32::from_le_bytes(d.try_into().expect("4 bytes")).max(0) as usize)
        .collect();
    let (_, name) = element(r, 64)?;
    let name = String::from_utf8_lossy(&name).into_owned();
    Ok(Head {
        class,
        complex,
        dims,
        name,
    })
}

/// What follows a matrix's header, by its class: numbers, text, or the
/// elements of a cell or struct array (`depth` levels down).
fn contents(r: &mut dyn Read, size: u64, head: &Head, max: u64, depth: usize) -> Result<MatValue> {
    let name = &head.name;
    let count = head
        .dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    // Every value takes a byte at least, every element of a cell or struct
    // its tag's 8.
    let count = count.filter(|&n| n <= max && n <= size);
    let Some(count) = count else {
        bail!(
            "'{name}' has dimensions {:?}, more than its {size} bytes or {max} values hold",
            head.dims
        );
    };
    if head.complex {
        bail!("'{name}' is a complex array, which is not read");
    }
    match head.class {
        MX_CHAR => text(r, head, max.min(size)).map(MatValue::Text),
        MX_CELL | MX_STRUCT if depth >= MAX_DEPTH => {
            bail!("'{name}': cells or structs nested more than {MAX_DEPTH} deep")
        }
        MX_CELL => {
            if count * 8 > size {
                bail!("'{name}' has {count} cells, more than its {size} bytes hold");
            }
            let cells = (0..count)
                .map(|i| nested(r, max, depth).with_context(|| format!("'{name}' cell {i}")))
                .collect::<Result<_>>()?;
            Ok(MatValue::Cell(head.dims.clone(), cells))
        }
        MX_STRUCT => structs(r, size, head, (count, max), depth),
        c if MX_NUMERIC.contains(&c) => numeric(r, size, head, (count, max)),
        c => bail!("'{name}' is an array of class {c}, which is not read"),
    }
}

/// A numeric array's values: `count` of them.
fn numeric(r: &mut dyn Read, size: u64, head: &Head, (count, max): (u64, u64)) -> Result<MatValue> {
    let name = &head.name;
    let (ty, data) = element(r, max.min(size).max(8))?;
    let values = match (head.class, ty) {
        (MX_UINT8, MI_UINT8) => Values::Bytes(data),
        _ => Values::Numbers(numbers(ty, &data).with_context(|| format!("'{name}'"))?),
    };
    let array = MatArray {
        dims: head.dims.clone(),
        values,
    };
    if array.len() as u64 != count {
        bail!(
            "'{name}' holds {} values for its dimensions {:?}",
            array.len(),
            array.dims
        );
    }
    Ok(MatValue::Numeric(array))
}

/// A character array of one row (or an empty one): its text, stored as
/// UTF-8, UTF-16 or the 8- or 16-bit code units scipy and MATLAB write.
fn text(r: &mut dyn Read, head: &Head, max: u64) -> Result<String> {
    let name = &head.name;
    if head.dims.len() != 2 || head.dims[0] > 1 && head.dims[1] > 0 {
        bail!(
            "'{name}' is text of dimensions {:?}, not one row",
            head.dims
        );
    }
    let (ty, data) = element(r, max.max(8))?;
    let units = |n: usize| data.len() / n;
    let text = match ty {
        MI_UTF8 | MI_UINT8 | MI_INT8 => String::from_utf8(data.clone()).ok(),
        MI_UTF16 | MI_UINT16 => {
            let units: Vec<u16> = (data.chunks_exact(2))
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            (data.len() % 2 == 0)
                .then(|| String::from_utf16(&units).ok())
                .flatten()
        }
        _ => bail!("'{name}': text stored as type {ty}"),
    };
    let Some(text) = text else {
        bail!("'{name}': text that is not valid UTF-8 or UTF-16");
    };
    // A row's length counts characters (code units, as MATLAB's 16-bit
    // chars), the bytes its type gives them.
    let per = match ty {
        MI_UTF16 | MI_UINT16 => 2,
        _ => 1,
    };
    let want = head.dims.iter().product::<usize>();
    if units(per) != want && !matches!(ty, MI_UTF8) {
        bail!(
            "'{name}' holds {} characters for its dimensions {:?}",
            units(per),
            head.dims
        );
    }
    Ok(text)
}

/// A struct array: its field names, then each element's fields, each a
/// matrix of its own.
fn structs(
    r: &mut dyn Read,
    size: u64,
    head: &Head,
    (count, max): (u64, u64),
    depth: usize,
) -> Result<MatValue> {
    let name = &head.name;
    let (ty, len) = element(r, 8)?;
    let len = match (ty, len.len()) {
        (MI_INT32, 4) => word(&len) as usize,
        _ => bail!("'{name}': a struct without its field names' length"),
    };
    let (_, names) = element(r, max.min(size))?;
    if len == 0 || !names.len().is_multiple_of(len) {
        bail!(
            "'{name}': field names of {} bytes, not a whole number of {len}",
            names.len()
        );
    }
    let fields: Vec<String> = (names.chunks(len))
        .map(|n| {
            let end = n.iter().position(|&b| b == 0).unwrap_or(n.len());
            String::from_utf8_lossy(&n[..end]).into_owned()
        })
        .collect();
    if count * fields.len() as u64 * 8 > size {
        bail!(
            "'{name}' has {count} elements of {} fields, more than its {size} bytes hold",
            fields.len()
        );
    }
    let mut items = Vec::with_capacity(count as usize);
    for i in 0..count {
        let item = (fields.iter())
            .map(|f| {
                nested(r, max, depth).with_context(|| format!("'{name}' element {i} field '{f}'"))
            })
            .collect::<Result<Vec<_>>>()?;
        items.push(item);
    }
    Ok(MatValue::Struct(head.dims.clone(), fields, items))
}

/// An element of a cell or struct array: a matrix with its own tag (of no
/// bytes for an empty one).
fn nested(r: &mut dyn Read, max: u64, depth: usize) -> Result<MatValue> {
    let mut tag = [0u8; 8];
    r.read_exact(&mut tag)
        .context("cut short inside a matrix")?;
    let (ty, size) = (word(&tag[..4]), word(&tag[4..]) as u64);
    if ty != MI_MATRIX {
        bail!("an element of type {ty}, not a matrix (14)");
    }
    if size == 0 {
        let empty = MatArray {
            dims: vec![0, 0],
            values: Values::Numbers(Vec::new()),
        };
        return Ok(MatValue::Numeric(empty));
    }
    let mut body = (&mut *r).take(size);
    let head = header(&mut body)?;
    let value = contents(&mut body, size, &head, max, depth + 1)?;
    io::copy(&mut body, &mut io::sink()).context("reading the MAT-file")?;
    if body.limit() > 0 {
        bail!("cut short inside a matrix ({} bytes missing)", body.limit());
    }
    Ok(value)
}

/// One data element of at most `max` bytes: its type and its bytes, the
/// padding to 8 bytes read past (a small element packs up to 4 bytes
/// into its tag).
fn element(r: &mut dyn Read, max: u64) -> Result<(u32, Vec<u8>)> {
    let mut tag = [0u8; 8];
    r.read_exact(&mut tag)
        .context("cut short inside a matrix")?;
    let first = word(&tag[..4]);
    if first >> 16 != 0 {
        let n = (first >> 16) as usize;
        if n > 4 {
            bail!("a small element of {n} bytes (at most 4 fit)");
        }
        return Ok((first & 0xffff, tag[4..4 + n].to_vec()));
    }
    let size = word(&tag[4..]) as u64;
    if size > max {
        bail!("an element of {size} bytes, more than the {max} it may have");
    }
    let mut data = Vec::new();
    r.take(size).read_to_end(&mut data)?;
    if data.len() as u64 != size {
        bail!("cut short inside an element of {size} bytes");
    }
    let pad = (8 - size % 8) % 8;
    io::copy(&mut r.take(pad), &mut io::sink())?;
    Ok((first, data))
}

/// The values of an element of type `ty`.
fn numbers(ty: u32, b: &[u8]) -> Result<Vec<f64>> {
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> f64) -> Result<Vec<f64>> {
        if !b.len().is_multiple_of(N) {
            bail!("{} bytes is not a whole number of {N}-byte values", b.len());
        }
        Ok(b.chunks_exact(N)
            .map(|c| f(c.try_into().expect("N bytes")))
            .collect())
    }
    match ty {
        MI_INT8 => each(b, |[v]| v as i8 as f64),
        MI_UINT8 => each(b, |[v]| v as f64),
        MI_INT16 => each(b, |v| i16::from_le_bytes(v) as f64),
        MI_UINT16 => each(b, |v| u16::from_le_bytes(v) as f64),
        MI_INT32 => each(b, |v| i32::from_le_bytes(v) as f64),
        MI_UINT32 => each(b, |v| u32::from_le_bytes(v) as f64),
        MI_SINGLE => each(b, |v| f32::from_le_bytes(v) as f64),
        MI_DOUBLE => each(b, f64::from_le_bytes),
        MI_INT64 => each(b, |v| i64::from_le_bytes(v) as f64),
        MI_UINT64 => each(b, |v| u64::from_le_bytes(v) as f64),
        _ => bail!("values stored as type {ty}, not a number type"),
    }
}

fn word(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

/// Fills `buf` as far as `r` goes: the bytes read (fewer only at its end).
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the MAT-file"),
        }
    }
    Ok(n)
}
