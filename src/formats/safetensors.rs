//! safetensors: reading and writing named tensors with string metadata
//! (vggctl's checkpoints, exports and caches). Names are torchvision's, so
//! files move between vggctl and PyTorch.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use tch::{Kind, Tensor};

use crate::formats::Sniffed;
use crate::fsutil::{read_regular, write_atomic_bytes};

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

/// Writes tensors (in the given order) and metadata atomically.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let shape = t.size().iter().map(|&d| d as usize).collect();
            Ok((name.clone(), dtype_of(t.kind())?, shape, tensor_bytes(t)))
        })
        .collect::<Result<_>>()?;
    let views: Vec<(String, TensorView<'_>)> = raw
        .iter()
        .map(|(name, dtype, shape, data)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?))
        })
        .collect::<Result<_>>()?;
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    let bytes = safetensors::tensor::serialize(views, meta)
        .with_context(|| format!("serializing {}", path.display()))?;
    write_atomic_bytes(path, &bytes)
}
