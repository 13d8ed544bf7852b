//! safetensors: reading and writing named tensors with string metadata
//! (vggctl's checkpoints, exports and caches). Names are torchvision's, so
//! files move between vggctl and PyTorch.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use tch::{Kind, Tensor};

use crate::formats::Sniffed;
use crate::fsutil::{open_regular, write_atomic};

/// The largest safetensors file read (a resume point of VGG19 with AdamW
/// state is 1.7 GB; an image folder's cache grows with the folder).
const MAX_FILE: u64 = 256 << 30;

/// Tensors by name plus the file's string metadata.
pub struct StateDict {
    pub tensors: BTreeMap<String, Tensor>,
    pub metadata: HashMap<String, String>,
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("cannot store {other:?} tensors in safetensors"),
    })
}

/// The raw little-endian bytes of a CPU tensor.
pub fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(tch::Device::Cpu).contiguous();
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.copy_data_u8(&mut buf, numel);
    buf
}

/// Reads a safetensors file a tensor at a time: the header, then each
/// tensor's bytes made a tensor before the next are read (the whole file
/// in memory beside its tensors was twice the size of a resume point).
pub fn read_safetensors(path: &Path) -> Result<StateDict> {
    let (file, len) = open_regular(path, "a safetensors file", MAX_FILE)?;
    read_from(BufReader::new(file.into_inner()), len)
        .with_context(|| format!("reading {}", path.display()))
}

pub fn parse_safetensors(bytes: &[u8]) -> Result<StateDict> {
    read_from(Cursor::new(bytes), bytes.len() as u64)
}

/// The largest header read, the safetensors crate's limit.
const MAX_HEADER: u64 = 100_000_000;

/// A safetensors file of `len` bytes from `r`. The header is the crate's
/// own `Metadata` (its parser sorts the tensors by offset and checks that
/// they tile the data exactly, each its shape's size), and the data must
/// end where the file does, as `SafeTensors::deserialize` requires.
fn read_from(mut r: impl Read + Seek, len: u64) -> Result<StateDict> {
    let mut start = Vec::with_capacity(16);
    (&mut r).take(16).read_to_end(&mut start)?;
    let sniffed = Sniffed::of_start(&start, len);
    if !matches!(sniffed, Sniffed::Safetensors | Sniffed::Unknown) {
        bail!("not a safetensors file: it is {}", sniffed.describe());
    }
    let invalid = "not a valid safetensors file";
    let Some(n) = start
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    else {
        bail!("{invalid}: {len} bytes, shorter than the header's length");
    };
    if n > MAX_HEADER || n > len.saturating_sub(8) {
        bail!("{invalid}: a header of {n} bytes in a file of {len}");
    }
    r.seek(SeekFrom::Start(8))?;
    let mut header = vec![0u8; n as usize];
    r.read_exact(&mut header).context("the file ended early")?;
    let header: Metadata = serde_json::from_slice(&header).context(invalid)?;
    let data_len = header.data_len() as u64;
    if data_len != len - 8 - n {
        bail!(
            "{invalid}: the header places {data_len} bytes of tensors, the file holds {}",
            len - 8 - n
        );
    }
    let mut tensors = BTreeMap::new();
    let mut buf = Vec::new();
    for name in header.offset_keys() {
        let info = header.info(&name).expect("a name the header lists");
        let kind = kind_of(info.dtype)
            .with_context(|| format!("tensor {name} has unsupported dtype {:?}", info.dtype))?;
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        let (s, e) = info.data_offsets;
        buf.resize(e - s, 0);
        r.read_exact(&mut buf).context("the file ended early")?;
        tensors.insert(name, Tensor::f_from_data_size(&buf, &shape, kind)?);
    }
    let metadata = header.metadata().clone().unwrap_or_default();
    Ok(StateDict { tensors, metadata })
}

/// The bytes of the write buffer a tensor's data goes through.
const CHUNK_BYTES: usize = 16 << 20;

