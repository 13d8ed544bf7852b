//! A native reader for `torch.save` files, in both formats: the zip archive
//! (torch >= 1.6) and the legacy stream of pickles that torchvision's published
//! VGG weights use (libtorch's C++ loader cannot read those).
//!
//! Safe by construction: the pickles go through [`super::pickle`] with an
//! allowlist of the globals a state dict needs (OrderedDict, the tensor
//! rebuild functions, the storage classes); nothing is ever called. Every
//! storage size, offset and stride read from the file is checked against the
//! bytes the file actually holds before anything is allocated.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufReader, Cursor, Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use tch::{Kind, Tensor};

use super::Sniffed;
use super::pickle::{Allowlist, Unpickler, Value};

const GLOBALS: &[(&str, &str)] = &[
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.nn.parameter", "Parameter"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "IntStorage"),
    ("torch", "ShortStorage"),
    ("torch", "CharStorage"),
    ("torch", "ByteStorage"),
    ("torch", "BoolStorage"),
];
const DICT_LIKE: &[(&str, &str)] = &[("collections", "OrderedDict")];
const ALLOW: Allowlist = Allowlist {
    globals: GLOBALS,
    dict_like: DICT_LIKE,
};

/// `torch.save(obj, f, _use_new_zipfile_serialization=False)` starts with
/// the pickle of this magic number (protocol 2, LONG1 of 10 bytes).
/// The largest `.pth` file read: torchvision's biggest VGG is 0.55 GB.
const MAX_FILE: u64 = 16 << 30;

pub(crate) const LEGACY_MAGIC: &[u8] = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19.";
const LEGACY_PROTOCOL: i64 = 1001;

fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name {
        "FloatStorage" => Kind::Float,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "DoubleStorage" => Kind::Double,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// What a persistent id says about a storage.
#[derive(Clone, Debug)]
struct StorageRef {
    key: String,
    kind: Kind,
    /// Elements in the (root) storage.
    numel: usize,
    /// Legacy views: (offset, size) into the root storage, in elements.
    view: Option<(usize, usize)>,
}

fn storage_ref(pid: &Value) -> Result<StorageRef> {
    let items = pid
        .items()
        .ok_or_else(|| anyhow!("persistent id is not a tuple"))?;
    if items.first().and_then(|v| v.as_text()).as_deref() != Some("storage") || items.len() < 5 {
        bail!("unsupported persistent id (expected ('storage', type, key, location, size))");
    }
    let kind = match &items[1] {
        Value::Global(g) if g.0 == "torch" => storage_kind(&g.1),
        _ => None,
    }
    .ok_or_else(|| anyhow!("unsupported storage type {}", items[1].type_name()))?;
    let key = items[2]
        .as_text()
        .ok_or_else(|| anyhow!("storage key is not a string"))?;
    let numel = items[4]
        .as_int()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| anyhow!("storage {key}: size is not a non-negative integer"))?;
    let view = match items.get(5) {
        None | Some(Value::None) => None,
        Some(v) => {
            let vi = v.items().unwrap_or_default();
            let (Some(off), Some(size)) = (
                vi.get(1).and_then(|x| x.as_int()),
                vi.get(2).and_then(|x| x.as_int()),
            ) else {
                bail!("storage {key}: unreadable view metadata");
            };
            let (off, size) = (usize::try_from(off)?, usize::try_from(size)?);
            if off.checked_add(size).is_none_or(|end| end > numel) {
                bail!("storage {key}: view {off}+{size} lies outside its {numel} elements");
            }
            Some((off, size))
        }
    };
    Ok(StorageRef {
        key,
        kind,
        numel,
        view,
    })
}

/// Every storage, by key, as a flat tensor of its elements, already
/// checked against the file.
type Storages = HashMap<String, Tensor>;

const ZIP_MAGIC: &[u8] = b"PK\x03\x04";

/// How much of a legacy file's start is read for its pickles at first.
const LEGACY_HEAD_BYTES: u64 = 1 << 20;

