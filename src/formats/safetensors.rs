//! safetensors: reading and writing named tensors with string metadata
//! (vggctl's checkpoints, exports and caches). Names are torchvision's, so
//! files move between vggctl and PyTorch.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::tensor::{Dtype, Metadata, SafeTensors, TensorInfo};
use tch::{Kind, Tensor};

use crate::formats::Sniffed;
use crate::fsutil::{read_regular, write_atomic};

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

pub fn read_safetensors(path: &Path) -> Result<StateDict> {
    let bytes = read_regular(path, "a safetensors file", MAX_FILE)?;
    parse_safetensors(&bytes).with_context(|| format!("reading {}", path.display()))
}

pub fn parse_safetensors(bytes: &[u8]) -> Result<StateDict> {
    let sniffed = Sniffed::of(bytes);
    if !matches!(sniffed, Sniffed::Safetensors | Sniffed::Unknown) {
        bail!("not a safetensors file: it is {}", sniffed.describe());
    }
    let (_, header) = SafeTensors::read_metadata(bytes).context("not a valid safetensors file")?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).context("not a valid safetensors file")?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype())
            .with_context(|| format!("tensor {name} has unsupported dtype {:?}", view.dtype()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        tensors.insert(name, Tensor::f_from_data_size(view.data(), &shape, kind)?);
    }
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
}