/// Writes tensors and metadata atomically, in the layout of the safetensors
/// crate's `serialize` (data sorted by dtype alignment, then name; the
/// header padded with spaces to 8 bytes), without the file in memory: each
/// tensor's data goes out through one 16 MiB buffer (a resume point of
/// VGG19 with AdamW state is 1.7 GB, and building it in memory took twice
/// that at every save).
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let mut order: Vec<(&String, Tensor, Dtype)> = tensors
        .iter()
        .map(|(name, t)| Ok((name, t.shallow_clone(), dtype_of(t.kind())?)))
        .collect::<Result<_>>()?;
    order.sort_by(|(a, _, x), (b, _, y)| y.cmp(x).then(a.cmp(b)));
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0;
    for (name, t, dtype) in &order {
        let n = t.numel() * t.kind().elt_size_in_bytes();
        let shape = t.size().iter().map(|&d| d as usize).collect();
        let data_offsets = (offset, offset + n);
        infos.push((
            name.to_string(),
            TensorInfo {
                dtype: *dtype,
                shape,
                data_offsets,
            },
        ));
        offset += n;
    }
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    let header = Metadata::new(meta, infos)
        .map_err(anyhow::Error::from)
        .and_then(|m| Ok(serde_json::to_vec(&m)?))
        .with_context(|| format!("serializing {}", path.display()))?;
    let mut header = header;
    header.resize(header.len().next_multiple_of(8), b' ');
    write_atomic(path, |w| {
        let fail = || format!("writing {}", path.display());
        w.write_all(&(header.len() as u64).to_le_bytes())
            .with_context(fail)?;
        w.write_all(&header).with_context(fail)?;
        let mut buf = Vec::new();
        for (_, t, _) in &order {
            write_data(w, t, &mut buf).with_context(fail)?;
        }
        Ok(())
    })
}