/// Reads a state dict (tensors by name) from a `torch.save` file of either
/// format, a storage at a time, so that at most one storage's bytes are in
/// memory beside the tensors (the whole file, then every storage's bytes,
/// then the tensors were three copies of a 0.5 GB model): a zip archive
/// member by member, a legacy file storage by storage after the pickles at
/// its start (a file whose pickles do not fit its first MiB is read whole,
/// as `parse_pth` reads bytes).
pub fn read_pth(path: &Path) -> Result<BTreeMap<String, Tensor>> {
    let (file, len) = crate::fsutil::open_regular(path, "a torch.save file", MAX_FILE)?;
    let mut file = file.into_inner();
    let read = || format!("reading {}", path.display());
    let mut magic = Vec::with_capacity(ZIP_MAGIC.len());
    (&mut file)
        .take(ZIP_MAGIC.len() as u64)
        .read_to_end(&mut magic)
        .with_context(read)?;
    file.seek(SeekFrom::Start(0)).with_context(read)?;
    if magic == ZIP_MAGIC {
        return parse_zip(BufReader::new(file), len).with_context(read);
    }
    // A legacy file's pickles are small: from its first MiB where they fit.
    let mut start = Vec::new();
    (&mut file)
        .take(LEGACY_HEAD_BYTES)
        .read_to_end(&mut start)
        .with_context(read)?;
    if start.starts_with(LEGACY_MAGIC)
        && let Ok(head) = legacy_head(&start)
    {
        let at = head.storages_at as u64;
        file.seek(SeekFrom::Start(at)).with_context(read)?;
        return legacy_state_dict(head, &mut BufReader::new(file), len.saturating_sub(at))
            .with_context(read);
    }
    drop(file);
    let bytes = crate::fsutil::read_regular(path, "a torch.save file", MAX_FILE)?;
    parse_pth(&bytes).with_context(read)
}

pub fn parse_pth(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    if bytes.starts_with(ZIP_MAGIC) {
        parse_zip(Cursor::new(bytes), bytes.len() as u64)
    } else if bytes.starts_with(LEGACY_MAGIC) {
        parse_legacy(bytes)
    } else if bytes.starts_with(b"\x80") {
        bail!("not a torch.save file: a pickle without torch's magic number")
    } else if Sniffed::of(bytes) != Sniffed::Unknown {
        bail!(
            "not a torch.save file: it is {}",
            Sniffed::of(bytes).describe()
        )
    } else {
        bail!("not a torch.save file (neither a zip archive nor the legacy format's magic number)")
    }
}

/// A zip archive of `len` bytes, as torch.save writes it.
fn parse_zip<R: Read + Seek>(reader: R, len: u64) -> Result<BTreeMap<String, Tensor>> {
    let archive_len = usize::try_from(len)?;
    let mut zip = zip::ZipArchive::new(reader).context("not a valid zip archive")?;
    let pkl_name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| anyhow!("zip archive has no <name>/data.pkl: not a torch.save file"))?;
    let prefix = pkl_name.trim_end_matches("data.pkl").to_string();
    if let Ok(mut f) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut order = String::new();
        let _ = f.read_to_string(&mut order);
        if order.trim() == "big" {
            bail!("big-endian torch.save files are not supported");
        }
    }
    let mut budget = len.saturating_mul(64);
    let pkl = read_member(&mut zip, &pkl_name, archive_len, &mut budget)?;
    let obj = Unpickler::new(&pkl, &ALLOW).load().context("data.pkl")?;
    let mut refs = Vec::new();
    collect_refs(&obj, &mut refs)?;
    let mut storages: Storages = HashMap::new();
    for r in refs {
        if storages.contains_key(&r.key) {
            continue;
        }
        let name = format!("{prefix}data/{}", r.key);
        let data = read_member(&mut zip, &name, archive_len, &mut budget)
            .with_context(|| format!("storage {} is missing", r.key))?;
        let need = r
            .numel
            .checked_mul(r.kind.elt_size_in_bytes())
            .ok_or_else(|| anyhow!("storage {} is too large", r.key))?;
        if data.len() < need {
            bail!(
                "storage {} holds {} bytes, its header says {need}",
                r.key,
                data.len()
            );
        }
        let n = data.len() / r.kind.elt_size_in_bytes();
        let t =
            Tensor::f_from_data_size(&data[..n * r.kind.elt_size_in_bytes()], &[n as i64], r.kind)?;
        storages.insert(r.key.clone(), t);
    }
    state_dict(&obj, &storages)
}

/// Reads one zip member, refusing members that claim more than the archive
/// holds, and more in all than `budget` (what is left of 64 times the
/// archive's size: 40 members of 96 MiB of zeros each fit in 4 MB).
fn read_member<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    archive_len: usize,
    budget: &mut u64,
) -> Result<Vec<u8>> {
    let f = zip
        .by_name(name)
        .with_context(|| format!("{name} not in archive"))?;
    let size = f.size();
    // Stored (uncompressed) members cannot exceed the archive; compressed
    // ones are capped at a generous ratio.
    let cap =
        (archive_len as u64).saturating_mul(if f.compression() == zip::CompressionMethod::Stored {
            1
        } else {
            64
        });
    if size > cap {
        bail!("{name} claims {size} bytes, more than the archive can hold");
    }
    if size > *budget {
        bail!("{name} claims {size} bytes, more than the archive can hold with its other members");
    }
    *budget -= size;
    let mut out = Vec::with_capacity(size as usize);
    // Read to the member's end (one byte more than it claims, at most):
    // the zip reader checks the CRC-32 there, so a flipped byte is an error.
    f.take(size + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("reading {name} (damaged: its checksum does not match)"))?;
    if out.len() as u64 != size {
        bail!("{name} is truncated: {} of {size} bytes", out.len());
    }
    Ok(out)
}

