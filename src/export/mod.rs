//! Exports a model for deployment: safetensors that torchvision loads,
//! TorchScript traced from the model's own forward, and ONNX and PyTorch 2's
//! `torch.export` archive (`pt2`) written here.
//! Every writer refuses to overwrite unless asked and writes atomically.

pub mod onnx;
pub mod onnx_proto;
pub mod pt2;

use std::path::Path;

use anyhow::{Context, Result};
use tch::{CModule, Device, Kind, Tensor};

use crate::checkpoint::ModelMeta;
use crate::formats::safetensors::write_safetensors;
use crate::fsutil::{write_atomic, write_atomic_bytes};
use crate::model::Vgg;

/// torchvision's state dict (BN `num_batches_tracked` as int64 included) and
/// vggctl's metadata; `half` stores floating-point tensors as float16.
pub fn export_safetensors(model: &Vgg, meta: &ModelMeta, path: &Path, half: bool) -> Result<()> {
    let mut sd = model.state_dict();
    if half {
        for (_, t) in sd.iter_mut() {
            if t.is_floating_point() {
                *t = t.to_kind(Kind::Half);
            }
        }
    }
    write_safetensors(path, &sd, &meta.to_metadata())
}

/// Traces the eval-mode forward at `input` x `input` and saves TorchScript
/// that `torch.jit.load` and libtorch's C++ loader run. The graph flattens
/// with `flatten(1, -1)`, so any batch size works.
pub fn export_torchscript(model: &Vgg, input: i64, path: &Path) -> Result<()> {
    let example = Tensor::zeros([2, 3, input, input], (Kind::Float, Device::Cpu));
    let mut forward = |xs: &[Tensor]| vec![tch::no_grad(|| model.forward_t(&xs[0], false))];
    let module = CModule::create_by_tracing("VGG", "forward", &[example], &mut forward)
        .context("tracing the model")?;
    // libtorch writes into memory (its file writer aborts the process when
    // the disk fills); the bytes then go to disk like every other file.
    let bytes = crate::shim::jit_save_bytes(&module).context("serializing TorchScript")?;
    write_atomic_bytes(path, &bytes)
}

/// ONNX (opset 17) written by vggctl, with a dynamic batch dimension.
pub fn export_onnx(
    model: &Vgg,
    meta: &ModelMeta,
    input: i64,
    folded: bool,
    path: &Path,
) -> Result<()> {
    let bytes = onnx::model_bytes(model, meta, input, folded)?;
    write_atomic_bytes(path, &bytes)
}

/// A `torch.export` archive (`.pt2`) with a dynamic batch dimension.
pub fn export_pt2(model: &Vgg, meta: &ModelMeta, input: i64, path: &Path) -> Result<()> {
    // torch names the archive's folder after the file, as `torch.export.save` does.
    let root: String = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let root = if root.is_empty() {
        "model".into()
    } else {
        root
    };
    write_atomic(path, |w| {
        pt2::write_pt2(w, &root, model, meta, input)
            .with_context(|| format!("writing {}", path.display()))
    })
}