/// A tensor's raw little-endian bytes through `buf`, a chunk at a time.
fn write_data(w: &mut impl Write, t: &Tensor, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let flat = t.to_device(tch::Device::Cpu).contiguous().reshape([-1]);
    let size = flat.kind().elt_size_in_bytes();
    let total = flat.numel();
    let per_chunk = (CHUNK_BYTES / size).max(1);
    let mut at = 0;
    while at < total {
        let n = per_chunk.min(total - at);
        buf.resize(n * size, 0);
        flat.narrow(0, at as i64, n as i64).copy_data_u8(buf, n);
        w.write_all(buf)?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// The streamed writer's file is byte for byte the safetensors crate's
    /// `serialize` of the same tensors (mixed dtypes, an empty tensor, one
    /// larger than a chunk, a non-contiguous view), and reads back equal.
    #[test]
    fn the_streamed_file_is_the_crates_own_serialization() {
        let big = Tensor::arange(
            (CHUNK_BYTES / 4 + 5) as i64,
            (Kind::Float, tch::Device::Cpu),
        );
        let tensors = vec![
            (
                "b.weight".to_string(),
                Tensor::randn([3, 4], (Kind::Float, tch::Device::Cpu)).tr(),
            ),
            ("a.count".to_string(), Tensor::from_slice(&[7i64, -2])),
            (
                "c.half".to_string(),
                Tensor::randn([5], (Kind::Half, tch::Device::Cpu)),
            ),
            (
                "d.empty".to_string(),
                Tensor::zeros([0, 3], (Kind::Float, tch::Device::Cpu)),
            ),
            (
                "e.flags".to_string(),
                Tensor::from_slice(&[true, false, true]),
            ),
            ("big".to_string(), big),
        ];
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_safetensors(&path, &tensors, &metadata).unwrap();
        let written = std::fs::read(&path).unwrap();

        let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(name, t)| {
                let shape = t.size().iter().map(|&d| d as usize).collect();
                (
                    name.clone(),
                    dtype_of(t.kind()).unwrap(),
                    shape,
                    tensor_bytes(t),
                )
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = raw
            .iter()
            .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let expected = safetensors::tensor::serialize(views, Some(metadata.clone())).unwrap();
        assert_eq!(written.len(), expected.len());
        assert!(
            written == expected,
            "the file differs from safetensors' serialize"
        );

        let back = read_safetensors(&path).unwrap();
        assert_eq!(back.metadata, metadata);
        for (name, t) in &tensors {
            assert!(back.tensors[name].equal(t), "{name} reads back different");
        }
    }

    /// What the safetensors crate makes of `bytes`: each tensor's dtype,
    /// shape and bytes, and the metadata; None where it refuses them.
    type Reading = (
        BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
        HashMap<String, String>,
    );
    fn crates_reading(bytes: &[u8]) -> Option<Reading> {
        let st = safetensors::SafeTensors::deserialize(bytes).ok()?;
        let (_, header) = safetensors::SafeTensors::read_metadata(bytes).ok()?;
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect();
        Some((tensors, header.metadata().clone().unwrap_or_default()))
    }

    /// `good`, one byte longer, truncated, and 3,000 mutations of it.
    fn damaged(good: &[u8]) -> Vec<Vec<u8>> {
        let header_end = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
        let mut cases: Vec<Vec<u8>> = vec![good.to_vec(), [good, b"x"].concat()];
        cases.extend(
            [0, 7, 8, 9, header_end - 1, header_end, good.len() - 1].map(|c| good[..c].to_vec()),
        );
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |below: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % below as u64) as usize
        };
        for i in 0..3000 {
            let mut m = good.to_vec();
            for _ in 0..1 + next(3) {
                let at = if i % 2 == 0 {
                    next(header_end)
                } else {
                    next(m.len())
                };
                // In the data, only changed bytes: the file stays readable.
                match next(if i % 2 == 0 { 4 } else { 2 }) {
                    0 => m[at] ^= 1 << next(8),
                    1 => m[at] = b"0123456789[]{},:\" \\"[next(17)],
                    2 => _ = m.remove(at.min(m.len() - 1)),
                    _ => m.insert(at, m[at]),
                }
            }
            cases.push(m);
        }
        cases
    }

    /// A file read a tensor at a time (from the file, and from its bytes)
    /// holds what the safetensors crate reads from the same bytes, and is
    /// refused where the crate refuses it (or where it holds a dtype vggctl
    /// has no tensors of): a good file, its truncations, one byte more, 3,000
    /// mutations, half of them in the header (bytes changed, removed or
    /// repeated), half anywhere (bytes changed).
    #[test]
    fn a_file_is_read_as_the_safetensors_crate_reads_it() {
        let cpu = (Kind::Float, tch::Device::Cpu);
        let tensors = vec![
            ("w".to_string(), Tensor::randn([2, 3], cpu)),
            ("n".to_string(), Tensor::from_slice(&[3i64])),
            (
                "h".to_string(),
                Tensor::randn([4], (Kind::Half, tch::Device::Cpu)),
            ),
            ("e".to_string(), Tensor::zeros([0], cpu)),
            ("b".to_string(), Tensor::from_slice(&[1u8, 2, 3])),
        ];
        let metadata = HashMap::from([("arch".to_string(), "vgg11".to_string())]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        write_safetensors(&path, &tensors, &metadata).unwrap();
        let good = std::fs::read(&path).unwrap();
        let cases = damaged(&good);
        let (mut read, mut refused) = (0, 0);
        for bytes in &cases {
            let ours = parse_safetensors(bytes);
            let theirs = crates_reading(bytes);
            std::fs::write(&path, bytes).unwrap();
            let from_file = read_safetensors(&path);
            match (&ours, &from_file) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a.metadata, b.metadata);
                    assert_eq!(a.tensors.len(), b.tensors.len());
                    for (k, t) in &a.tensors {
                        assert!(tensor_bytes(t) == tensor_bytes(&b.tensors[k]), "{k}");
                    }
                }
                (Err(a), Err(b)) => {
                    let prefix = format!("reading {}: ", path.display());
                    assert_eq!(
                        format!("{b:#}").strip_prefix(&prefix),
                        Some(format!("{a:#}").as_str())
                    );
                }
                _ => panic!(
                    "from the bytes {:?}, from the file {:?}",
                    ours.is_ok(),
                    from_file.is_ok()
                ),
            }
            let Some((want, want_meta)) = theirs else {
                assert!(ours.is_err(), "read what the crate refuses");
                refused += 1;
                continue;
            };
            if want.values().any(|(d, _, _)| kind_of(*d).is_none()) {
                assert!(ours.is_err(), "read a dtype vggctl has no tensors of");
                continue;
            }
            let got = ours.expect("refused what the crate reads");
            assert_eq!(got.metadata, want_meta);
            assert_eq!(
                got.tensors.keys().collect::<Vec<_>>(),
                want.keys().collect::<Vec<_>>()
            );
            for (k, (dtype, shape, data)) in &want {
                let t = &got.tensors[k];
                assert_eq!(dtype_of(t.kind()).unwrap(), *dtype, "{k}");
                assert_eq!(
                    t.size().iter().map(|&d| d as usize).collect::<Vec<_>>(),
                    *shape,
                    "{k}"
                );
                assert!(tensor_bytes(t) == *data, "{k}");
            }
            read += 1;
        }
        assert!(
            read > 100 && refused > 1000,
            "read {read}, refused {refused}"
        );
    }
}