fn parse_legacy(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let head = legacy_head(bytes)?;
    let rest = &bytes[head.storages_at..];
    legacy_state_dict(head, &mut Cursor::new(rest), rest.len() as u64)
}

/// The legacy format's pickles: what a file holds before its storages.
struct LegacyHead {
    obj: Value,
    keys: Vec<String>,
    /// Where the storages begin, from the start of the file.
    storages_at: usize,
}

/// The pickles at the start of `bytes`, a legacy file or as much of its
/// start as holds them (they end before the first storage: a prefix that
/// cuts them fails to parse, one that holds them parses as the whole file).
fn legacy_head(bytes: &[u8]) -> Result<LegacyHead> {
    let rest = &bytes[LEGACY_MAGIC.len()..];
    let mut up = Unpickler::new(rest, &ALLOW);
    let protocol = up.load().context("legacy header")?;
    if protocol.as_int() != Some(LEGACY_PROTOCOL) {
        bail!(
            "unsupported legacy protocol version {}",
            protocol.type_name()
        );
    }
    let sys_info = up.load().context("legacy header")?;
    if let Some(Value::Bool(false)) = sys_info.get("little_endian") {
        bail!("big-endian torch.save files are not supported");
    }
    let obj = up.load().context("the pickled object")?;
    let keys = up.load().context("the storage key list")?;
    let keys: Vec<String> = keys
        .items()
        .and_then(|k| k.iter().map(|v| v.as_text()).collect())
        .ok_or_else(|| anyhow!("the storage key list is not a list of strings"))?;
    Ok(LegacyHead {
        obj,
        keys,
        storages_at: LEGACY_MAGIC.len() + up.position(),
    })
}

/// The state dict of a legacy file whose storages `r` reads, `avail` bytes
/// of them: each an element count (8 bytes) and the elements, in the order
/// of the key list, each made a tensor as it is read.
fn legacy_state_dict(
    head: LegacyHead,
    r: &mut impl Read,
    mut avail: u64,
) -> Result<BTreeMap<String, Tensor>> {
    let mut refs = Vec::new();
    collect_refs(&head.obj, &mut refs)?;
    let kinds: HashMap<&str, &StorageRef> = refs.iter().map(|r| (r.key.as_str(), r)).collect();
    let mut storages: Storages = HashMap::new();
    let mut buf = Vec::new();
    for key in &head.keys {
        let sref = kinds
            .get(key.as_str())
            .ok_or_else(|| anyhow!("storage {key} is listed but never used"))?;
        let mut count_bytes = [0u8; 8];
        if avail < 8 || r.read_exact(&mut count_bytes).is_err() {
            bail!("file truncated before storage {key}");
        }
        let count = u64::from_le_bytes(count_bytes);
        avail -= 8;
        let elt = sref.kind.elt_size_in_bytes() as u64;
        let need = count.checked_mul(elt).filter(|&n| n <= avail).ok_or_else(|| {
            anyhow!("storage {key} claims {count} elements, more than the {avail} bytes left in the file")
        })?;
        if (count as usize) < sref.numel {
            bail!(
                "storage {key} holds {count} elements, its tensors need {}",
                sref.numel
            );
        }
        buf.resize(need as usize, 0);
        r.read_exact(&mut buf)
            .with_context(|| format!("file truncated in storage {key}"))?;
        let t = Tensor::f_from_data_size(&buf, &[count as i64], sref.kind)?;
        storages.insert(key.clone(), t);
        avail -= need;
    }
    for r in &refs {
        if !storages.contains_key(&r.key) {
            bail!("storage {} is used but not stored", r.key);
        }
    }
    state_dict(&head.obj, &storages)
}

/// Finds every storage a value refers to: an explicit stack, and each
/// shared container walked once (a value that shares one sub-structure 64
/// levels deep has 2^64 paths).
fn collect_refs(root: &Value, out: &mut Vec<StorageRef>) -> Result<()> {
    let mut seen = HashSet::new();
    let mut work = vec![root.clone()];
    while let Some(v) = work.pop() {
        if let Value::PersistentId(pid) = &v {
            out.push(storage_ref(pid)?);
            continue;
        }
        if v.id().is_some_and(|id| seen.insert(id)) {
            work.extend(v.children());
        }
    }
    Ok(())
}

fn sizes(v: &Value, what: &str) -> Result<Vec<i64>> {
    v.items()
        .and_then(|s| s.iter().map(|d| d.as_int()).collect::<Option<Vec<_>>>())
        .filter(|s| s.iter().all(|&d| d >= 0))
        .ok_or_else(|| anyhow!("tensor {what} is not a tuple of non-negative integers"))
}

/// Rebuilds one tensor from `_rebuild_tensor_v2(storage, offset, size, stride, ...)`
/// (or its wrappers), checking that every element lies inside the storage.
fn tensor(v: &Value, storages: &Storages) -> Result<Tensor> {
    let call = v
        .call()
        .ok_or_else(|| anyhow!("expected a tensor, found {}", v.type_name()))?;
    match call.name.as_str() {
        "_rebuild_parameter" | "_rebuild_parameter_with_state" => {
            let inner = call
                .args
                .first()
                .ok_or_else(|| anyhow!("_rebuild_parameter without data"))?;
            tensor(inner, storages)
        }
        "_rebuild_from_type_v2" => {
            // (func, type, args, state): func rebuilds the tensor from args.
            let (Some(Value::Global(func)), Some(args)) = (call.args.first(), call.args.get(2))
            else {
                bail!("malformed _rebuild_from_type_v2");
            };
            let inner = Value::Call(std::rc::Rc::new(std::cell::RefCell::new(
                super::pickle::Call {
                    module: func.0.clone(),
                    name: func.1.clone(),
                    args: args.items().unwrap_or_default(),
                    state: None,
                },
            )));
            tensor(&inner, storages)
        }
        "_rebuild_tensor_v2" | "_rebuild_tensor" => {
            let [pid, offset, size, stride, ..] = call.args.as_slice() else {
                bail!("{} with {} arguments", call.name, call.args.len());
            };
            let Value::PersistentId(pid) = pid else {
                bail!("tensor without a storage")
            };
            rebuild_view(&storage_ref(pid)?, offset, size, stride, storages)
        }
        other => bail!("expected a tensor, found {}.{}", call.module, other),
    }
}

/// The view `_rebuild_tensor_v2` describes (offset, size, stride into a
/// storage), checked to lie inside the storage, as a contiguous tensor.
fn rebuild_view(
    r: &StorageRef,
    offset: &Value,
    size: &Value,
    stride: &Value,
    storages: &Storages,
) -> Result<Tensor> {
    let base = &storages[&r.key];
    let (view_off, view_len) = r.view.unwrap_or((0, r.numel));
    let offset = offset
        .as_int()
        .filter(|&o| o >= 0)
        .ok_or_else(|| anyhow!("bad storage offset"))?;
    let size = sizes(size, "size")?;
    let stride = sizes(stride, "stride")?;
    if size.len() != stride.len() {
        bail!("tensor size {size:?} and stride {stride:?} differ in rank");
    }
    // Highest element index the view touches, with overflow checks.
    let last = if size.contains(&0) {
        Some(0)
    } else {
        size.iter().zip(&stride).try_fold(offset, |acc, (&s, &st)| {
            (s - 1).checked_mul(st).and_then(|x| acc.checked_add(x))
        })
    };
    match last {
        Some(l) if size.contains(&0) || (l as u64) < view_len as u64 => {}
        _ => bail!(
            "tensor of size {size:?} at offset {offset} runs past its storage of {view_len} elements"
        ),
    }
    // A state dict's tensors never repeat elements; a tiny storage
    // viewed with zero strides could otherwise expand without bound.
    let numel = size.iter().try_fold(1i64, |a, &s| a.checked_mul(s));
    if numel.is_none_or(|n| n as u64 > view_len as u64) {
        bail!("tensor of size {size:?} has more elements than its storage of {view_len}");
    }
    let t = base.f_as_strided(&size, &stride, Some(offset + view_off as i64))?;
    Ok(t.f_contiguous()?)
}

/// The state dict inside the unpickled object: the object itself, or the
/// `state_dict` / `model` entry of a training checkpoint.
fn state_dict(obj: &Value, storages: &Storages) -> Result<BTreeMap<String, Tensor>> {
    let entries = obj
        .entries()
        .ok_or_else(|| anyhow!("the file holds a {}, not a state dict", obj.type_name()))?;
    let is_tensor = |v: &Value| matches!(v, Value::Call(_));
    if !entries.iter().all(|(_, v)| is_tensor(v)) {
        for key in ["state_dict", "model", "model_state_dict"] {
            if let Some(inner) = obj.get(key)
                && inner.entries().is_some()
            {
                return state_dict(&inner, storages);
            }
        }
        let keys: Vec<String> = entries
            .iter()
            .filter_map(|(k, _)| k.as_text())
            .take(8)
            .collect();
        bail!("no state dict found (top-level keys: {})", keys.join(", "));
    }
    let mut out = BTreeMap::new();
    for (k, v) in &entries {
        let name = k
            .as_text()
            .ok_or_else(|| anyhow!("state-dict key is not a string"))?;
        let t = tensor(v, storages).with_context(|| format!("tensor {name}"))?;
        out.insert(name, t);
    }
    Ok(out)
}
